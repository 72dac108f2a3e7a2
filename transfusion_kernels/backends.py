"""Backend selection: which implementation of an op runs, for every op.

Precedence: the op's ``backend=`` argument, then the innermost ``use_backend(...)`` block, then
the environment variable ``TRANSFUSION_KERNELS_BACKEND``, then ``"auto"``. ``"auto"`` picks the
first backend of ``AUTO_ORDER`` that can run on the tensors' device and covers the inputs; the
reference on the CPU (the Triton interpreter is for tests, not for speed).

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
import os
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "TRANSFUSION_KERNELS_BACKEND"
EXTENSION = "transfusion_kernels._C"
# What "auto" tries on a GPU: triton first until a GPU run has validated and timed the CUDA kernels.
AUTO_ORDER = ("triton", "cuda")
# Where a requested backend's uncovered inputs go: the next one here that can run and covers them.
FALLBACK_ORDER = ("cuda", "triton", "reference")


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
        return f"triton is not importable ({e}); pip install 'triton>=3.6'"
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
            _EXTENSIONS[name] = (None, f"the extension {name} is not built: install with nvcc on PATH "
                                       "(or TRANSFUSION_BUILD_CUDA=1): pip install -e . in a checkout, "
                                       "or pip install of the sdist" + (f"; the install said: {skipped}" if skipped else ""))
        else:
            try:
                _EXTENSIONS[name] = (importlib.import_module(name), None)
            except ImportError as e:
                _EXTENSIONS[name] = (None, f"the extension {name} is built but does not load ({e}); "
                                           "rebuild it against this Python and CUDA: pip install -e .")
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


def backend_info(name: str, device: torch.device) -> BackendInfo:
    """Whether backend ``name`` can run on ``device`` here, and why (not)."""
    if name == "reference":
        return BackendInfo(name, True, "plain PyTorch, runs on any device")
    if name == "triton":
        err = _triton_import_error()
        if err:
            return BackendInfo(name, False, err)
        if device.type == "cuda":
            return BackendInfo(name, True, "triton kernels on the GPU")
        if device.type == "cpu" and triton_interpret():
            return BackendInfo(name, True, "triton interpreter on the CPU (TRITON_INTERPRET=1; slow, for tests)")
        return BackendInfo(
            name, False, f"triton needs a CUDA device, or TRITON_INTERPRET=1 for {device.type} tensors"
        )
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
            return BackendInfo(name, False, f"the extension sees no CUDA device ({status['error']}); "
                               "update the NVIDIA driver or rebuild with a matching CUDA toolkit")
        return BackendInfo(name, True, "compiled CUDA C++ kernels")
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")


def available_backends(device: torch.device | str | None = None) -> dict[str, BackendInfo]:
    """Every backend with whether it can run here and why (not). ``device`` defaults to the GPU
    when one is visible, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: backend_info(name, device) for name in BACKENDS}


# A plain list (not a ContextVar) so torch.compile can trace the lookup without a graph break.
_STACK: list[str] = []


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` ("reference", "triton", "cuda", "auto")."""
    _check_name(name)
    _STACK.append(name)
    try:
        yield
    finally:
        _STACK.pop()


def _check_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")


def requested_backend(backend: str | None = None) -> str:
    if backend is not None:
        name = backend
    elif _STACK:
        name = _STACK[-1]
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
        _OPS.append(self)

    def has(self, backend: str) -> bool:
        """Whether this op has an implementation for ``backend`` (its module exists)."""
        return backend in self.impls and _module_exists(self.impls[backend])

    def runs(self, backend: str, device: torch.device) -> bool:
        return self.has(backend) and backend_info(backend, device).available

    def resolve(self, backend: str | None, device: torch.device) -> str:
        """The backend a request names, checked to run on ``device`` (coverage aside)."""
        name = requested_backend(backend)
        if name == "auto":
            return next((c for c in AUTO_ORDER if device.type == "cuda" and self.runs(c, device)), "reference")
        if not self.has(name):
            have = ", ".join(b for b in self.impls if self.has(b))
            raise BackendUnavailableError(
                f"{self.name} has no {name!r} implementation (it has: {have}); "
                f"pass backend='reference' or backend='auto'"
            )
        info = backend_info(name, device)
        if not info.available:
            raise BackendUnavailableError(
                f"{self.name}: backend {name!r} cannot run here: {info.reason}. "
                f"Use backend='auto' or 'reference' (argument, tk.use_backend, or {ENV_VAR})."
            )
        return name

    def not_covered(self, backend: str, *inputs) -> str | None:
        """Why ``backend``'s kernels do not cover ``inputs`` (None when they do)."""
        if backend == "reference":
            return None
        return getattr(self.module(backend), self.covers)(*inputs)

    def module(self, backend: str):
        if backend not in self._modules:
            self._modules[backend] = _import(self.impls[backend])
        return self._modules[backend]


@_constant
def _import(path: str):
    return importlib.import_module(path)


_OPS: list[Op] = []
WARNED: set[tuple[str, str, str]] = set()  # (op, backend, reason) already warned about in this process


def _warn_fallback(op: str, backend: str, reason: str, used: str) -> None:
    key = (op, backend, reason)
    if key in WARNED or torch.compiler.is_compiling():
        return
    WARNED.add(key)
    warnings.warn(f"transfusion_kernels fallback: {op} on backend {backend!r} does not support {reason}; "
                  f"running on {used!r} instead", stacklevel=4)


def select(op: Op, requested: str | None, *inputs) -> str:
    """The backend that runs ``op`` on ``inputs`` (the first is a tensor on the op's device).

    Resolve the request (unknown or unavailable: BackendUnavailableError); if that backend's
    kernels do not cover the inputs, take the next one that can run here and covers them:
    ``FALLBACK_ORDER`` after a requested backend, ``AUTO_ORDER`` then the reference under
    "auto". One warning per (op, backend, reason) and process, under "auto" only when the run
    ends on the reference."""
    device = inputs[0].device
    name = op.resolve(requested, device)
    reason = op.not_covered(name, *inputs)
    if reason is None:
        return name
    auto = requested_backend(requested) == "auto"
    order = AUTO_ORDER + ("reference",) if auto else FALLBACK_ORDER
    used = next(c for c in order[order.index(name) + 1:]
                if c == "reference" or (op.runs(c, device) and op.not_covered(c, *inputs) is None))
    if not auto or used == "reference":
        _warn_fallback(op.name, name, reason, used)
    return used

