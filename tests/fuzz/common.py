"""Shared pieces of the fuzz tests: the example budget, the backends to compare, poisoned outputs."""
from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import torch
from hypothesis import settings

import transfusion_kernels as tk
from tests.fuzz.conftest import PROFILE, SCALE

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
FAST_BACKENDS = [b for b in ("triton", "cuda") if tk.available_backends(DEVICE)[b].available]


def budget(ci_examples: int) -> settings:
    """Hypothesis settings of the selected profile with this test's share of examples."""
    return settings(settings.get_profile(PROFILE), max_examples=ci_examples * SCALE[PROFILE])


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned(op: str):
    """Every buffer the kernel backends of ``op`` ("attention", "timestep", "diffusion")
    allocate starts as NaN, so an element a kernel forgets to write fails the comparison."""
    with contextlib.ExitStack() as stack:
        for name in FAST_BACKENDS:
            module = importlib.import_module(f"transfusion_kernels.{op}.{name}")
            if hasattr(module, "_empty"):
                stack.enter_context(mock.patch.object(module, "_empty", _nan_empty))
        yield
