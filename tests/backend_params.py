"""The backends an op test runs on, skipped with the dispatcher's own reason where one cannot run
here or its kernels do not cover a test's inputs (transfusion_kernels/backends.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

import transfusion_kernels as tk

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
# The cuda backend's correctness tests need a device: marked so that `-m gpu` selects them.
BACKENDS = [pytest.param(b, marks=pytest.mark.gpu if b == "cuda" else ()) for b in ("reference", "triton", "cuda")]
KERNEL_BACKENDS = BACKENDS[1:]


def require(backend: str, device: torch.device = DEVICE) -> None:
    """Skip unless ``backend`` can run on ``device`` here (tk.available_backends says why not)."""
    info = tk.available_backends(device)[backend]
    if not info.available:
        pytest.skip(f"backend {backend!r} cannot run here: {info.reason}")


def kernels(op: str, backend: str):
    """The module of ``op``'s ``backend`` (transfusion_kernels.<op>.<backend>)."""
    return importlib.import_module(f"transfusion_kernels.{op}.{backend}")


def require_covered(op: str, backend: str, *inputs) -> None:
    """Skip unless ``backend``'s kernels cover ``inputs`` (the arguments of the module's
    ``supports``, as the dispatcher passes them)."""
    if backend == "reference":
        return
    why = kernels(op, backend).supports(*inputs)
    if why is not None:
        pytest.skip(f"backend {backend!r} does not cover these inputs: {why}")


def poison(op: str, backend: str, monkeypatch) -> None:
    """Every buffer ``backend`` allocates for ``op`` starts as NaN, so an element its kernels
    forget to write fails the comparison."""
    module = kernels(op, backend)
    if hasattr(module, "_empty"):
        monkeypatch.setattr(
            module, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
        )
