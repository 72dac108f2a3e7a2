"""Backend selection: which implementation of an op runs.

Precedence: the op's ``backend=`` argument, then the innermost ``use_backend(...)`` block, then
the environment variable ``TRANSFUSION_KERNELS_BACKEND``, then ``"auto"``. ``"auto"`` picks the
fastest backend that can run on the tensors' device: cuda, then triton on a GPU; reference on the
CPU (the Triton interpreter is for tests, not for speed).

Each op folder registers its implementations by module path, so a backend's module (and its
heavy imports: triton, the compiled extension) is only imported when that backend is used.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "TRANSFUSION_KERNELS_BACKEND"


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


@_once
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({e}); pip install 'triton>=3.6'"
    return None


@_once
def load_extension():
    """The compiled CUDA module ``transfusion_kernels._C``, or the reason it cannot be loaded."""
    try:
        from transfusion_kernels import _C
    except ImportError as e:
        return None, (
            f"the CUDA extension transfusion_kernels._C is not built ({e}); install with nvcc on "
            "PATH (or TRANSFUSION_BUILD_CUDA=1): pip install -e ."
        )
    return _C, None


@_once
def _cuda_status() -> dict:
    ext, _ = load_extension()
    return dict(ext.cuda_status())


def _info(name: str, device: torch.device) -> BackendInfo:
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
    return {name: _info(name, device) for name in BACKENDS}


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


def _module_exists(path: str) -> bool:
    if path not in _EXISTS:
        _EXISTS[path] = importlib.util.find_spec(path) is not None
    return _EXISTS[path]


class Op:
    """One public op: its name and where each backend's implementation lives.

    ``impls`` maps backend name -> module path; the module must define the functions the op's
    dispatcher calls (see each op's ``__init__.py``)."""

    def __init__(self, name: str, impls: dict[str, str], gpu_order: tuple[str, ...] = ("cuda", "triton")):
        self.name = name
        self.impls = impls
        self.gpu_order = gpu_order  # what "auto" tries on a GPU, fastest first
        self._modules: dict[str, object] = {}
        _OPS.append(self)

    def has(self, backend: str) -> bool:
        """Whether this op has an implementation for ``backend`` (its module exists)."""
        return backend in self.impls and _module_exists(self.impls[backend])

    def resolve(self, backend: str | None, device: torch.device) -> str:
        name = requested_backend(backend)
        if name == "auto":
            for cand in self.gpu_order if device.type == "cuda" else ():
                if self.has(cand) and _info(cand, device).available:
                    return cand
            return "reference"
        if not self.has(name):
            have = ", ".join(b for b in self.impls if self.has(b))
            raise BackendUnavailableError(
                f"{self.name} has no {name!r} implementation (it has: {have}); "
                f"pass backend='reference' or backend='auto'"
            )
        info = _info(name, device)
        if not info.available:
            raise BackendUnavailableError(
                f"{self.name}: backend {name!r} cannot run here: {info.reason}. "
                f"Use backend='auto' or 'reference' (argument, tk.use_backend, or {ENV_VAR})."
            )
        return name

    def module(self, backend: str):
        if backend not in self._modules:
            self._modules[backend] = importlib.import_module(self.impls[backend])
        return self._modules[backend]

    def preload(self) -> None:
        """Import every backend module that can load, so that torch.compile finds them in a
        dict (it cannot trace an import)."""
        for backend in self.impls:
            usable = backend == "reference" or (
                backend == "triton" and _triton_import_error() is None
            ) or (backend == "cuda" and load_extension()[1] is None)
            if usable and self.has(backend):
                self.module(backend)


_OPS: list[Op] = []


def preload_all() -> None:
    """Called once at the end of ``import transfusion_kernels``, after every op registered."""
    for op in _OPS:
        op.preload()
