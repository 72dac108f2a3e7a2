"""The fuzz tests' shared pieces: Hypothesis profiles, the example budget, the backends to
compare, poisoned outputs, small Triton tiles, and the layouts strategy.

Profiles: ``ci`` (default), a fixed, derandomized budget (the same examples every run) small
enough that all fuzz tests together take well under 90 s on a 2-core CPU under the Triton
interpreter; ``long``, 15 times the examples, freshly random each run; select it with
``TK_FUZZ_PROFILE=long python -m pytest tests -k fuzz``. Each fuzz test (``test_fuzz_*.py``, beside
its op's tests) states its ``ci`` example count through :func:`budget`; the profile supplies
everything else (and the multiplier). The profiles are applied per test, so they do not change
the settings of hypothesis tests elsewhere in the suite.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from unittest import mock

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import transfusion_kernels as tk

PROFILE_ENV = "TK_FUZZ_PROFILE"
SCALE = {"ci": 1, "long": 15}

_common = dict(
    deadline=None,  # the interpreter's speed varies with the machine's load
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,  # a failure prints the line that reproduces it (@reproduce_failure)
)
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.register_profile("long", derandomize=False, **_common)

PROFILE = os.environ.get(PROFILE_ENV, "ci").strip() or "ci"
if PROFILE not in SCALE:
    raise ValueError(f"{PROFILE_ENV} must be one of {sorted(SCALE)}, got {PROFILE!r}")

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


@st.composite
def layouts(draw, max_tokens=90):
    """cu_seqlens and image spans obeying the rules (empty documents and images at edges too)."""
    n = draw(st.integers(0, max_tokens))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    cu = [0, *cuts, n]
    spans = []
    for a, b in zip(cu[:-1], cu[1:]):
        points = sorted(draw(st.lists(st.integers(a, b), max_size=6, unique=True)))
        pairs = list(zip(points[::2], points[1::2]))
        spans += [p for p in pairs if p[0] < p[1] and draw(st.booleans())]
    return cu, spans
