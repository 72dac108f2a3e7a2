"""HybridMask constructors and the converters of other models' masks on random, mutated and
malformed input: a valid input gives the mask of a naive double loop (and tile plans that hold
on it), unions of K > 1 intervals included; anything else raises ValueError, never another
exception."""

from __future__ import annotations

import bisect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import budget, layouts
from tests.layouts import naive_dense
from tests.test_mask_constructors import naive_canonical, spans_oracle, splits_oracle
from tests.test_masks import check_tables
from transfusion_kernels import HybridMask
from transfusion_kernels import mask_constructors as mc


# ----------------------------------------------------------------------------------------------
# documents and images: valid layouts, then mutated ones
# ----------------------------------------------------------------------------------------------
def layout_is_valid(cu, spans) -> bool:
    """The rules of docs/design.md §1, stated independently of masks.py."""
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        return False
    n = cu[-1]
    for i, (s, e) in enumerate(spans):
        if not (0 <= s < e <= n):
            return False
        if i and s < spans[i - 1][1]:
            return False
        if bisect.bisect_right(cu, s) != bisect.bisect_right(cu, e - 1):  # one document
            return False
    return True


@st.composite
def mutated_layouts(draw):
    cu, spans = draw(layouts(max_tokens=40))
    cu, spans = list(cu), [list(p) for p in spans]
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["cu", "span", "swap", "drop_cu", "dup_span"]))
        if kind == "cu":
            i = draw(st.integers(0, len(cu) - 1))
            cu[i] += draw(st.integers(-3, 3))
        elif kind == "span" and spans:
            i, j = draw(st.integers(0, len(spans) - 1)), draw(st.integers(0, 1))
            spans[i][j] += draw(st.integers(-3, 3))
        elif kind == "swap" and len(spans) > 1:
            i = draw(st.integers(0, len(spans) - 2))
            spans[i], spans[i + 1] = spans[i + 1], spans[i]
        elif kind == "drop_cu" and cu:
            cu.pop(draw(st.integers(0, len(cu) - 1)))
        elif kind == "dup_span" and spans:
            spans.append(list(spans[-1]))
    return cu, [tuple(p) for p in spans]


def as_given(values, kind: str, shape=None):
    """The same integers as a python list or an int32 tensor; or in a form that must be refused."""
    if kind == "list":
        return values
    if kind == "int32":
        return torch.tensor(values, dtype=torch.int32).reshape(shape if shape is not None else -1)
    if kind == "int64":
        return torch.tensor(values, dtype=torch.int64)
    if kind == "float":
        return [float(v) if not isinstance(v, tuple) else tuple(float(x) for x in v) for v in values] or [0.5]
    raise AssertionError(kind)


KINDS = ["list", "int32", "int32", "int64", "float"]  # how the integers are given
INTEGER_KINDS = ("list", "int32", "int64")  # converted once; floats are refused, never truncated


@budget(300)
@given(
    layout=st.one_of(layouts(), mutated_layouts()),
    cu_kind=st.sampled_from(KINDS),
    span_kind=st.sampled_from(KINDS),
    bm=st.sampled_from([16, 32, 64]),
    bn=st.sampled_from([16, 32, 64]),
)
def test_from_spans(layout, cu_kind, span_kind, bm, bn):
    cu, spans = layout
    valid = layout_is_valid(cu, spans) and cu_kind in INTEGER_KINDS and span_kind in INTEGER_KINDS
    args = (as_given(cu, cu_kind), as_given(spans, span_kind, shape=(-1, 2) if spans else (0, 2)))
    if not valid:
        try:
            HybridMask.from_spans(*args)
        except ValueError:
            return
        raise AssertionError(f"accepted an invalid layout: cu_seqlens={cu} ({cu_kind}), spans={spans} ({span_kind})")
    mask = HybridMask.from_spans(*args)
    dense = naive_dense(cu, spans)
    assert torch.equal(mask.to_dense(), dense)
    assert mask.monotone and mask.visible_pairs() == int(dense.sum())
    check_tables(mask, dense, bm, bn, exact=True)


@budget(40)
@given(layout=layouts(), shape=st.sampled_from([(-1,), (1, -1), (-1, 1, 2), (2, -1)]))
def test_from_spans_wrong_shapes(layout, shape):
    """cu_seqlens not 1-D, spans not [M, 2]: ValueError."""
    cu, spans = layout
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        HybridMask.from_spans(torch.tensor(cu, dtype=torch.int32).reshape(1, -1), spans)
    flat = torch.tensor([x for p in spans for x in p], dtype=torch.int32)
    if flat.numel() == 0 or (shape == (2, -1) and flat.numel() % 4):
        return  # no spans at all reads as "no images", whatever the shape
    bad = flat.reshape(shape)
    if bad.dim() != 2 or bad.shape[1] != 2:
        with pytest.raises(ValueError, match=r"image_spans must have shape \[M, 2\]"):
            HybridMask.from_spans(cu, bad)


# ----------------------------------------------------------------------------------------------
# arbitrary intervals
# ----------------------------------------------------------------------------------------------
@budget(200)
@given(
    data=st.data(),
    nq=st.integers(0, 70),
    nk=st.integers(0, 70),
    num_keys=st.one_of(st.none(), st.integers(-2, 75)),
    kind=st.sampled_from(["list", "int32", "int32", "int64"]),
)
def test_from_intervals(data, nq, nk, num_keys, kind):
    s = data.draw(st.lists(st.integers(-2, nk + 2), min_size=nq, max_size=nq))
    e = data.draw(st.lists(st.integers(-2, nk + 2), min_size=nq, max_size=nq))
    if data.draw(st.booleans()):  # mostly well-formed: sorted pairs inside [0, nk]
        s, e = [min(max(a, 0), nk) for a in s], [min(max(b, 0), nk) for b in e]
        s, e = [min(a, b) for a, b in zip(s, e)], [max(a, b) for a, b in zip(s, e)]
    keys = num_keys if num_keys is not None else (max(e) if e else 0)
    valid = keys >= 0 and all(0 <= a <= b <= keys for a, b in zip(s, e))
    args = (as_given(s, kind), as_given(e, kind), num_keys)
    if not valid:
        try:
            HybridMask.from_intervals(*args)
        except ValueError:
            return
        raise AssertionError(f"accepted invalid intervals {list(zip(s, e))} with num_keys={num_keys} ({kind})")
    mask = HybridMask.from_intervals(*args)
    naive = torch.tensor([[a <= j < b for j in range(keys)] for a, b in zip(s, e)], dtype=torch.bool).reshape(nq, keys)
    assert torch.equal(mask.to_dense(), naive)
    monotone = all(s[i] <= s[i + 1] and e[i] <= e[i + 1] for i in range(nq - 1))
    assert mask.monotone == monotone
    if keys:
        check_tables(mask, naive, 16, 16, exact=monotone)


# ----------------------------------------------------------------------------------------------
# KV-cache masks (sampling)
# ----------------------------------------------------------------------------------------------
@budget(150)
@given(
    cache=st.lists(st.integers(-1, 40), max_size=4),
    new=st.lists(st.integers(-1, 20), max_size=4),
    bidirectional=st.booleans(),
    kind=st.sampled_from(["list", "int32", "int64", "float"]),
)
def test_cached(cache, new, bidirectional, kind):
    valid = len(cache) == len(new) and min(cache + new, default=0) >= 0 and kind != "float"
    if kind == "float":
        args = ([float(c) for c in cache] or [0.5], new)
    elif kind == "list":
        args = (cache, new)
    else:
        args = (torch.tensor(cache, dtype=getattr(torch, kind)), torch.tensor(new, dtype=torch.int64))
    if not valid:
        try:
            HybridMask.cached(*args, bidirectional=bidirectional)
        except ValueError:
            return
        raise AssertionError(f"accepted cache_lens={cache}, query_lens={new} ({kind})")
    mask = HybridMask.cached(*args, bidirectional=bidirectional)
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
    if nk:
        check_tables(mask, expect, 16, 16, exact=True)


# ----------------------------------------------------------------------------------------------
# unions of K intervals
# ----------------------------------------------------------------------------------------------
@budget(150)
@given(
    data=st.data(),
    nq=st.integers(1, 40),
    nk=st.integers(1, 60),
    k=st.integers(1, 9),
    kind=st.sampled_from(["list", "int32", "int64"]),
    broken=st.booleans(),
)
def test_from_intervals_union(data, nq, nk, k, kind, broken):
    """[Nq, K] endpoints: accepted iff every row's s0 <= e0 <= s1 <= ... <= e_{K-1} lies in [0, Nk]."""
    rows = [sorted(data.draw(st.lists(st.integers(0, nk), min_size=2 * k, max_size=2 * k))) for _ in range(nq)]
    if broken:  # one endpoint moved: out of order or out of range
        r, c = data.draw(st.integers(0, nq - 1)), data.draw(st.integers(0, 2 * k - 1))
        rows[r][c] += data.draw(st.sampled_from([-nk - 1, -2, -1, 1, 2, nk + 1]))
    s = [row[0::2] for row in rows]
    e = [row[1::2] for row in rows]
    valid = all(0 <= row[0] and row[-1] <= nk and row == sorted(row) for row in rows)
    args = (as_given(s, kind), as_given(e, kind), nk)
    if kind != "list":
        args = (args[0].reshape(nq, k), args[1].reshape(nq, k), nk)
    if not valid:
        try:
            HybridMask.from_intervals(*args)
        except ValueError:
            return
        raise AssertionError(f"accepted invalid intervals s={s}, e={e} with num_keys={nk}")
    mask = HybridMask.from_intervals(*args)
    naive = torch.tensor(
        [[any(a <= j < b for a, b in zip(s[i], e[i])) for j in range(nk)] for i in range(nq)], dtype=torch.bool
    )
    assert mask.num_intervals == k
    assert torch.equal(mask.to_dense(), naive)
    assert mask.visible_pairs() == int(naive.sum())
    check_tables(mask, naive, 16, 16, exact=False)


def as_mask(result, oracle):
    """The converter's intervals equal the canonical intervals of the oracle, and HybridMask takes them."""
    starts, ends, num_keys = result
    s, e = naive_canonical(oracle)
    assert starts.tolist() == s and ends.tolist() == e
    assert num_keys == oracle.shape[1]
    mask = HybridMask.from_intervals(starts, ends, num_keys)
    assert torch.equal(mask.to_dense(), oracle)
    if oracle.numel():
        check_tables(mask, oracle, 16, 16, exact=False)


@st.composite
def split_layouts(draw):
    """BAGEL samples (noise splits anywhere, consecutive, empty or one token), sometimes broken."""
    samples = draw(st.lists(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(mc.MODES)), max_size=9), max_size=3))
    lens = [[n for n, _ in sample] for sample in samples]
    modes = [[m for _, m in sample] for sample in samples]
    if samples and any(samples) and draw(st.booleans()):
        b = draw(st.sampled_from([i for i, x in enumerate(samples) if x]))
        t = draw(st.integers(0, len(samples[b]) - 1))
        fault = draw(st.sampled_from(["negative", "mode", "short"]))
        if fault == "negative":
            lens[b][t] = -draw(st.integers(1, 3))
        elif fault == "mode":
            modes[b][t] = draw(st.sampled_from(["bidirectional", "Causal", "", "noisy"]))
        else:
            modes[b] = modes[b][:-1]
        return lens, modes, False
    return lens, modes, True


@budget(150)
@given(layout=split_layouts(), kind=st.sampled_from(["list", "int32", "int64"]))
def test_from_splits(layout, kind):
    lens, modes, valid = layout
    given_lens = [x if kind == "list" else torch.tensor(x, dtype=getattr(torch, kind)) for x in lens]
    if not valid:
        with pytest.raises(ValueError):
            mc.from_splits(given_lens, modes)
        return
    as_mask(mc.from_splits(given_lens, modes), splits_oracle(lens, modes))


@budget(150)
@given(
    layout=layouts(max_tokens=50),
    hidden=st.one_of(layouts(max_tokens=50), mutated_layouts()),
    kind=st.sampled_from(["list", "int64"]),
)
def test_from_spans_hidden(layout, hidden, kind):
    """Hidden spans drawn over the same documents (valid) or from another, possibly broken, layout."""
    cu, images = layout
    hidden_spans = hidden[1]
    valid = layout_is_valid(cu, hidden_spans)
    args = (as_given(cu, kind), as_given(images, kind), as_given(hidden_spans, kind))
    if kind != "list":
        args = (args[0], args[1].reshape(-1, 2), args[2].reshape(-1, 2))
    if not valid:
        try:
            mc.from_spans(*args)
        except ValueError:
            return
        raise AssertionError(f"accepted hidden spans {hidden_spans} over cu_seqlens={cu}")
    as_mask(mc.from_spans(*args), spans_oracle(cu, images, hidden_spans))


@budget(100)
@given(
    data=st.data(), nq=st.integers(0, 30), nk=st.integers(0, 30), max_intervals=st.one_of(st.none(), st.integers(1, 6))
)
def test_from_dense(data, nq, nk, max_intervals):
    rows = data.draw(st.lists(st.lists(st.booleans(), min_size=nk, max_size=nk), min_size=nq, max_size=nq))
    dense = torch.tensor(rows, dtype=torch.bool).reshape(nq, nk)
    runs = max([1] + [len(r) for r in naive_canonical(dense)[0]]) if nq else 1
    if max_intervals is not None and runs > max_intervals:
        with pytest.raises(ValueError, match="more than max_intervals"):
            mc.from_dense(dense, max_intervals)
        return
    as_mask(mc.from_dense(dense, max_intervals), dense)
