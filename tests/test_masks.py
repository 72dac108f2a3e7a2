import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.layouts import LAYOUTS, naive_dense, random_layout
from transfusion_kernels.attention.plan import heaviest_first, key_tiles, query_runs
from transfusion_kernels.masks import HybridMask


def build(cu, spans):
    return HybridMask.from_spans(
        torch.tensor(cu, dtype=torch.int32), torch.tensor(spans, dtype=torch.int32).reshape(-1, 2)
    )


def check_tables(mask: HybridMask, dense: torch.Tensor, bm: int, bn: int, exact: bool):
    """Every claim the tile plans make, checked against the dense mask: per query tile and slot k,
    the run holds every key a row sees through slot k, its FULL range is seen by every row
    through slot k; per key tile, the query range holds every query that sees a key of it."""
    nq, nk = dense.shape
    s, e = mask.starts, mask.ends
    runs = query_runs(mask, bm)
    assert runs.shape == (-(-nq // bm), mask.num_intervals, 4) and runs.dtype == torch.int32
    j = torch.arange(nk)
    for t in range(runs.shape[0]):
        r0, r1 = t * bm, min((t + 1) * bm, nq)
        for k, (lo, hi, full_lo, full_hi) in enumerate(runs[t].tolist()):
            through_k = (j[None, :] >= s[r0:r1, k, None]) & (j[None, :] < e[r0:r1, k, None])
            seen = through_k.any(0).nonzero().flatten()
            if seen.numel():
                assert lo <= seen.min() and seen.max() < hi
            else:
                assert (lo, hi) == (0, 0)
            if full_lo < full_hi:
                assert through_k[:, full_lo:full_hi].all()
            if exact and seen.numel():  # min/max over the tile's non-empty intervals
                assert (lo, hi) == (int(seen.min()), int(seen.max()) + 1)
    for t, (q_lo, q_hi, f_lo, f_hi) in enumerate(key_tiles(mask, bn).tolist()):
        cols = dense[:, t * bn : (t + 1) * bn]
        seers = cols.any(1).nonzero().flatten()
        if seers.numel():
            assert q_lo <= seers.min() and seers.max() < q_hi
        if f_lo < f_hi:
            assert cols[f_lo:f_hi].all()
        if exact and mask.monotone:  # other masks: at query-tile granularity (KEY_PLAN_GRANULE)
            full = cols.all(1).nonzero().flatten()
            if full.numel():
                assert (f_lo, f_hi) == (int(full.min()), int(full.max()) + 1)
            else:
                assert f_lo >= f_hi


def random_union(g: torch.Generator, nq: int, nk: int, k: int):
    """Random sorted, disjoint intervals: 2K sorted endpoints per row (some slots empty)."""
    pts = torch.randint(0, nk + 1, (nq, 2 * k), generator=g).sort(1).values.int()
    return pts[:, 0::2], pts[:, 1::2]


@pytest.mark.parametrize("name", LAYOUTS)
def test_layouts_match_naive_rule(name):
    cu, spans = LAYOUTS[name]
    mask = build(cu, spans)
    dense = naive_dense(cu, spans)
    assert torch.equal(mask.to_dense(), dense)
    assert mask.kv_start.dtype == mask.kv_end.dtype == torch.int32
    assert mask.visible_pairs() == int(dense.sum())
    for bm, bn in ((16, 16), (64, 32), (32, 128)):
        check_tables(mask, dense, bm, bn, exact=True)


def test_causal_is_spans_free_transfusion():
    cu = [0, 5, 9, 20]
    mask = HybridMask.causal(torch.tensor(cu, dtype=torch.int32))
    assert torch.equal(mask.to_dense(), naive_dense(cu, []))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 150),
    seed=st.integers(0, 2**31 - 1),
    bm=st.sampled_from([16, 32, 64]),
    bn=st.sampled_from([16, 32, 64]),
)
def test_random_layouts(n, seed, bm, bn):
    cu, spans = random_layout(torch.Generator().manual_seed(seed), n)
    mask = build(cu, spans)
    dense = naive_dense(cu, spans)
    assert torch.equal(mask.to_dense(), dense)
    check_tables(mask, dense, bm, bn, exact=True)


@settings(max_examples=40, deadline=None)
@given(nq=st.integers(1, 100), nk=st.integers(1, 100), seed=st.integers(0, 2**31 - 1))
def test_arbitrary_intervals_tables_are_conservative(nq, nk, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, nk + 1, (nq,), generator=g)
    b = torch.randint(0, nk + 1, (nq,), generator=g)
    s, e = torch.minimum(a, b).int(), torch.maximum(a, b).int()
    mask = HybridMask.from_intervals(s, e, num_keys=nk)
    dense = mask.to_dense()
    naive = torch.tensor([[s[i] <= j < e[i] for j in range(nk)] for i in range(nq)], dtype=torch.bool)
    assert torch.equal(dense, naive)
    check_tables(mask, dense, 16, 16, exact=mask.monotone)


@settings(max_examples=60, deadline=None)
@given(
    nq=st.integers(1, 90),
    nk=st.integers(1, 90),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    bm=st.sampled_from([16, 32]),
    bn=st.sampled_from([16, 64]),
)
def test_union_masks_and_their_plans(nq, nk, k, seed, bm, bn):
    """K sorted, disjoint intervals per query: the dense mask is the union (a naive loop), the
    visible pairs count it, and the plans hold every claim."""
    s, e = random_union(torch.Generator().manual_seed(seed), nq, nk, k)
    mask = HybridMask.from_intervals(s.long(), e.tolist(), num_keys=nk)  # int64 and lists convert once
    assert mask.num_intervals == k and mask.starts.dtype == torch.int32
    naive = torch.tensor(
        [[any(s[i, c] <= j < e[i, c] for c in range(k)) for j in range(nk)] for i in range(nq)], dtype=torch.bool
    ).reshape(nq, nk)
    dense = mask.to_dense()
    assert torch.equal(dense, naive)
    assert mask.visible_pairs() == int(naive.sum())
    check_tables(mask, dense, bm, bn, exact=True)


def test_union_runs_skip_the_common_gap():
    """Every row of a tile sees [0, 40) and [200, 240 + i): the keys in between are in no run, so
    a kernel never visits them; the first run is FULL, the second FULL up to its shortest row."""
    n = 32
    s = torch.tensor([[0, 200]] * n, dtype=torch.int32)
    e = torch.stack([torch.full((n,), 40), 240 + torch.arange(n)], 1).int()
    runs = query_runs(HybridMask.from_intervals(s, e, 300), 32)
    assert runs.tolist() == [[[0, 40, 0, 40], [200, 240 + n - 1, 200, 240]]]


def test_union_key_plan_full_run_stops_at_a_tile_that_is_not_full():
    """Key tile [0, 16) is seen whole by query tiles 0 and 2 (of 64 rows) but not by tile 1,
    whose rows skip keys [8, 16): the FULL query run is tile 0 only, not tiles 0 to 2."""
    s = torch.tensor([[0, 32]] * 64 + [[0, 16]] * 64 + [[0, 32]] * 64, dtype=torch.int32)
    e = torch.tensor([[32, 32]] * 64 + [[8, 32]] * 64 + [[32, 32]] * 64, dtype=torch.int32)
    mask = HybridMask.from_intervals(s, e, 32)
    assert key_tiles(mask, 16)[0].tolist() == [0, 192, 0, 64]
    check_tables(mask, mask.to_dense(), 64, 16, exact=True)


def test_bad_union_names_the_query():
    with pytest.raises(ValueError, match=r"query 1: intervals \[0, 4\), \[2, 6\) are invalid: the endpoints"):
        HybridMask.from_intervals([[0, 5], [0, 2]], [[1, 6], [4, 6]])
    with pytest.raises(ValueError, match=r"query 0: intervals \[0, 4\), \[5, 9\) are invalid: an end > num_keys = 8"):
        HybridMask.from_intervals([[0, 5]], [[4, 9]], num_keys=8)
    with pytest.raises(ValueError, match="at least one interval slot"):
        HybridMask.from_intervals(torch.zeros(3, 0, dtype=torch.int32), torch.zeros(3, 0, dtype=torch.int32), 4)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_cached_mask(bidirectional):
    cache, new = [5, 0, 12], [3, 4, 1]
    mask = HybridMask.cached(cache, new, bidirectional=bidirectional)
    nk = sum(cache) + sum(new)
    expect = torch.zeros(sum(new), nk, dtype=torch.bool)
    q = k0 = 0
    for c, n in zip(cache, new):
        for j in range(n):
            expect[q, k0 : k0 + c + (n if bidirectional else j + 1)] = True
            q += 1
        k0 += c + n
    assert torch.equal(mask.to_dense(), expect)
    assert mask.monotone
    check_tables(mask, expect, 16, 16, exact=True)


def test_cached_image_chunk_equals_rows_of_full_mask():
    """Denoising an image at the end of a prefix: the chunk's rows of the Transfusion mask."""
    prefix, n_img = 11, 9
    full = build([0, prefix + n_img], [(prefix, prefix + n_img)])
    chunk = HybridMask.cached([prefix], [n_img], bidirectional=True)
    assert torch.equal(chunk.to_dense(), full.to_dense()[prefix:])


def test_flex_block_mask_matches():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    cu, spans = LAYOUTS["several_documents"]
    mask = build(cu, spans)
    bm = mask.to_flex_block_mask(block_size=16)
    q, k, v = (torch.randn(1, 2, 127, 16) for _ in range(3))
    out = flex.flex_attention(q, k, v, block_mask=bm)
    dense = mask.to_dense()
    s = (q @ k.transpose(-1, -2)) / 4.0
    ref = torch.softmax(s.masked_fill(~dense, float("-inf")), -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


BAD = {
    "cu_not_zero": ([1, 10], [], "cu_seqlens\\[0\\] must be 0"),
    "cu_decreasing": ([0, 10, 5], [], "cu_seqlens\\[2\\] = 5 < cu_seqlens\\[1\\] = 10"),
    "span_negative": ([0, 10], [(-1, 3)], "image_spans\\[0\\].*starts before 0"),
    "span_past_end": ([0, 10], [(5, 11)], "image_spans\\[0\\].*ends after"),
    "span_empty": ([0, 10], [(1, 3), (5, 5)], "image_spans\\[1\\].*empty"),
    "span_unsorted": ([0, 10], [(5, 7), (1, 3)], "image_spans\\[1\\].*sorted"),
    "span_overlap": ([0, 10], [(1, 5), (4, 7)], "image_spans\\[1\\].*non-overlapping"),
    "span_crosses_document": ([0, 5, 10], [(3, 7)], "image_spans\\[0\\].*crosses a document"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_the_element(case):
    cu, spans, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        build(cu, spans)


def test_bad_dtype_and_device():
    # int64 (torch's default) converts once; floats are refused, never truncated
    wide = HybridMask.from_spans(torch.tensor([0, 4, 9]), torch.tensor([[1, 3]]))
    assert torch.equal(wide.to_dense(), build([0, 4, 9], [(1, 3)]).to_dense())
    with pytest.raises(ValueError, match="cu_seqlens must hold integers"):
        HybridMask.from_spans(torch.tensor([0.0, 4.0]), torch.zeros(0, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="image_spans must hold integers"):
        HybridMask.from_spans(torch.tensor([0, 4], dtype=torch.int32), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="image_spans must have shape"):
        HybridMask.from_spans(torch.tensor([0, 4], dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    meta = torch.zeros(1, 2, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="image_spans is on meta"):
        HybridMask.from_spans(torch.tensor([0, 4], dtype=torch.int32), meta)
    with pytest.raises(ValueError, match="query 1: interval \\[3, 2\\)"):
        HybridMask.from_intervals(torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_lens\\[1\\] = -2"):
        HybridMask.cached([1, -2], [1, 1])


_PEAK_SCRIPT = """
import torch
from tests.test_masks import build

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

from transfusion_kernels.attention.plan import key_tiles, query_runs

query_runs(build([0, 300], [(5, 40)]), 128)  # warm up torch's lazy state
n = {n}
spans = [(s, s + 1024) for s in range(100, n - 1100, 2048)]
before = rss_kib("VmRSS:")
mask = build([0, n // 2, n], [s for s in spans if (s[0] < n // 2) == (s[1] <= n // 2)])
tables = [query_runs(mask, 128), key_tiles(mask, 64), query_runs(mask, 64), key_tiles(mask, 128)]
assert mask.kv_start.numel() == n and tables[0].shape == (n // 128, 1, 4) and tables[1].shape == (n // 64, 4)
print(rss_kib("VmHWM:") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc")
def test_metadata_is_linear_memory():
    """32k tokens: building the mask and its tile tables raises the process's peak memory by
    O(N) bytes (measured in a fresh interpreter); one N x N bool mask alone would be 1 GiB."""
    n = 32768
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT.format(n=n)], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr
    peak_kib = int(proc.stdout.split()[-1])
    assert peak_kib < 64 * 1024, f"building the tables for {n} tokens raised the peak memory by {peak_kib} KiB"


def test_heaviest_first_orders_tiles_by_visited_length():
    """Longest visited length (hi - lo, summed over runs) first, ties in tile order, empty rows
    (lo >= hi) last; plans (and their orders) are cached on the mask."""
    table = torch.tensor(
        [[0, 5, 0, 0], [0, 64, 0, 0], [3, 40, 0, 0], [9, 9, 0, 0], [7, 2, 0, 0], [10, 15, 0, 0]], dtype=torch.int32
    )
    order = heaviest_first(table)
    assert order.dtype == torch.int32 and order.tolist() == [1, 2, 0, 5, 3, 4]
    runs = torch.tensor([[[0, 10, 0, 0], [20, 50, 0, 0]], [[0, 35, 0, 0], [0, 0, 0, 0]]], dtype=torch.int32)
    assert heaviest_first(runs).tolist() == [0, 1]  # 40 keys in two runs before 35 in one
    mask = build([0, 300], [])
    causal = query_runs(mask, 64)  # a causal document: the last tiles see the most keys
    assert query_runs(mask, 64) is causal
    assert heaviest_first(causal).tolist() == [4, 3, 2, 1, 0]
