"""Mask constructors against dense oracles written from each model's rule with plain loops.

Each constructor must give exactly the canonical intervals of its oracle's dense mask: every
row's maximal runs of visible keys in order, then empty (last end, last end) slots, K the most
runs of any row (at least 1). The canonical lists are also computed here by a plain loop.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.layouts import naive_dense
from transfusion_kernels import mask_constructors as mc

LAYOUTS = 500


# ---------------------------------------------------------------------------------------------- oracles
def naive_canonical(dense: torch.Tensor):
    """The canonical (starts, ends) lists of a bool [R, Nk] mask, run by run."""
    rows = []
    for row in dense.tolist():
        runs, j = [], 0
        while j < len(row):
            if row[j]:
                a = j
                while j < len(row) and row[j]:
                    j += 1
                runs.append((a, j))
            else:
                j += 1
        rows.append(runs)
    k = max([1] + [len(r) for r in rows])
    starts, ends = [], []
    for runs in rows:
        last = runs[-1][1] if runs else 0
        runs = runs + [(last, last)] * (k - len(runs))
        starts.append([a for a, _ in runs])
        ends.append([b for _, b in runs])
    return starts, ends


def assert_canonical_of(got, dense: torch.Tensor):
    starts, ends, num_keys = got
    assert starts.dtype == ends.dtype == torch.int32
    assert num_keys == dense.shape[1]
    s, e = naive_canonical(dense)
    assert starts.tolist() == s and ends.tolist() == e, f"\n{starts.tolist()}\n{ends.tolist()}\nexpected\n{s}\n{e}"
    return len(s[0]) if s else 1


def splits_oracle(split_lens, modes) -> torch.Tensor:
    """BAGEL's rule, pair by pair within each sample (samples never see each other): query i of
    split t sees key j of split u iff u is an earlier non-noise split, or u == t and (the split is
    not causal or j <= i)."""
    blocks = []
    for lens, ms in zip(split_lens, modes):
        owner = [(t, m) for t, (n, m) in enumerate(zip(lens, ms)) for _ in range(n)]
        n = len(owner)
        block = torch.zeros(n, n, dtype=torch.bool)
        for i, (ti, mi) in enumerate(owner):
            for j, (tj, mj) in enumerate(owner):
                if tj < ti:
                    block[i, j] = mj != "noise"
                elif tj == ti:
                    block[i, j] = mi != "causal" or j <= i
        blocks.append(block)
    return torch.block_diag(*blocks) if blocks else torch.zeros(0, 0, dtype=torch.bool)


def splits_two_pass_oracle(split_lens, modes) -> torch.Tensor:
    """The same rule built the way BAGEL's per-sample dense mask is: first every split sees the
    splits before it and itself (causally or whole), then each noise split's keys are cleared for
    all queries of the sample and given back to the split's own queries."""
    blocks = []
    for lens, ms in zip(split_lens, modes):
        n = sum(lens)
        block = torch.zeros(n, n, dtype=torch.bool)
        bounds = [sum(lens[:t]) for t in range(len(lens) + 1)]
        for t, m in enumerate(ms):
            a, b = bounds[t], bounds[t + 1]
            block[a:b, :a] = True
            block[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril() if m == "causal" else True
        for t, m in enumerate(ms):
            if m == "noise":
                a, b = bounds[t], bounds[t + 1]
                block[:, a:b] = False
                block[a:b, a:b] = True
        blocks.append(block)
    return torch.block_diag(*blocks) if blocks else torch.zeros(0, 0, dtype=torch.bool)


def spans_oracle(cu, images, hidden) -> torch.Tensor:
    dense = naive_dense(cu, images)
    n = dense.shape[0]
    for a, b in hidden:
        for i in range(n):
            if not a <= i < b:
                dense[i, a:b] = False
    return dense


def padded_oracle(lengths, seq_len, images, hidden) -> torch.Tensor:
    """Per sample: the Transfusion rule plus hiding over its real tokens; padding sees and is seen by nothing."""
    n = len(lengths) * seq_len
    dense = torch.zeros(n, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        local = spans_oracle([0, length], images[b], hidden[b])
        o = b * seq_len
        dense[o : o + length, o : o + length] = local
    return dense


# ---------------------------------------------------------------------------------------------- layouts
def random_splits(rng: random.Random):
    samples = rng.randint(0, 4)
    split_lens, modes = [], []
    for _ in range(samples):
        count = rng.choice([0, 1, 2, 3, 6, 10, 16])
        noise_bias = rng.random()
        lens = [rng.choice([0, 1, 1, 2, 3, 5]) for _ in range(count)]
        if rng.random() < 0.2:  # interleaved text and noised images: the most intervals per query
            ms = [rng.choice(["causal", "full"]) if t % 2 else "noise" for t in range(count)]
        else:
            ms = [("noise" if rng.random() < noise_bias else rng.choice(["causal", "full"])) for _ in range(count)]
        split_lens.append(lens)
        modes.append(ms)
    return split_lens, modes


def random_spans(rng: random.Random, n: int, cu, max_spans: int):
    spans = []
    for a, b in zip(cu[:-1], cu[1:]):
        pos = a
        for _ in range(rng.randint(0, max_spans)):
            if b - pos < 1:
                break
            s = rng.randint(pos, b - 1)
            e = rng.randint(s + 1, min(b, s + rng.choice([1, 2, 4, 10])))
            spans.append((s, e))
            pos = e + rng.choice([0, 0, 1, 3])
    return spans


def random_documents(rng: random.Random, n: int):
    cuts = sorted(rng.randint(0, n) for _ in range(rng.randint(0, 3)))
    return [0, *cuts, n]


def as_kind(values, kind):
    """The same integers as a python list, an int32 tensor or an int64 tensor."""
    if kind == "list":
        return values
    return torch.tensor(values, dtype=torch.int32 if kind == "int32" else torch.int64)


# ---------------------------------------------------------------------------------------------- chunks
@pytest.fixture
def small_probes(monkeypatch):
    """Probe chunks of a few rows, so every layout runs through several chunks."""
    monkeypatch.setattr(mc, "PROBE_ELEMENTS", 200)


# ---------------------------------------------------------------------------------------------- canonical form
def test_canonical_from_dense_rows_random():
    gen = torch.Generator().manual_seed(0)
    widest = 0
    for trial in range(LAYOUTS):
        rows, keys = torch.randint(0, 9, (2,), generator=gen).tolist()
        keys *= 3
        p = torch.rand((), generator=gen).item()
        dense = torch.rand(rows, keys, generator=gen) < p
        s, e = mc.canonical_from_dense_rows(dense)
        widest = max(widest, assert_canonical_of((s, e, keys), dense))
    assert widest >= 8


def test_canonical_from_intervals_merges_and_sorts():
    gen = torch.Generator().manual_seed(1)
    for _ in range(LAYOUTS):
        rows, j, keys = 5, int(torch.randint(1, 7, (1,), generator=gen)), 20
        lo = torch.randint(-2, keys + 2, (rows, j), generator=gen)
        hi = lo + torch.randint(-3, 6, (rows, j), generator=gen)
        lo, hi = lo.clamp(0, keys), hi.clamp(0, keys)
        dense = torch.zeros(rows, keys, dtype=torch.bool)
        for r in range(rows):
            for a, b in zip(lo[r].tolist(), hi[r].tolist()):
                dense[r, a:b] = True
        s, e = mc.canonical_from_intervals(lo, hi)
        assert_canonical_of((s, e, keys), dense)


# ---------------------------------------------------------------------------------------------- from_splits
def test_from_splits_matches_bagel_rule():
    rng = random.Random(2)
    seen = dict(one_token=0, noise_first=0, noise_last=0, consecutive_noise=0, empty_split=0)
    widest = 0
    for _ in range(LAYOUTS):
        split_lens, modes = random_splits(rng)
        kind = rng.choice(["list", "int32", "int64"])
        got = mc.from_splits([as_kind(lens, kind) for lens in split_lens], modes)
        oracle = splits_oracle(split_lens, modes)
        assert torch.equal(oracle, splits_two_pass_oracle(split_lens, modes))
        widest = max(widest, assert_canonical_of(got, oracle))
        for lens, ms in zip(split_lens, modes):
            real = [m for n, m in zip(lens, ms) if n]
            seen["one_token"] += 1 in lens
            seen["empty_split"] += 0 in lens
            seen["noise_first"] += bool(real) and real[0] == "noise"
            seen["noise_last"] += bool(real) and real[-1] == "noise"
            seen["consecutive_noise"] += any(a == b == "noise" for a, b in zip(real, real[1:]))
    assert min(seen.values()) >= 20, seen
    assert widest >= 8


def test_from_splits_examples():
    # text, noised image, clean image, text: the text after sees the prompt, the clean copy and itself.
    s, e, n = mc.from_splits([[2, 3, 3, 2]], [["causal", "noise", "full", "causal"]])
    assert n == 10
    assert s[8].tolist() == [0, 5] and e[8].tolist() == [2, 9]
    assert s[3].tolist() == [0, 5] and e[3].tolist() == [5, 5]  # a noise query: prompt and itself in one run
    # a sample of one noise split sees itself whole
    s, e, _ = mc.from_splits([[3]], [["noise"]])
    assert s.tolist() == [[0]] * 3 and e.tolist() == [[3]] * 3


@pytest.mark.parametrize(
    "split_lens, modes, message",
    [
        ([[2, 3]], [["causal"]], r"sample 0: 2 split lengths but modes\[0\]"),
        ([[2], [3]], [["causal"]], "split_lens has 2 samples but modes has 1"),
        ([[2], [3, 1]], [["full"], ["causal", "bidirectional"]], "sample 1, split 1: mode 'bidirectional'"),
        ([[2, -1]], [["full", "noise"]], "sample 0, split 1: length -1 is negative"),
        ([[2.5]], [["full"]], r"split_lens\[0\] must hold integers"),
        ([2, 3], ["causal", "full"], r"split_lens\[0\] must|modes\[0\]"),
        (torch.tensor([[2, 3]]), [["causal", "full"]], "one inner list per sample"),
    ],
)
def test_from_splits_errors(split_lens, modes, message):
    with pytest.raises(ValueError, match=message):
        mc.from_splits(split_lens, modes)


# ---------------------------------------------------------------------------------------------- from_spans
def test_from_spans_with_hidden_matches_rule():
    rng = random.Random(3)
    widest = 0
    for _ in range(LAYOUTS):
        n = rng.randint(0, 40)
        cu = random_documents(rng, n)
        images = random_spans(rng, n, cu, 3)
        hidden = random_spans(rng, n, cu, 4)
        kind = rng.choice(["list", "int32", "int64"])
        args = [as_kind(cu, kind), images if kind == "list" else as_kind(images, kind).reshape(-1, 2)]
        hid = (
            None
            if (not hidden and rng.random() < 0.5)
            else (hidden if kind == "list" else as_kind(hidden, kind).reshape(-1, 2))
        )
        got = mc.from_spans(*args, hid)
        widest = max(widest, assert_canonical_of(got, spans_oracle(cu, images, hidden)))
    assert widest >= 4


def test_hidden_noisy_copy_is_invisible_to_later_text():
    # prompt [0, 3), noisy copy [3, 7) hidden, clean copy [7, 11), text [11, 13)
    s, e, _ = mc.from_spans([0, 13], [[3, 7], [7, 11]], [[3, 7]])
    dense = spans_oracle([0, 13], [(3, 7), (7, 11)], [(3, 7)])
    assert not dense[11:, 3:7].any() and dense[3:7, 3:7].all()
    assert s[12].tolist() == [0, 7] and e[12].tolist() == [3, 13]


@pytest.mark.parametrize(
    "hidden, message",
    [
        ([[3, 3]], r"hidden_spans\[0\] = \(3, 3\) is empty"),
        ([[4, 6], [5, 8]], r"hidden_spans\[1\] = \(5, 8\) begins before"),
        ([[8, 12]], r"hidden_spans\[0\] = \(8, 12\) crosses a document boundary"),
        ([[0, 30]], "ends after the last token"),
        ([[1, 2, 3]], r"hidden_spans must have shape \[M, 2\]"),
        ([[1.0, 2.0]], "must hold integers"),
    ],
)
def test_from_spans_errors(hidden, message):
    with pytest.raises(ValueError, match=message):
        mc.from_spans([0, 10, 20], [], hidden)


# ---------------------------------------------------------------------------------------------- from_padded
def test_from_padded_matches_rule():
    rng = random.Random(4)
    for trial in range(LAYOUTS):
        batch, seq_len = rng.randint(0, 3), rng.randint(0, 14)
        lengths = [rng.randint(0, seq_len) for _ in range(batch)]
        images = [random_spans(rng, n, [0, n], 2) for n in lengths]
        hidden = [random_spans(rng, n, [0, n], 2) for n in lengths]
        if trial % 2:  # the [B, M, 2] tensor form, padded with (0, 0) entries
            m = max([1] + [len(x) for x in images + hidden])
            pad = lambda spans: torch.tensor([x + [(0, 0)] * (m - len(x)) for x in spans], dtype=torch.int64).reshape(
                batch, m, 2
            )
            got = mc.from_padded(torch.tensor(lengths, dtype=torch.int64), seq_len, pad(images), pad(hidden))
        else:
            got = mc.from_padded(lengths, seq_len, images, hidden)
        assert_canonical_of(got, padded_oracle(lengths, seq_len, images, hidden))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lengths=[3, 9], seq_len=8), r"lengths\[1\] = 9 is outside \[0, seq_len = 8\]"),
        (
            dict(lengths=[3, 5], seq_len=8, image_spans=[[], [(2, 6)]]),
            r"sample 1 has span \(2, 6\), not a range inside its 5",
        ),
        (dict(lengths=[3, 5], seq_len=8, hidden_spans=[[]]), "hidden_spans has 1 samples but lengths has 2"),
        (dict(lengths=[3], seq_len=-1), "seq_len must be a non-negative int"),
        (
            dict(lengths=[3, 5], seq_len=8, hidden_spans=torch.tensor([[[0, 0]], [[4, 2]]])),
            r"sample 1 has span \(4, 2\)",
        ),
        (dict(lengths=[3, 5], seq_len=8, image_spans=torch.zeros(3, 1, 2, dtype=torch.int64)), r"\[B = 2, M, 2\]"),
    ],
)
def test_from_padded_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mc.from_padded(**kwargs)


# ---------------------------------------------------------------------------------------------- from_dense
def random_dense_rows(gen, rows, keys):
    """Rows with a random number of runs: empty rows, full rows, many short runs."""
    p = torch.rand(rows, 1, generator=gen) * torch.randint(0, 2, (rows, 1), generator=gen)
    return torch.rand(rows, keys, generator=gen) < p + (torch.rand(rows, 1, generator=gen) < 0.1)


def test_from_dense_packed_and_batched(small_probes):
    gen = torch.Generator().manual_seed(5)
    widest = 0
    for trial in range(LAYOUTS):
        if trial % 2:
            n = int(torch.randint(0, 30, (1,), generator=gen))
            dense = random_dense_rows(gen, n, n)
            widest = max(widest, assert_canonical_of(mc.from_dense(dense), dense))
        else:
            batch, length = torch.randint(0, 4, (2,), generator=gen).tolist()
            length *= 4
            per = random_dense_rows(gen, batch * length, length).reshape(batch, length, length)
            packed = torch.block_diag(*per) if batch else torch.zeros(0, 0, dtype=torch.bool)
            widest = max(widest, assert_canonical_of(mc.from_dense(per), packed))
    assert widest >= 8


def test_from_dense_max_intervals():
    dense = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)
    assert mc.from_dense(dense, max_intervals=3)[0].shape == (3, 3)
    with pytest.raises(ValueError, match="row 1 of the mask sees 3 separate key ranges, more than max_intervals = 2"):
        mc.from_dense(dense, max_intervals=2)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.zeros(3, 3), "must be bool.*mask == 0"),
        (torch.zeros(2, 3, 4, dtype=torch.bool), r"must be \[B, L, L\]"),
        (torch.zeros(3, dtype=torch.bool), r"\[N, N\] \(packed\) or \[B, L, L\]"),
        ([[True]], "must be a bool tensor"),
    ],
)
def test_from_dense_errors(mask, message):
    with pytest.raises(ValueError, match=message):
        mc.from_dense(mask)


# ---------------------------------------------------------------------------------------------- mask_mods
def sliding_window(doc, window, sinks):
    def mask_mod(b, h, q, kv):
        same = doc[q] == doc[kv]
        return same & (kv <= q) & ((q - kv < window) | (kv - doc_first[doc[kv]] < sinks))

    doc_first = torch.zeros(int(doc.max()) + 2 if doc.numel() else 1, dtype=torch.int64)
    doc_first.scatter_reduce_(0, doc, torch.arange(doc.numel()), "amin", include_self=False)
    return mask_mod


def test_from_mask_mod_packed(small_probes):
    gen = torch.Generator().manual_seed(6)
    rng = random.Random(6)
    widest = 0
    for trial in range(LAYOUTS):
        n = rng.randint(0, 30)
        cu = random_documents(rng, n)
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
        if trial % 3 == 0:  # sink plus sliding window per document
            window, sinks = rng.randint(1, 6), rng.randint(0, 3)
            mm = sliding_window(doc, window, sinks)
            d = doc.tolist()
            dense = torch.tensor(
                [
                    [d[i] == d[j] and j <= i and (i - j < window or j - cu[d[i]] < sinks) for j in range(n)]
                    for i in range(n)
                ],
                dtype=torch.bool,
            ).reshape(n, n)
        else:  # anything inside each document, looked up from a table
            dense = random_dense_rows(gen, n, n) & (doc[:, None] == doc[None, :])
            mm = lambda b, h, q, kv, table=dense: table[q, kv]
        kind = rng.choice(["list", "int64"])
        widest = max(widest, assert_canonical_of(mc.from_mask_mod(mm, as_kind(cu, kind)), dense))
    assert widest >= 8


def test_from_mask_mod_padded(small_probes):
    gen = torch.Generator().manual_seed(7)
    for _ in range(LAYOUTS):
        batch, length = torch.randint(0, 4, (2,), generator=gen).tolist()
        length *= 3
        per = random_dense_rows(gen, batch * length, length).reshape(batch, length, length)
        got = mc.from_mask_mod(lambda b, h, q, kv: per[b, q, kv], batch_size=batch, seq_len=length)
        packed = torch.block_diag(*per) if batch else torch.zeros(0, 0, dtype=torch.bool)
        assert_canonical_of(got, packed)


def test_from_mask_mod_refuses_pairs_across_documents(small_probes):
    causal = lambda b, h, q, kv: kv <= q
    with pytest.raises(ValueError, match=r"query 5 \(document \[5, 9\)\) see key 0 in another document"):
        mc.from_mask_mod(causal, [0, 5, 9])
    doc = torch.tensor([0] * 5 + [1] * 4)
    got = mc.from_mask_mod(lambda b, h, q, kv: (kv <= q) & (doc[q] == doc[kv]), [0, 5, 9])
    assert_canonical_of(got, spans_oracle([0, 5, 9], [], []))


def test_probes_hold_one_chunk_at_a_time(monkeypatch):
    """No probe evaluates more than PROBE_ELEMENTS (query, key) pairs at once."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(mc, "PROBE_ELEMENTS", 100)
    sizes, probe = [], mc._probe

    def recording(mask_mod, b, h, rows, cols):
        sizes.append(rows.numel() * cols.numel())
        return probe(mask_mod, b, h, rows, cols)

    monkeypatch.setattr(mc, "_probe", recording)
    causal = lambda b, h, q, kv: kv <= q
    mc.from_mask_mod(causal, [0, 50])
    mc.from_mask_mod(causal, batch_size=2, seq_len=30)
    mc.from_block_mask(flex.create_block_mask(causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=8))
    assert len(sizes) > 10 and max(sizes) <= 100


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((lambda b, h, q, kv: kv <= q,), {}, "either cu_seqlens .* or batch_size and seq_len"),
        ((lambda b, h, q, kv: kv <= q, [0, 4]), dict(batch_size=1, seq_len=4), "not both or neither"),
        ((lambda b, h, q, kv: kv <= q,), dict(batch_size=2, seq_len=-1), "seq_len must be a non-negative int"),
        ((lambda b, h, q, kv: (kv <= q).int(), [0, 4]), {}, "must return a bool"),
        (("causal", [0, 4]), {}, "mask_mod must be callable"),
        ((lambda b, h, q, kv: kv <= q, [0, 4, 3]), {}, "cu_seqlens must be non-decreasing"),
    ],
)
def test_from_mask_mod_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mc.from_mask_mod(*args, **kwargs)


def test_from_block_mask_packed_and_batched(small_probes):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    rng = random.Random(8)
    for _ in range(12):
        n = rng.randint(1, 40)
        cu = random_documents(rng, n)
        images = random_spans(rng, n, cu, 2)
        dense = spans_oracle(cu, images, [])
        bm = flex.create_block_mask(lambda b, h, q, kv: dense[q, kv], None, None, n, n, device="cpu", BLOCK_SIZE=8)
        assert_canonical_of(mc.from_block_mask(bm, cu), dense)
    per = random_dense_rows(torch.Generator().manual_seed(8), 3 * 20, 20).reshape(3, 20, 20)
    bm = flex.create_block_mask(lambda b, h, q, kv: per[b, q, kv], 3, None, 20, 20, device="cpu", BLOCK_SIZE=8)
    assert_canonical_of(mc.from_block_mask(bm), torch.block_diag(*per))


def test_from_block_mask_follows_full_blocks_and_heads():
    """Full blocks attend whatever the mask_mod says; pairs outside every block never do."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    n, bs = 12, 4
    # query block 0: key block 0 partial; query block 1: key block 1 full, key block 0 partial;
    # query block 2: key block 2 partial only.
    kv_num = torch.tensor([[[1, 1, 1]]], dtype=torch.int32)
    kv_idx = torch.tensor([[[[0, 0], [0, 0], [2, 0]]]], dtype=torch.int32)
    full_num = torch.tensor([[[0, 1, 0]]], dtype=torch.int32)
    full_idx = torch.tensor([[[[0, 0], [1, 0], [0, 0]]]], dtype=torch.int32)
    causal = lambda b, h, q, kv: kv <= q
    bm = flex.BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=causal, seq_lengths=(n, n)
    )
    expect = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            block = (i // bs, j // bs)
            if block == (1, 1):
                expect[i, j] = True  # full: even j > i
            elif block in ((0, 0), (1, 0), (2, 2)):
                expect[i, j] = j <= i
    assert_canonical_of(mc.from_block_mask(bm), expect)
    heads = flex.create_block_mask(lambda b, h, q, kv: (kv <= q) | (h == 1), None, 2, n, n, device="cpu", BLOCK_SIZE=4)
    with pytest.raises(ValueError, match="differs between heads 0 and 1 at query 0"):
        mc.from_block_mask(heads)
    with pytest.raises(ValueError, match="must be a torch BlockMask"):
        mc.from_block_mask(expect)


# ---------------------------------------------------------------------------------------------- HybridMask and docs
def test_hybrid_mask_classmethods_wrap_the_constructors():
    from transfusion_kernels import HybridMask

    rng = random.Random(9)
    for _ in range(20):
        n = rng.randint(1, 30)
        cu = random_documents(rng, n)
        images, hidden = random_spans(rng, n, cu, 2), random_spans(rng, n, cu, 3)
        mask = HybridMask.from_spans(cu, images, hidden_spans=hidden)
        assert torch.equal(mask.to_dense(), spans_oracle(cu, images, hidden))
        fast = HybridMask.from_spans(cu, images)  # no hidden spans: the K = 1 path, monotone
        assert fast.num_intervals == 1 and fast.monotone
        assert torch.equal(fast.to_dense(), spans_oracle(cu, images, []))
        split_lens, modes = random_splits(rng)
        got = HybridMask.from_splits(split_lens, modes)
        s, e, _ = mc.from_splits(split_lens, modes)
        assert torch.equal(got.starts, s) and torch.equal(got.ends, e)
    dense = spans_oracle([0, 9, 16], [(2, 5)], [(10, 12)])
    for mask in (
        HybridMask.from_dense(dense),
        HybridMask.from_mask_mod(lambda b, h, q, kv: dense[q, kv], [0, 9, 16]),
        HybridMask.from_padded([9], 16, [[(2, 5)]]),
    ):
        assert torch.equal(mask.to_dense()[:9, :9], dense[:9, :9])


def test_docs_examples_run():
    """Every python block of docs/masks.md runs, in order, as written (they assert their K)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "masks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 8
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/masks.md", "exec"), namespace)


def test_from_block_mask_random_blocks(small_probes):
    """Random block structures (none / partial / full per block) over a random mask_mod table."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    rng = random.Random(10)
    gen = torch.Generator().manual_seed(10)
    for _ in range(LAYOUTS):
        batch, n, bs = rng.choice([1, 1, 2, 3]), rng.randint(1, 20), rng.choice([4, 8])
        blocks = -(-n // bs)
        kind = torch.randint(0, 3, (batch, blocks, blocks), generator=gen)  # 0 none, 1 partial, 2 full
        table = torch.rand(batch, n, n, generator=gen) < 0.6

        def listing(which):
            num = (kind == which).sum(-1).to(torch.int32)[:, None]
            order = torch.argsort((kind != which).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            return num, order[:, None]

        bm = flex.BlockMask.from_kv_blocks(
            *listing(1),
            *listing(2),
            BLOCK_SIZE=bs,
            mask_mod=lambda b, h, q, kv, t=table: t[b, q, kv],
            seq_lengths=(n, n),
        )
        kinds, allowed = kind.tolist(), table.tolist()
        per = torch.tensor(
            [
                [
                    [
                        kinds[b][i // bs][j // bs] == 2 or (kinds[b][i // bs][j // bs] == 1 and allowed[b][i][j])
                        for j in range(n)
                    ]
                    for i in range(n)
                ]
                for b in range(batch)
            ],
            dtype=torch.bool,
        )
        assert_canonical_of(mc.from_block_mask(bm), torch.block_diag(*per))


def test_mask_pictures_script_draws_every_picture_the_docs_show(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("matplotlib")
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(root / "scripts" / "mask_pictures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=root,
    )
    drawn = {p.name for p in tmp_path.glob("*.png")}
    shown = set(re.findall(r"\(img/(mask_\w+\.png)\)", (root / "docs" / "masks.md").read_text()))
    assert len(shown) == 6 and drawn == shown
    assert shown <= {p.name for p in (root / "docs" / "img").glob("*.png")}  # committed
