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


# Tiles small enough that the fuzzed sizes cross tile edges and run as many programs under the
# interpreter (on a GPU the real tiles run: the sizes there are the kernels' own).
SMALL_TILES = {
    "timestep": dict(
        ADD_BLOCK=128,
        ADD_MAX_BLOCK_D=32,
        PIECE_ROWS=8,
        SUM_BLOCK_R=4,
        SUM_BLOCK_D=16,
        IMAGE_SUM_BLOCK_T=2,
        HIDDEN_BLOCK_H=16,
        HIDDEN_BLOCK_K=16,
        SINUSOID_BLOCK_M=4,
        SINUSOID_MAX_BLOCK_D=16,
    ),
    "diffusion": dict(INTERPRET_TILE=16, INTERPRET_MAX_BLOCK_C=8),
}


@contextlib.contextmanager
def small_tiles(op: str):
    """The Triton backend of ``op`` with SMALL_TILES[op] while the block runs (no-op on a GPU)."""
    with contextlib.ExitStack() as stack:
        if not GPU and "triton" in FAST_BACKENDS:
            module = importlib.import_module(f"transfusion_kernels.{op}.triton")
            for name, value in SMALL_TILES[op].items():
                stack.enter_context(mock.patch.object(module, name, value))
        yield
