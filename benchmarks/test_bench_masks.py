"""Cost of building the mask metadata, against FlexAttention's compiled create_block_mask.

    pytest benchmarks --benchmark-only

Meaningful on the CPU too: the metadata is built once per batch, so it must stay cheap next to
one attention layer. Layout: documents of 2048 tokens, each with a 256-patch and a 1024-patch image.
FlexAttention's side is ``torch.compile(create_block_mask)``, as its users build masks (eager
create_block_mask evaluates the N x N mask densely); the first call, compilation included, is
recorded apart (``extra_info["first_call_s"]``) from the steady-state time that is benchmarked.
"""

import time

import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels.attention.plan import key_tiles, query_runs
from .common import compiled_create_block_mask, interval_mask_mod

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [4096, 8192, 16384, 32768, 65536]
# The compiled build still evaluates every (query block, key block) densely: cap it on the CPU.
FLEX_MAX = 65536 if DEVICE == "cuda" else 16384
BLOCK = 128


def transfusion_layout(n: int, doc: int = 2048):
    cu = list(range(0, n + 1, doc))
    spans = []
    for d0 in cu[:-1]:
        spans += [(d0 + 10, d0 + 10 + 256), (d0 + 300, d0 + 300 + 1024)]
    return (torch.tensor(cu, dtype=torch.int32, device=DEVICE), torch.tensor(spans, dtype=torch.int32, device=DEVICE))


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("n", SIZES)
def test_hybrid_mask_metadata(benchmark, n):
    cu, spans = transfusion_layout(n)

    def build():
        mask = tk.HybridMask.from_spans(cu, spans)
        query_runs(mask, 128), key_tiles(mask, 64)  # what a forward + backward pass needs
        _sync()
        return mask

    mask = benchmark(build)
    benchmark.extra_info.update(tokens=n, device=DEVICE, visible_pairs=mask.visible_pairs())
    assert mask.num_queries == n


@pytest.mark.parametrize("n", [s for s in SIZES if s <= FLEX_MAX])
def test_flex_create_block_mask_compiled(benchmark, n):
    cu, spans = transfusion_layout(n)
    mask = tk.HybridMask.from_spans(cu, spans)
    create = compiled_create_block_mask()
    mask_mod = interval_mask_mod(mask.kv_start, mask.kv_end)

    def build():
        bm = create(mask_mod, None, None, n, n, device=DEVICE, BLOCK_SIZE=BLOCK)
        _sync()
        return bm

    t0 = time.perf_counter()
    build()  # compiles (once per shape)
    first_call_s = time.perf_counter() - t0
    bm = benchmark.pedantic(build, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(tokens=n, device=DEVICE, first_call_s=first_call_s)
    assert bm.shape[-2:] == (n, n)
    if n == SIZES[0]:  # the compiled build marks exactly the blocks that hold a visible pair
        blocks = mask.to_dense().reshape(n // BLOCK, BLOCK, n // BLOCK, BLOCK).any(3).any(1)
        assert torch.equal(bm.to_dense()[0, 0].bool(), blocks)
