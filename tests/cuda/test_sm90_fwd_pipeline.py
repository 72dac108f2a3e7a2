"""The wgmma forward's pipeline under the CPU emulation (tests/cuda/attention_host): query tiles
with more key steps than the ring has stages (stage refills, "empty" barriers, parities flipping),
FULL runs between masked steps, K/V rows outside the tile's [kv_lo, kv_hi) holding NaN in a
first and a last step the producer zeroes (the last step's stage already reused), and negative
and zero softmax scales. Against the float64 oracle under the 2x rule, like
test_cuda_attention.py's emulated cases."""

from __future__ import annotations

import pytest
import torch

import transfusion_kernels as tk
from tests.cuda.test_cuda_attention import (
    FLOOR,
    assert_rule,
    dense_attention,
    emulate,
    emulator,  # noqa: F401
    spans_mask_cpu,
)


def _nan_outside_long():
    """Intervals inside [100, 650), 5 key steps of 128 per query tile; K/V rows outside are NaN."""
    nq, nk = 600, 700
    i = torch.arange(nq)
    s = 100 + i // 6
    e = torch.clamp(s + 200 + (i * 7) % 300, max=650)
    e[130:140] = s[130:140]  # rows that see nothing
    return tk.HybridMask.from_intervals(s.int(), e.int(), num_keys=nk), (100, 650)


def _causal_image():
    return spans_mask_cpu([0, 700], [(300, 364)]), None


CASES = {  # name -> (mask builder, hq, hkv, d, dtype, softmax scale or None for d ** -0.5)
    # a 700-token causal document with a bidirectional image: up to 6 steps, 5 of them FULL
    "causal-image-d128-bf16": (_causal_image, 2, 1, 128, torch.bfloat16, None),
    "nan-outside-d128-f16": (_nan_outside_long, 2, 1, 128, torch.float16, None),
    "nan-outside-d64-bf16": (_nan_outside_long, 2, 2, 64, torch.bfloat16, None),
    # the scale folded as |scale| log2(e) (>= FLT_MIN): Q negated in shared memory for a negative
    # one, uniform weights (and masked keys still at -inf) for zero
    "negative-scale-d128-f16": (_nan_outside_long, 2, 1, 128, torch.float16, -0.3),
    "zero-scale-d64-bf16": (_causal_image, 2, 1, 64, torch.bfloat16, 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_long_tiles_under_emulation(emulator, tmp_path, case, seed):  # noqa: F811
    build, hq, hkv, d, dtype, scale = CASES[case]
    mask, seen = build()
    nq, nk = mask.num_queries, mask.num_keys
    scale = d**-0.5 if scale is None else scale
    q, k, v = (torch.randn(n, h, d).to(dtype) for n, h in ((nq, hq), (nk, hkv), (nk, hkv)))
    clean_k, clean_v = k, v
    if seen is not None:
        k, v = k.clone(), v.clone()
        for t in (k, v):
            t[: seen[0]] = float("nan")
            t[seen[1] :] = float("nan")
    allowed = mask.to_dense()
    ref_out, ref_lse = dense_attention(*(t.double() for t in (q, clean_k, clean_v)), allowed, scale)
    low_out, low_lse = dense_attention(q, clean_k, clean_v, allowed, scale)
    out, lse = emulate(emulator, tmp_path, "fwd_sm90", mask, q, k, v, scale)
    assert_rule("fwd_sm90 out", out, ref_out, low_out, FLOOR[dtype])
    assert_rule("lse", lse, ref_lse, low_lse, FLOOR[dtype])
