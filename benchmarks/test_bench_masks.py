"""Cost of building the mask metadata, against FlexAttention's create_block_mask.

    pytest benchmarks --benchmark-only

Meaningful on the CPU too: the metadata is built once per batch, so it must stay cheap next to
one attention layer. Layout: documents of 2048 tokens, each with a 256-patch and a 1024-patch image.
"""
import pytest
import torch

import transfusion_kernels as tk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [4096, 8192, 16384, 32768, 65536]
# create_block_mask evaluates the mask densely (N x N booleans): cap it on the CPU.
FLEX_MAX = 65536 if DEVICE == "cuda" else 16384


def transfusion_layout(n: int, doc: int = 2048):
    cu = list(range(0, n + 1, doc))
    spans = []
    for d0 in cu[:-1]:
        spans += [(d0 + 10, d0 + 10 + 256), (d0 + 300, d0 + 300 + 1024)]
    return (torch.tensor(cu, dtype=torch.int32, device=DEVICE),
            torch.tensor(spans, dtype=torch.int32, device=DEVICE))


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("n", SIZES)
def test_hybrid_mask_metadata(benchmark, n):
    cu, spans = transfusion_layout(n)

    def build():
        mask = tk.HybridMask.from_spans(cu, spans)
        mask.query_tiles(128), mask.key_tiles(64)  # what a forward + backward pass needs
        _sync()
        return mask

    mask = benchmark(build)
    benchmark.extra_info.update(tokens=n, device=DEVICE, visible_pairs=mask.visible_pairs())
    assert mask.num_queries == n


@pytest.mark.parametrize("n", [s for s in SIZES if s <= FLEX_MAX])
def test_flex_create_block_mask(benchmark, n):
    cu, spans = transfusion_layout(n)
    mask = tk.HybridMask.from_spans(cu, spans)

    def build():
        bm = mask.to_flex_block_mask()
        _sync()
        return bm

    bm = benchmark.pedantic(build, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(tokens=n, device=DEVICE)
    assert bm.shape[-2:] == (n, n)
