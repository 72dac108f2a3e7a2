import subprocess
import sys
import warnings

import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels import backends as tk_backends
from transfusion_kernels.backends import AUTO_ORDER, BACKENDS, ENV_VAR, Op, extension_status, select

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


# ---- select: coverage and the fallback chain, the same for every op ------------------------
class _Covers:
    """A stand-in backend module: covers inputs whose last dim is in ``dims``."""

    def __init__(self, name, dims):
        self.name, self.dims = name, dims

    def supports(self, x):
        return None if x.shape[-1] in self.dims else f"last dim {x.shape[-1]} ({self.name})"


def _op(monkeypatch, runs=("reference", "triton", "cuda"), **dims):
    op = Op("cover_op", {b: "transfusion_kernels.attention.reference" for b in BACKENDS})
    for b in ("triton", "cuda"):
        op._modules[b] = _Covers(b, dims.get(b, ()))
    monkeypatch.setattr(op, "runs", lambda b, device: b in runs)
    monkeypatch.setattr(tk_backends, "WARNED", set())
    return op


def _resolving_to(op, monkeypatch, name):
    monkeypatch.setattr(op, "resolve", lambda backend, device: name)


def test_select_covered_runs_as_asked(monkeypatch):
    op = _op(monkeypatch, triton=(8,), cuda=(8,))
    _resolving_to(op, monkeypatch, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select(op, "cuda", torch.zeros(2, 8)) == "cuda"


def test_select_falls_back_down_the_chain_once_per_reason(monkeypatch):
    op = _op(monkeypatch, triton=(8, 16), cuda=(8,))
    _resolving_to(op, monkeypatch, "cuda")
    with pytest.warns(UserWarning, match=r"^transfusion_kernels fallback: cover_op on backend 'cuda' does not "
                                         r"support last dim 16 \(cuda\); running on 'triton' instead$"):
        assert select(op, "cuda", torch.zeros(2, 16)) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same (op, backend, reason): silent
        assert select(op, "cuda", torch.zeros(2, 16)) == "triton"
    with pytest.warns(UserWarning, match="last dim 32 \\(cuda\\); running on 'reference'"):
        assert select(op, "cuda", torch.zeros(2, 32)) == "reference"  # triton does not cover 32 either


def test_select_skips_a_backend_that_cannot_run(monkeypatch):
    op = _op(monkeypatch, runs=("reference", "cuda"), triton=(16,), cuda=(8,))
    _resolving_to(op, monkeypatch, "cuda")
    with pytest.warns(UserWarning, match="running on 'reference'"):
        assert select(op, "cuda", torch.zeros(2, 16)) == "reference"


def test_select_auto_tries_triton_then_cuda_and_warns_only_on_the_reference(monkeypatch):
    assert AUTO_ORDER == ("triton", "cuda")
    op = _op(monkeypatch, triton=(8,), cuda=(8, 16))
    _resolving_to(op, monkeypatch, "triton")  # what auto resolves to on a GPU with both
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select(op, "auto", torch.zeros(2, 8)) == "triton"
        assert select(op, "auto", torch.zeros(2, 16)) == "cuda"  # quietly: a kernel still runs
    with pytest.warns(UserWarning, match="cover_op on backend 'triton' does not support last dim 32 "
                                         r"\(triton\); running on 'reference'"):
        assert select(op, "auto", torch.zeros(2, 32)) == "reference"


def test_every_kernel_backend_module_declares_its_coverage():
    from transfusion_kernels.attention import ATTENTION
    from transfusion_kernels.diffusion import AFFINE_STEP, LOSS
    from transfusion_kernels.timestep import TIMESTEP

    for op in (ATTENTION, TIMESTEP, AFFINE_STEP, LOSS):
        for b in ("triton", "cuda"):
            if op.has(b) and (b != "triton" or tk_backends.triton_interpret() or torch.cuda.is_available()):
                assert callable(getattr(op.module(b), op.covers)), (op.name, b)


# ---- the extension probe -------------------------------------------------------------------
def test_missing_extension_reason_names_the_fix():
    ext, reason = extension_status("transfusion_kernels._C_not_built")
    assert ext is None
    assert reason.startswith("the extension transfusion_kernels._C_not_built is not built: install with nvcc on PATH")
    assert "circular" not in reason


def test_package_import_does_not_import_the_extension():
    code = ("import sys, transfusion_kernels as tk; assert 'transfusion_kernels._C' not in sys.modules; "
            "info = tk.available_backends('cpu')['cuda']; assert 'circular' not in info.reason, info.reason")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_constant_marker_is_torchs():
    """backends marks its imports and probes as torch.compiler.assume_constant_result does, without
    importing torch._dynamo at package import."""
    from torch._dynamo import assume_constant_result

    assert assume_constant_result(lambda: 0).__dict__ == {"_dynamo_marked_constant": True}
    for fn in (tk_backends._import, tk_backends._module_exists, tk_backends.load_extension):
        assert fn._dynamo_marked_constant is True
