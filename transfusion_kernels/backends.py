"""Backend selection: which implementation of an op runs, for every op.

Precedence: the op's ``backend=`` argument, then the innermost ``use_backend(...)`` block of
this thread, then the environment variable ``TRANSFUSION_KERNELS_BACKEND``, then ``"auto"``.

Strict: a named backend runs, or :class:`BackendUnavailableError` says why it cannot (not built,
not importable, the wrong device, a GPU it has no code for, inputs its kernels do not cover).
Only ``"auto"`` chooses: on a GPU the first backend of ``AUTO_ORDER`` that can run there and
covers the inputs, else the reference; on the CPU the reference (the Triton interpreter is for
tests, not for speed). :func:`explain` (``tk.explain``) and the ``transfusion_kernels`` logger at
DEBUG level say what was chosen and why.

Each kernel backend declares the compute capabilities it runs on (``MIN_CAPABILITY``); the cuda
backend also needs code for the device in the extension, checked against the archs it was built
for (``build_info()["archs"]``: ``sm_80`` SASS runs on 8.x, ``sm_90a`` only on 9.0, ``+PTX``
on that capability and every newer one).

Each op registers its implementations by module path, so a backend's module (and its heavy
imports: triton, the compiled extension) is only imported when that backend is first selected.
The imports and probes are ``torch.compiler.assume_constant_result`` functions: a first call
under ``torch.compile(fullgraph=True)`` runs them at trace time instead of breaking the graph.
A kernel backend's module declares what its kernels cover with a function (``supports`` unless the op
names another) that returns why it does not cover the inputs, or None. :func:`select` is the one
place that turns a request into the backend that runs (docs/design.md §3).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import re
import threading
import warnings
from dataclasses import dataclass, field

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "TRANSFUSION_KERNELS_BACKEND"
EXTENSION = "transfusion_kernels._C"
# What "auto" tries on a GPU: triton first until a GPU run has validated and timed the CUDA kernels.
AUTO_ORDER = ("triton", "cuda")
# The lowest compute capability each kernel backend runs on: both use bf16 tensor-core mma
# (mma.sync in CUDA C++, tl.dot in Triton), which Ampere (8.0) introduced.
MIN_CAPABILITY = {"triton": (8, 0), "cuda": (8, 0)}
_LOG = logging.getLogger("transfusion_kernels")


def _once(probe):
    """Memoise a no-argument probe in a plain dict: torch.compile traces the lookup quietly
    (it warns about functools.lru_cache)."""
    memo: dict = {}

    def cached():
        if "value" not in memo:
            memo["value"] = probe()
        return memo["value"]

    cached.__doc__ = probe.__doc__
    return cached


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot run the op on the given tensors."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why it can (or cannot) run here, and what to do about it

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _constant(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (seconds, and
    triton with it) when the package is imported: that decorator only sets this attribute
    (tests/test_backends.py checks it)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant
@_once
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({e}); pip install 'transfusion-kernels[triton]'"
    return None


_EXTENSIONS: dict[str, tuple] = {}


def build_record() -> dict:
    """What the install built, from transfusion_kernels/_build_info.json (written by setup.py):
    version, commit, and the extension's archs and CUDA version or why it was not built. Empty
    when the install predates the record."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def extension_status(name: str = EXTENSION) -> tuple:
    """(module, None) for the compiled extension ``name``, or (None, why it cannot load and what
    to do). A missing extension is found without importing anything, so the probe is safe while
    the package itself is being imported."""
    if name not in _EXTENSIONS:
        if importlib.util.find_spec(name) is None:
            skipped = build_record().get("cuda_extension", {}).get("reason") if name == EXTENSION else None
            _EXTENSIONS[name] = (
                None,
                f"the extension {name} is not built: install with nvcc on PATH "
                "(or TRANSFUSION_BUILD_CUDA=1): pip install -e . in a checkout, "
                "or pip install of the sdist" + (f"; the install said: {skipped}" if skipped else ""),
            )
        else:
            try:
                _EXTENSIONS[name] = (importlib.import_module(name), None)
            except ImportError as e:
                _EXTENSIONS[name] = (
                    None,
                    f"the extension {name} is built but does not load ({e}); "
                    "rebuild it against this Python and CUDA: pip install -e .",
                )
    return _EXTENSIONS[name]


@_constant
def load_extension():
    """The compiled CUDA module ``transfusion_kernels._C``, or the reason it cannot be loaded."""
    return extension_status(EXTENSION)


def require_extension():
    """The loaded extension, or BackendUnavailableError saying why it cannot load and the fix."""
    ext, err = load_extension()
    if ext is None:
        raise BackendUnavailableError(err)
    return ext


def extension_built(name: str = EXTENSION) -> bool:
    """Whether the extension's file exists (no import)."""
    return importlib.util.find_spec(name) is not None


@_constant
@_once
def _cuda_status() -> dict:
    ext, _ = load_extension()
    return dict(ext.cuda_status())


@_constant
def device_capability(index: int) -> tuple[int, int]:
    """(major, minor) of CUDA device ``index``."""
    return tuple(torch.cuda.get_device_capability(index))


@_constant
def extension_archs() -> tuple[str, ...]:
    """The archs the loaded extension holds code for, e.g. ("sm_80+PTX", "sm_90a")."""
    ext, _ = load_extension()
    return tuple(ext.build_info()["archs"])


def _arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` ("sm_80", "sm_90a", "sm_80+PTX", "sm_120") runs on a device
    of ``capability``: SASS on the same major version at an equal or higher minor, arch-specific
    SASS (the "a" targets) on that capability only, PTX on that capability and every newer one."""
    m = re.fullmatch(r"sm_(\d+)(\d)(a?)(\+PTX)?", arch)
    if m is None:
        return False
    built = (int(m[1]), int(m[2]))
    if m[4]:
        return capability >= built
    if m[3]:
        return capability == built
    return capability[0] == built[0] and capability[1] >= built[1]


@_constant  # a regex: torch.compile evaluates it at trace time rather than tracing it
def _capability_reason(name: str, capability: tuple[int, int]) -> str | None:
    """Why backend ``name`` cannot run on a device of ``capability`` (None when it can)."""
    sm = f"sm_{capability[0]}{capability[1]}"
    lowest = MIN_CAPABILITY[name]
    if capability < lowest:
        return (
            f"the {name} kernels need compute capability {lowest[0]}.{lowest[1]} or newer (bf16 tensor cores); "
            f"this GPU is {sm}: use backend='reference' or 'auto'"
        )
    if name == "cuda":
        archs = extension_archs()
        if not any(_arch_runs_on(a, capability) for a in archs):
            return (
                f"the extension has no code for {sm} (built for {', '.join(archs)}); rebuild it with "
                f"TRANSFUSION_CUDA_ARCHS including {capability[0]}{capability[1]} or 80+PTX: pip install -e ."
            )
    return None


def backend_info(name: str, device: torch.device) -> BackendInfo:
    """Whether backend ``name`` can run on ``device`` here, and why (not)."""
    if name == "reference":
        return BackendInfo(name, True, "plain PyTorch, runs on any device")
    if name == "triton":
        err = _triton_import_error()
        if err:
            return BackendInfo(name, False, err)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            why = _capability_reason(name, device_capability(index))
            if why:
                return BackendInfo(name, False, why)
            return BackendInfo(name, True, "triton kernels on the GPU")
        if device.type == "cpu" and triton_interpret():
            return BackendInfo(name, True, "triton interpreter on the CPU (TRITON_INTERPRET=1; slow, for tests)")
        return BackendInfo(name, False, f"triton needs a CUDA device, or TRITON_INTERPRET=1 for {device.type} tensors")
    if name == "cuda":
        ext, err = load_extension()
        if err:
            return BackendInfo(name, False, err)
        if device.type != "cuda":
            return BackendInfo(name, False, f"the cuda backend needs CUDA tensors, got {device.type} tensors")
        if not torch.cuda.is_available():
            return BackendInfo(name, False, "no CUDA device is visible to torch")
        status = _cuda_status()
        if status["device_count"] == 0:
            # The extension's statically linked runtime may need a newer driver than torch's.
            return BackendInfo(
                name,
                False,
                f"the extension sees no CUDA device ({status['error']}); "
                "update the NVIDIA driver or rebuild with a matching CUDA toolkit",
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        why = _capability_reason(name, device_capability(index))
        if why:
            return BackendInfo(name, False, why)
        return BackendInfo(name, True, "compiled CUDA C++ kernels")
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")


def available_backends(device: torch.device | str | None = None) -> dict[str, BackendInfo]:
    """Every backend with whether it can run here and why (not). ``device`` defaults to the GPU
    when one is visible, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: backend_info(name, device) for name in BACKENDS}


# Per thread: the use_backend() blocks, innermost last, and an explain() in progress.
# threading.local, not a ContextVar: torch.compile (2.13) cannot trace ContextVar.get() (a graph
# break), while it reads and guards on this.
_LOCAL = threading.local()


def thread_stack(local: threading.local) -> list:
    """This thread's ``local.stack``, made empty on its first use in the thread."""
    stack = getattr(local, "stack", None)
    if stack is None:
        stack = local.stack = []
    return stack


def _stack() -> list[str]:
    return thread_stack(_LOCAL)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` ("reference", "triton", "cuda", "auto");
    this thread only."""
    _check_name(name)
    stack = _stack()
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _check_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")


def requested_backend(backend: str | None = None) -> str:
    stack = _stack()
    if backend is not None:
        name = backend
    elif stack:
        name = stack[-1]
    else:
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
    _check_name(name)
    return name


_EXISTS: dict[str, bool] = {}  # a plain dict: torch.compile traces a lookup without warnings


@_constant
def _module_exists(path: str) -> bool:
    if path not in _EXISTS:
        _EXISTS[path] = importlib.util.find_spec(path) is not None
    return _EXISTS[path]


class Op:
    """One op: its name, where each backend's implementation lives (backend -> module path), and
    the name of the function in a kernel backend's module that says what its kernels cover
    (called with the inputs ``select`` gets; returns a reason, or None when covered)."""

    def __init__(self, name: str, impls: dict[str, str], covers: str = "supports"):
        self.name = name
        self.impls = impls
        self.covers = covers
        self._modules: dict[str, object] = {}

    def has(self, backend: str) -> bool:
        """Whether this op has an implementation for ``backend`` (its module exists)."""
        return backend in self.impls and _module_exists(self.impls[backend])

    def why_not(self, backend: str, device: torch.device, *inputs) -> str | None:
        """Why ``backend`` cannot run this op on ``inputs`` on ``device`` (None when it can)."""
        if backend == "reference" and backend in self.impls:
            return None  # plain PyTorch: any device, any input the op accepts
        if not self.has(backend):
            have = ", ".join(b for b in self.impls if self.has(b))
            return f"is not implemented for {self.name} (it has: {have})"
        info = backend_info(backend, device)
        if not info.available:
            return f"cannot run here: {info.reason}"
        reason = self.not_covered(backend, *inputs)
        return None if reason is None else f"does not cover these inputs: {reason}"

    def not_covered(self, backend: str, *inputs) -> str | None:
        """Why ``backend``'s kernels do not cover ``inputs`` (None when they do)."""
        if backend == "reference":
            return None
        return getattr(self.module(backend), self.covers)(*inputs)

    def module(self, backend: str):
        if backend not in self._modules:
            path = self.impls[backend]
            _import(path)
            # read back from sys.modules: torch.compile traces a module found there (attribute
            # guards and all), not one returned by an assume_constant_result function
            self._modules[backend] = sys.modules[path]
        return self._modules[backend]


@_constant
def _import(path: str) -> bool:
    importlib.import_module(path)
    return True


@dataclass(frozen=True)
class Choice:
    """What :func:`select` decided for one call: the backend that runs (None: the requested one
    cannot, and the call raises BackendUnavailableError) and the backends passed over, with why."""

    op: str
    requested: str
    backend: str | None
    passed_over: tuple[tuple[str, str], ...] = field(default=())

    def __str__(self) -> str:
        ran = f"runs on {self.backend!r}" if self.backend else "raises BackendUnavailableError"
        lines = [f"{self.op}: backend {self.requested!r} {ran}"]
        lines += [f"  {name} {why}" for name, why in self.passed_over]
        return "\n".join(lines)


class _Explained(BaseException):
    """Carries the Choice out of the op that explain() calls (no kernel runs). A BaseException,
    so that no ``except Exception`` on the way swallows it."""

    def __init__(self, choice: Choice):
        super().__init__(choice)
        self.choice = choice


WARNED: set[tuple[str, str]] = set()  # (op, reasons) whose GPU "auto" run on the reference warned


def _decided(op: str, requested: str, backend: str | None, passed_over: tuple = ()) -> str | None:
    """Report the choice (explain, the debug log, the one warning) and return ``backend``. The
    Choice is made only when one of them needs it: this runs on every op call."""
    if not torch.compiler.is_compiling():
        if getattr(_LOCAL, "explaining", False):
            raise _Explained(Choice(op, requested, backend, passed_over))
        if _LOG.isEnabledFor(logging.DEBUG):
            _LOG.debug("%s", Choice(op, requested, backend, passed_over))
        if backend == "reference" and passed_over and (op, passed_over) not in WARNED:
            # "auto" on a GPU without a kernel for these inputs: a slow run users should hear of
            WARNED.add((op, passed_over))
            choice = Choice(op, requested, backend, passed_over)
            warnings.warn(f"transfusion_kernels fallback: {choice}".replace("\n", ";"), stacklevel=4)
    return backend


def select(op: Op, requested: str | None, *inputs, caller: str | None = None) -> str:
    """The backend that runs ``op`` on ``inputs`` (the first is a tensor on the op's device).

    A named backend runs, or BackendUnavailableError says why it cannot: no implementation, it
    cannot run on this device (not built, not importable, no code for this GPU), or its kernels
    do not cover the inputs. "auto" takes the first backend of ``AUTO_ORDER`` that can run here
    and covers the inputs on a GPU, else the reference (one warning per op and reasons when a GPU
    run ends there); on the CPU the reference. ``caller``: the public function the user called,
    named in the decision and the error (default: the op's name)."""
    what = caller or op.name
    device = inputs[0].device
    name = requested_backend(requested)
    if name != "auto":
        why = op.why_not(name, device, *inputs)
        if why is None:
            return _decided(what, name, name)
        _decided(what, name, None, ((name, why),))
        raise BackendUnavailableError(
            f"{what}: backend {name!r} {why}. Use backend='auto' to let the package choose, or "
            f"'reference' (argument, tk.use_backend, or {ENV_VAR})."
        )
    passed_over = []
    for candidate in AUTO_ORDER if device.type == "cuda" else ():
        why = op.why_not(candidate, device, *inputs)
        if why is None:
            return _decided(what, name, candidate, tuple(passed_over))
        passed_over.append((candidate, why))
    return _decided(what, name, "reference", tuple(passed_over))


def explain(op, *args, **kwargs) -> Choice:
    """Which backend ``op(*args, **kwargs)`` would run on, and why the others would not, without
    running it. ``op`` is a public op (``tk.hybrid_attention``, ``tk.ddpm_step``, ...) or its name::

        print(tk.explain("hybrid_attention", q, k, v, mask, backend="auto"))
    """
    fn = op
    if isinstance(op, str):
        import transfusion_kernels

        fn = getattr(transfusion_kernels, op, None) if op in transfusion_kernels.__all__ else None
        if not callable(fn):
            raise ValueError(f"explain: unknown op {op!r}; pass a public op such as tk.hybrid_attention or its name")
    _LOCAL.explaining = True
    try:
        fn(*args, **kwargs)
    except _Explained as e:
        return e.choice
    finally:
        _LOCAL.explaining = False
    raise ValueError(f"explain: {getattr(fn, '__name__', fn)!r} chose no backend (it is not a kernel op)")
