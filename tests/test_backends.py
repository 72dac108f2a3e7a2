import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels.backends import ENV_VAR, Op

OP = Op("demo_op", {b: "transfusion_kernels.attention.reference" for b in ("reference", "triton", "cuda")})
CPU = torch.device("cpu")


def test_precedence(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert OP.resolve(None, CPU) == "reference"  # auto on the CPU
    monkeypatch.setenv(ENV_VAR, "reference")
    assert OP.resolve(None, CPU) == "reference"
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(tk.BackendUnavailableError, match="cuda"):
        OP.resolve(None, CPU)
    with tk.use_backend("reference"):  # the block wins over the environment
        assert OP.resolve(None, CPU) == "reference"
        with tk.use_backend("auto"):
            assert OP.resolve(None, CPU) == "reference"
        with pytest.raises(tk.BackendUnavailableError):
            OP.resolve("cuda", CPU)  # the argument wins over the block
    with pytest.raises(tk.BackendUnavailableError):
        OP.resolve(None, CPU)  # the block ended: the environment again


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        OP.resolve("fast", CPU)
    with pytest.raises(ValueError, match="unknown backend"):
        with tk.use_backend("fast"):
            pass
    partial = Op("partial_op", {"reference": "transfusion_kernels.attention.reference"})
    with pytest.raises(tk.BackendUnavailableError, match="no 'triton' implementation"):
        partial.resolve("triton", CPU)


def test_unavailable_error_says_why_and_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(tk.BackendUnavailableError, match="TRITON_INTERPRET=1.*backend='auto'"):
        OP.resolve("triton", CPU)
    with pytest.raises(tk.BackendUnavailableError, match="cuda.*cannot run here"):
        OP.resolve("cuda", CPU)


def test_available_backends_reports_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    info = tk.available_backends("cpu")
    assert set(info) == {"reference", "triton", "cuda"}
    assert info["reference"].available
    assert info["triton"].available and "interpreter" in info["triton"].reason
    assert not info["cuda"].available and info["cuda"].reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tk.available_backends("cpu")["triton"].available


def test_dispatch_through_a_real_op(monkeypatch):
    mask = tk.HybridMask.causal(torch.tensor([0, 4], dtype=torch.int32))
    q = torch.randn(4, 1, 8)
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(tk.BackendUnavailableError):
        tk.hybrid_attention(q, q, q, mask)
    with tk.use_backend("reference"):
        tk.hybrid_attention(q, q, q, mask)
