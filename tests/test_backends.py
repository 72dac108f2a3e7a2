import logging
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels import backends as tk_backends
from transfusion_kernels.backends import AUTO_ORDER, BACKENDS, ENV_VAR, Op, extension_status, select

CPU = torch.device("cpu")


class _Covers:
    """A stand-in backend module: covers inputs whose last dim is in ``dims``."""

    def __init__(self, name, dims):
        self.name, self.dims = name, dims

    def supports(self, x):
        return None if x.shape[-1] in self.dims else f"last dim {x.shape[-1]} ({self.name})"


class _OnGPU:
    """Stands in for a CUDA tensor (select reads .device, the stand-in modules .shape)."""

    device = torch.device("cuda", 0)

    def __init__(self, *shape):
        self.shape = shape


def _op(monkeypatch, runs=("reference",), **dims):
    """An op whose triton / cuda modules cover the last dims given, and whose backends in ``runs``
    (only those) can run on any device."""
    op = Op("cover_op", {b: "transfusion_kernels.attention.reference" for b in BACKENDS})
    for b in ("triton", "cuda"):
        op._modules[b] = _Covers(b, dims.get(b, ()))

    def info(name, device):
        return tk_backends.BackendInfo(name, name in runs, "stand-in")

    monkeypatch.setattr(tk_backends, "backend_info", info)
    monkeypatch.setattr(tk_backends, "WARNED", set())
    return op


def test_precedence(monkeypatch):
    op = _op(monkeypatch)
    x = torch.zeros(2, 8)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select(op, None, x) == "reference"  # auto on the CPU
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select(op, None, x) == "reference"
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(tk.BackendUnavailableError, match="cuda"):
        select(op, None, x)
    with tk.use_backend("reference"):  # the block wins over the environment
        assert select(op, None, x) == "reference"
        with tk.use_backend("auto"):
            assert select(op, None, x) == "reference"
        with pytest.raises(tk.BackendUnavailableError):
            select(op, "cuda", x)  # the argument wins over the block
    with pytest.raises(tk.BackendUnavailableError):
        select(op, None, x)  # the block ended: the environment again


def test_unknown_names(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        select(_op(monkeypatch), "fast", torch.zeros(2))
    with pytest.raises(ValueError, match="unknown backend"):
        with tk.use_backend("fast"):
            pass
    partial = Op("partial_op", {"reference": "transfusion_kernels.attention.reference"})
    with pytest.raises(tk.BackendUnavailableError, match="'triton' is not implemented for partial_op"):
        select(partial, "triton", torch.zeros(2))


def test_unavailable_error_says_why_and_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    op = Op("demo_op", {b: "transfusion_kernels.attention.reference" for b in BACKENDS})
    with pytest.raises(tk.BackendUnavailableError, match="TRITON_INTERPRET=1.*backend='auto'"):
        select(op, "triton", torch.zeros(2))
    with pytest.raises(tk.BackendUnavailableError, match="'cuda' cannot run here"):
        select(op, "cuda", torch.zeros(2))


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


# ---- strict dispatch: a named backend runs or raises; only "auto" chooses ------------------
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_a_named_backend_that_does_not_cover_the_inputs_raises(monkeypatch, name):
    op = _op(monkeypatch, runs=BACKENDS, triton=(8,), cuda=(8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select(op, name, torch.zeros(2, 8)) == name
    with pytest.raises(
        tk.BackendUnavailableError,
        match=rf"^cover_op: backend '{name}' does not cover these inputs: "
        rf"last dim 16 \({name}\)\. Use backend='auto'",
    ):
        select(op, name, torch.zeros(2, 16))
    with tk.use_backend(name), pytest.raises(tk.BackendUnavailableError, match="last dim 16"):
        select(op, None, torch.zeros(2, 16))  # named by the block: as strict


def test_auto_on_a_gpu_tries_triton_then_cuda_then_the_reference(monkeypatch):
    assert AUTO_ORDER == ("triton", "cuda")
    op = _op(monkeypatch, runs=BACKENDS, triton=(8,), cuda=(8, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select(op, "auto", _OnGPU(2, 8)) == "triton"
        assert select(op, "auto", _OnGPU(2, 16)) == "cuda"  # quietly: a kernel still runs
    with pytest.warns(
        UserWarning,
        match=r"cover_op: backend 'auto' runs on 'reference';  triton does not cover "
        r"these inputs: last dim 32 \(triton\);  cuda does not cover",
    ):
        assert select(op, "auto", _OnGPU(2, 32)) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same op and reasons: warned once
        assert select(op, "auto", _OnGPU(2, 32)) == "reference"


def test_auto_skips_a_backend_that_cannot_run(monkeypatch):
    op = _op(monkeypatch, runs=("reference", "cuda"), triton=(8,), cuda=(8,))
    assert select(op, "auto", _OnGPU(2, 8)) == "cuda"


def test_auto_on_the_cpu_is_the_reference_without_a_warning(monkeypatch):
    op = _op(monkeypatch, runs=BACKENDS, triton=(8,), cuda=(8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select(op, "auto", torch.zeros(2, 8)) == "reference"


def test_explain_says_what_runs_and_why_without_running_it(monkeypatch):
    mask = tk.HybridMask.causal(torch.tensor([0, 4], dtype=torch.int32))
    q = torch.randn(4, 1, 8)
    calls = []
    monkeypatch.setattr(tk_backends.Op, "module", lambda self, b: calls.append(b))  # a kernel would call it
    choice = tk.explain("hybrid_attention", q, q, q, mask)
    assert (choice.op, choice.requested, choice.backend, choice.passed_over) == (
        "hybrid_attention",
        "auto",
        "reference",
        (),
    )
    assert str(choice) == "hybrid_attention: backend 'auto' runs on 'reference'"
    choice = tk.explain(tk.hybrid_attention, q, q, q, mask, backend="cuda")
    assert choice.backend is None and choice.passed_over[0][0] == "cuda"
    assert "raises BackendUnavailableError" in str(choice) and "cannot run here" in str(choice)
    x = torch.randn(2, 4)
    assert (
        tk.explain("add_noise", x, 3, tk.DiffusionSchedule()).op == "add_noise"
    )  # the public function, not the internal op
    assert calls == []
    with pytest.raises(ValueError, match="unknown op 'attention'"):
        tk.explain("attention", q)


def test_debug_log_says_what_ran(caplog):
    x = torch.randn(2, 4)
    with caplog.at_level(logging.DEBUG, logger="transfusion_kernels"):
        tk.add_noise(x, 3, tk.DiffusionSchedule(), seed=0, backend="reference")
    assert "add_noise: backend 'reference' runs on 'reference'" in caplog.text


# ---- compute capabilities against the extension's archs -----------------------------------
DEFAULT_BUILD = ("sm_80+PTX", "sm_90a")
CAPABILITIES = {
    "sm_75": (7, 5),
    "sm_80": (8, 0),
    "sm_89": (8, 9),
    "sm_90": (9, 0),
    "sm_100": (10, 0),
    "sm_120": (12, 0),
}
# (archs the extension was built for, GPU) -> (triton runs, cuda runs)
TABLE = {
    (DEFAULT_BUILD, "sm_75"): (False, False),
    (DEFAULT_BUILD, "sm_80"): (True, True),
    (DEFAULT_BUILD, "sm_89"): (True, True),  # sm_80 SASS runs on 8.x
    (DEFAULT_BUILD, "sm_90"): (True, True),
    (DEFAULT_BUILD, "sm_100"): (True, True),  # compute_80 PTX, JIT-compiled by the driver
    (DEFAULT_BUILD, "sm_120"): (True, True),
    (("sm_80", "sm_90a"), "sm_89"): (True, True),
    (("sm_80", "sm_90a"), "sm_100"): (True, False),  # no PTX: no kernel image for Blackwell
    (("sm_80", "sm_90a"), "sm_120"): (True, False),
    (("sm_90a",), "sm_80"): (True, False),
    (("sm_90a",), "sm_90"): (True, True),
    (("sm_90",), "sm_90"): (True, True),  # sm_90 SASS: the mma.sync kernels (attention's wgmma path needs sm_90a)
    (("sm_90",), "sm_100"): (True, False),
}


@pytest.mark.parametrize("archs,gpu", sorted(TABLE), ids=[f"{'+'.join(a)}-on-{g}" for a, g in sorted(TABLE)])
def test_capability_table_with_faked_devices(monkeypatch, archs, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tk_backends, "_triton_import_error", lambda: None)
    monkeypatch.setattr(tk_backends, "load_extension", lambda: (object(), None))
    monkeypatch.setattr(tk_backends, "_cuda_status", lambda: {"device_count": 1, "error": ""})
    monkeypatch.setattr(tk_backends, "extension_archs", lambda: archs)
    monkeypatch.setattr(tk_backends, "device_capability", lambda index: CAPABILITIES[gpu])
    info = tk.available_backends(torch.device("cuda", 0))
    assert (info["triton"].available, info["cuda"].available) == TABLE[archs, gpu], info
    assert info["reference"].available
    if not info["cuda"].available:
        assert gpu in info["cuda"].reason
        assert ("compute capability 8.0 or newer" if gpu == "sm_75" else f"built for {', '.join(archs)}") in info[
            "cuda"
        ].reason
    if not info["triton"].available:
        assert "compute capability 8.0 or newer" in info["triton"].reason


@pytest.mark.parametrize(
    "arch,capability,runs",
    [
        ("sm_80", (8, 0), True),
        ("sm_80", (8, 6), True),
        ("sm_80", (9, 0), False),
        ("sm_86", (8, 0), False),
        ("sm_90a", (9, 0), True),
        ("sm_90a", (10, 0), False),
        ("sm_80+PTX", (12, 0), True),
        ("sm_90+PTX", (8, 9), False),
        ("sm_100", (10, 3), True),
        ("sm_120", (12, 0), True),
        ("compute_80", (8, 0), False),
    ],
)
def test_arch_runs_on(arch, capability, runs):
    assert tk_backends._arch_runs_on(arch, capability) is runs


# ---- per thread, and traced by torch.compile -------------------------------------------------
def test_use_backend_is_per_thread(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def other():
        with tk.use_backend("triton"):
            seen["other, inside its block"] = tk_backends.requested_backend()
            inside.set()
            done.wait(10)

    t = threading.Thread(target=other)
    with tk.use_backend("reference"):
        t.start()
        assert inside.wait(10)
        seen["main, during the other's block"] = tk_backends.requested_backend()
        done.set()
        t.join(10)
    assert seen == {"other, inside its block": "triton", "main, during the other's block": "reference"}
    assert tk_backends.requested_backend() == "auto"


def test_use_backend_traces_under_fullgraph_compile(monkeypatch):
    """The block is read (and guarded on) inside a fullgraph-compiled function: a block naming a
    backend that cannot run here raises in the compiled call as in eager mode."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    sched = tk.DiffusionSchedule()

    def f(x0, t):
        return tk.add_noise(x0, t, sched, seed=7)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x0, t = torch.randn(3, 8), torch.tensor([1, 10, 100])
    with tk.use_backend("reference"):
        torch.testing.assert_close(compiled(x0, t), f(x0, t), rtol=0, atol=0)
    with tk.use_backend("cuda"), pytest.raises(Exception) as raised:  # noqa: PT011
        compiled(x0, t)
    # fullgraph: dynamo reports the traced raise as Unsupported, caused by the op's error
    chain = [raised.value, raised.value.__cause__]
    assert any(
        isinstance(e, tk.BackendUnavailableError) or "BackendUnavailableError" in type(e).__name__ for e in chain
    ), chain
    assert "'cuda' cannot run here" in " ".join(str(e) for e in chain)


def _op_calls():
    """(public op, positional arguments, keyword arguments): a valid CPU call of every op."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, generator=gen)
    t = torch.tensor([1, 5, 10, 20])
    sched = tk.DiffusionSchedule()
    idx = torch.tensor([0, 0, 1, -1], dtype=torch.int32)
    q = torch.randn(6, 2, 8, generator=gen)
    mask = tk.HybridMask.causal(torch.tensor([0, 6], dtype=torch.int32))
    return {
        "hybrid_attention": (tk.hybrid_attention, (q, q, q, mask), {}),
        "patch_timestep_embedding": (tk.patch_timestep_embedding, (x, t[:2], idx), {"freq_dim": 8}),
        "add_noise": (tk.add_noise, (x, t, sched), {}),
        "ddpm_step": (tk.ddpm_step, (x, 10, x, sched), {}),
        "ddim_step": (tk.ddim_step, (x, 10, x, sched), {"prev_timestep": 5}),
        "diffusion_loss": (tk.diffusion_loss, (x, x, idx), {}),
        "flow_add_noise": (tk.flow_add_noise, (x, 0.5), {}),
        "flow_euler_step": (tk.flow_euler_step, (x, 0.5, 0.25, x), {}),
        "flow_loss": (tk.flow_loss, (x, x, x, idx), {}),
    }


@pytest.mark.parametrize("name", sorted(_op_calls()))
def test_every_op_refuses_a_named_backend_that_cannot_run(monkeypatch, name):
    """Each op: backend="cuda" and backend="triton" (no interpreter) on CPU tensors raise, naming
    the public function called and the reason; "auto" runs the reference, and explain says so
    without running."""
    fn, args, kwargs = _op_calls()[name]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(tk.BackendUnavailableError, match=f"^{name}: backend 'cuda' cannot run here: "):
        fn(*args, **kwargs, backend="cuda")
    with pytest.raises(
        tk.BackendUnavailableError, match="backend 'triton' cannot run here: triton needs a CUDA device"
    ):
        fn(*args, **kwargs, backend="triton")
    assert tk.explain(fn, *args, **kwargs).backend == "reference"
    choice = tk.explain(name, *args, **kwargs, backend="cuda")
    assert choice.backend is None and "cannot run here" in choice.passed_over[0][1]
    fn(*args, **kwargs, backend="auto")


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
    code = (
        "import sys, transfusion_kernels as tk; assert 'transfusion_kernels._C' not in sys.modules; "
        "info = tk.available_backends('cpu')['cuda']; assert 'circular' not in info.reason, info.reason"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_constant_marker_is_torchs():
    """backends marks its imports and probes as torch.compiler.assume_constant_result does, without
    importing torch._dynamo at package import."""
    from torch._dynamo import assume_constant_result

    assert assume_constant_result(lambda: 0).__dict__ == {"_dynamo_marked_constant": True}
    for fn in (
        tk_backends._import,
        tk_backends._module_exists,
        tk_backends.load_extension,
        tk_backends.device_capability,
        tk_backends.extension_archs,
        tk_backends._capability_reason,
    ):
        assert fn._dynamo_marked_constant is True
