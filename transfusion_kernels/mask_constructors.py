"""Other models' attention masks as key-interval unions, exactly.

Every constructor returns ``(starts, ends, num_keys)``: int32 ``[N, K]`` tensors in CANONICAL form,
the one :class:`~transfusion_kernels.HybridMask` takes. Row i lists the keys query i sees as its
maximal runs ``[starts[i, k], ends[i, k])`` in increasing order (two runs never touch:
``starts[i, k + 1] > ends[i, k]``); the unused trailing slots repeat the row's last end as empty
intervals (``(0, 0)`` for a row that sees nothing); K is the largest run count over the rows, at
least 1.

All of it is vectorised torch in O(N * K) memory (no Python loop per token or per row), except
:func:`from_dense`, whose input is dense anyway, and the mask_mod probes, which hold one chunk of
rows at a time. Python lists and tensors of any integer dtype are accepted and converted once.
Anything a constructor cannot express exactly is a one-line ``ValueError`` naming the first
offending sample, split, span or row.
"""

from __future__ import annotations

from typing import Callable

import torch

from transfusion_kernels.masks import INT32_MAX, _check_cu_seqlens, _first_bad, _int_values, check_spans

MODES = ("causal", "full", "noise")

# Keys probed per chunk of a mask_mod: bounds the memory of one probe (and its vmap temporaries).
PROBE_ELEMENTS = 1 << 22

_BIG = 2**62  # sorts after any int64 position


# ---------------------------------------------------------------------------------------------- canonical form
# Internally the intervals are slot-major, [K, R] (slot k of every row contiguous), so that each
# vectorised step runs along the long axis; the results are row-major int32 [R, K].
def _finish(starts, ends, count, width: int | None = None):
    """The int32 row-major canonical pair from slot-major int64 runs (row r's in slots 0 .. count[r] - 1),
    ``max(1, count.max())`` slots wide (or ``width``): the slots after a row's runs repeat its last end
    ((0, 0) for a row without runs)."""
    k = max(1, int(count.max()) if count.numel() else 1) if width is None else width
    if starts.shape[0] < k:
        pad = k - starts.shape[0]
        starts = torch.nn.functional.pad(starts, (0, 0, 0, pad))
        ends = torch.nn.functional.pad(ends, (0, 0, 0, pad))
    starts, ends = starts[:k], ends[:k]
    last = ends.gather(0, (count - 1).clamp_min(0)[None, :])
    last = torch.where(count[None, :] > 0, last, torch.zeros_like(last))
    unused = torch.arange(k, device=starts.device)[:, None] >= count[None, :]
    starts, ends = torch.where(unused, last, starts), torch.where(unused, last, ends)
    return starts.t().to(torch.int32).contiguous(), ends.t().to(torch.int32).contiguous()


def canonical_from_dense_rows(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical (starts, ends), int32 ``[R, K]``, of the rows of a bool ``[R, Nk]`` mask."""
    if not isinstance(dense, torch.Tensor) or dense.dtype != torch.bool or dense.dim() != 2:
        raise ValueError(
            f"dense rows must be a 2-D bool tensor, got {getattr(dense, 'dtype', type(dense).__name__)} "
            f"of shape {tuple(getattr(dense, 'shape', ()))}"
        )
    rows = dense.shape[0]
    padded = torch.nn.functional.pad(dense.to(torch.int8), (1, 1))
    step = padded[:, 1:] - padded[:, :-1]  # +1 where a run starts, -1 one past where it ends
    count = (step == 1).sum(1)
    k = max(1, int(count.max()) if rows else 1)
    first = torch.cumsum(count, 0) - count  # index of each row's first run in row-major order
    out = []
    for edge in (1, -1):
        r, col = torch.nonzero(step == edge, as_tuple=True)
        slot = torch.arange(r.numel(), device=dense.device) - first[r]
        t = torch.zeros(k, rows, dtype=torch.int64, device=dense.device)
        t[slot, r] = col
        out.append(t)
    return _finish(out[0], out[1], count, k)


def canonical_from_intervals(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical (starts, ends), int32 ``[R, K]``, of the unions of any integer ``[R, J]``
    half-open intervals ``[lo, hi)`` (in any order, overlapping or touching; ``hi <= lo`` is empty)."""
    lo, hi = lo.to(torch.int64), hi.to(torch.int64)
    order = torch.argsort(torch.where(hi <= lo, _BIG, lo), dim=1, stable=True)
    return _merge_sorted(lo.gather(1, order).t(), hi.gather(1, order).t())


def _merge_sorted(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """canonical_from_intervals of int64 intervals given slot-major, ``[J, R]`` (slot j of every
    row is contiguous, so each step runs along the long axis), whose non-empty intervals already
    come in order of their starts within a row (empty ones may sit anywhere)."""
    j, rows = lo.shape
    empty = hi <= lo
    reach = torch.cummax(torch.where(empty, -_BIG, hi), dim=0).values  # furthest end so far
    before = torch.cat([torch.full_like(reach[:1], -_BIG), reach[:-1]])
    new_run = ~empty & (lo > before)  # starts strictly after everything earlier: a new run
    run = torch.cumsum(new_run, 0) - 1
    count = new_run.sum(0)
    run = torch.where(empty, j, run)  # empties go to a discarded slot
    starts = torch.full((j + 1, rows), _BIG, dtype=torch.int64, device=lo.device)
    ends = torch.full((j + 1, rows), -_BIG, dtype=torch.int64, device=lo.device)
    starts.scatter_reduce_(0, run, lo, "amin")
    ends.scatter_reduce_(0, run, hi, "amax")
    return _finish(starts[:j], ends[:j], count)


def _pad_width(starts, ends, k: int):
    """A canonical pair widened to K = k slots (trailing slots repeat the last end)."""
    if starts.shape[1] == k:
        return starts, ends
    return _finish(starts.t().to(torch.int64), ends.t().to(torch.int64), interval_counts(starts, ends), k)


def interval_counts(starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """int64 [N]: the number of non-empty intervals per row of a canonical pair."""
    return (ends > starts).sum(1)


# ---------------------------------------------------------------------------------------------- inputs
def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] for a 1-D x and an index tensor of any shape (index_select: faster than indexing)."""
    return x.index_select(0, idx.reshape(-1)).view(idx.shape)


def _ints(x, name: str, device=None) -> torch.Tensor:
    """Integers as an int64 tensor on ``device`` (a tensor keeps its own device when device is None)."""
    t = _int_values(x, name, device)
    return t if device is None else t.to(device)


def _check_token_count(n: int, what: str) -> int:
    if n > INT32_MAX:
        raise ValueError(f"{what} = {n} tokens does not fit in int32 (at most {INT32_MAX})")
    return n


def _span_tensor(spans, name: str, device) -> torch.Tensor:
    t = _ints(spans, name, device)
    return t.reshape(0, 2) if t.numel() == 0 else t


# ---------------------------------------------------------------------------------------------- hiding
def _visible_minus_hidden(first, stop, hid_s, hid_e, own):
    """Canonical pair of ``[first[i], stop[i])`` minus the hidden spans ``[hid_s, hid_e)`` (sorted,
    disjoint, int64 [M]) other than span ``own[i]`` (-1: none), for every row i at once.

    Only the spans that start inside the window matter; each leaves a gap before it, so row i gets
    (its number of such spans + 1) candidate intervals, built slot-major ([slot, row]) by gathers
    and then made canonical."""
    r0 = torch.searchsorted(hid_s, first)  # first span starting at or after the window
    r1 = torch.searchsorted(hid_s, stop)  # spans starting before the window's end
    p = (r1 - r0).clamp_min(0)
    width = int(p.max()) + 1 if p.numel() else 1
    k = torch.arange(width, device=first.device)[:, None]
    m = hid_s.numel()

    def span(idx):  # span idx of each slot, the row's own span emptied (it stays visible)
        if not m:
            return torch.zeros_like(idx), torch.zeros_like(idx)
        s, e = _take(hid_s, idx.clamp(0, m - 1)), _take(hid_e, idx.clamp(0, m - 1))
        return s, torch.where(idx == own, s, e)

    _, prev_end = span(r0 + k - 1)
    next_start, _ = span(r0 + k)
    lo = torch.where(k == 0, first, prev_end)
    hi = torch.where(k < p, next_start, stop)
    hi = torch.where(k <= p, torch.minimum(hi, stop), lo)  # slots past p: empty
    return _merge_sorted(lo, hi)


# ---------------------------------------------------------------------------------------------- constructors
def from_splits(split_lens, modes, *, device=None):
    """BAGEL-style packing: samples made of splits, each ``"causal"``, ``"full"`` or ``"noise"``.

    ``split_lens[b]`` lists sample b's split lengths and ``modes[b]`` their modes; samples are
    packed one after another. Within a sample, a query of split t sees every key of the splits
    before t, plus its own split causally (``"causal"``) or whole (``"full"``, ``"noise"``); then
    the keys of every noise split are hidden from all queries outside that split. So a query sees
    ``[sample_start, own_end)`` minus the noise splits before its own. Splits may be empty.
    """
    if isinstance(split_lens, torch.Tensor) or isinstance(modes, (str, torch.Tensor)):
        raise ValueError(
            "split_lens and modes must be lists with one inner list per sample, "
            "e.g. split_lens=[[5, 16], [8]], modes=[['causal', 'noise'], ['causal']]"
        )
    if len(split_lens) != len(modes):
        raise ValueError(f"split_lens has {len(split_lens)} samples but modes has {len(modes)}")
    lens, codes, sample_of = [], [], []
    for b, (lengths, sample_modes) in enumerate(zip(split_lens, modes)):
        lengths = _ints(lengths, f"split_lens[{b}]").flatten().cpu()
        if isinstance(sample_modes, str) or len(sample_modes) != lengths.numel():
            raise ValueError(
                f"sample {b}: {lengths.numel()} split lengths but modes[{b}] = {sample_modes!r}: "
                f"give one mode per split"
            )
        for t, mode in enumerate(sample_modes):
            if mode not in MODES:
                raise ValueError(f"sample {b}, split {t}: mode {mode!r} is not one of {MODES}")
        t = _first_bad(lengths < 0)
        if t is not None:
            raise ValueError(f"sample {b}, split {t}: length {int(lengths[t])} is negative")
        lens.append(lengths)
        codes.append(torch.tensor([MODES.index(m) for m in sample_modes], dtype=torch.int64))
        sample_of.append(torch.full((lengths.numel(),), b, dtype=torch.int64))
    if device is None:
        device = next((x.device for x in split_lens if isinstance(x, torch.Tensor)), torch.device("cpu"))
    cat = (
        (lambda xs: torch.cat(xs).to(device)) if lens else (lambda xs: torch.zeros(0, dtype=torch.int64, device=device))
    )
    lens, codes, sample_of = cat(lens), cat(codes), cat(sample_of)
    n = _check_token_count(int(lens.sum()), "the packed length (sum of split_lens)")

    split_end = torch.cumsum(lens, 0)
    split_start = split_end - lens
    pos = torch.arange(n, device=device)
    sample_len = torch.zeros(len(modes), dtype=torch.int64, device=device).index_add_(0, sample_of, lens)
    sample_start = torch.cumsum(sample_len, 0) - sample_len

    # Per split first: a query of split t sees [sample start, end of t) minus the noise splits
    # before t (its own is never hidden from it; later ones start after its window). Every query
    # of a split gets the split's intervals, and a causal split's queries stop their last one at
    # themselves: two gathers per token.
    noise = (codes == 2) & (lens > 0)
    own = torch.where(noise, torch.cumsum(noise.to(torch.int64), 0) - 1, -1)  # index among noise splits
    split_starts, split_ends = _visible_minus_hidden(
        sample_start[sample_of], split_end, split_start[noise], split_end[noise], own
    )
    split_of = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens, output_size=n)
    starts, ends = split_starts[split_of], split_ends[split_of]
    last = (split_ends > split_starts).sum(1, keepdim=True)[split_of] - 1  # the slot holding the split itself
    causal = (codes == 0)[split_of, None]
    k = torch.arange(starts.shape[1], device=device)
    me = (pos + 1).to(torch.int32)[:, None]
    ends = torch.where(causal & (k >= last), me, ends)
    starts = torch.where(causal & (k > last), me, starts)
    return starts.contiguous(), ends.contiguous(), n


def from_spans(cu_seqlens, image_spans, hidden_spans=None):
    """The Transfusion mask (causal within each document, bidirectional within each image span)
    with hidden spans: a key inside a hidden span is seen by no query outside that span.

    cu_seqlens: [B + 1] document boundaries (0, ..., N); image_spans, hidden_spans: [M, 2]
    absolute half-open spans, each list sorted, non-overlapping, each span inside one document.
    A hidden span may hold text, an image or both (a noised copy of an image beside its clean
    copy, or lucidrains' "not attended" items); queries inside it see by the Transfusion rule.
    """
    cu = _ints(cu_seqlens, "cu_seqlens")
    device = cu.device
    _check_cu_seqlens(cu)
    n = _check_token_count(int(cu[-1]), "cu_seqlens[-1]")
    images = _span_tensor(image_spans, "image_spans", device)
    hidden = _span_tensor([] if hidden_spans is None else hidden_spans, "hidden_spans", device)
    check_spans(images, cu, "image_spans")
    check_spans(hidden, cu, "hidden_spans")

    pos = torch.arange(n, device=device)
    first = _take(cu, torch.searchsorted(cu, pos, right=True) - 1)
    stop = pos + 1
    if images.shape[0]:
        img = torch.searchsorted(images[:, 0].contiguous(), pos, right=True) - 1
        img_end = images[img.clamp_min(0), 1]
        stop = torch.where((img >= 0) & (pos < img_end), img_end, stop)
    hs, he = hidden[:, 0].contiguous(), hidden[:, 1].contiguous()
    own = torch.searchsorted(hs, pos, right=True) - 1  # the last hidden span starting at or before i
    inside = (own >= 0) & (pos < he[own.clamp_min(0)]) if he.numel() else torch.zeros_like(pos, dtype=torch.bool)
    own = torch.where(inside, own, -1)
    starts, ends = _visible_minus_hidden(first, stop, hs, he, own)
    return starts, ends, n


def from_padded(lengths, seq_len: int, image_spans=None, hidden_spans=None):
    """A padded batch ``[B, seq_len]`` laid out as B * seq_len tokens (sample b's token i is
    token ``b * seq_len + i``), with the Transfusion rule and hidden spans inside each sample.

    lengths: [B] real tokens per sample (the rest is right padding: padded tokens see nothing and
    are seen by nothing). image_spans, hidden_spans: per sample, in the sample's own positions,
    either a list of B lists of (start, end) or a [B, M, 2] tensor in which entries with
    start == end are padding and ignored.
    """
    lens = _ints(lengths, "lengths").flatten()
    device = lens.device
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    b = _first_bad((lens < 0) | (lens > seq_len))
    if b is not None:
        raise ValueError(f"lengths[{b}] = {int(lens[b])} is outside [0, seq_len = {seq_len}]")
    batch = lens.numel()
    _check_token_count(batch * seq_len, "batch size * seq_len")
    base = torch.arange(batch, device=device) * seq_len
    # Documents: each sample's real tokens, then its padding as a document of its own.
    cu = torch.cat(
        [
            torch.zeros(1 if batch else 2, dtype=torch.int64, device=device),
            torch.stack([base + lens, base + seq_len], 1).flatten(),
        ]
    )

    def absolute(spans, name):
        if spans is None:
            return torch.zeros(0, 2, dtype=torch.int64, device=device)
        if isinstance(spans, torch.Tensor):
            t = _ints(spans, name, device)
            if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != 2:
                raise ValueError(
                    f"{name} must be [B = {batch}, M, 2] or a list of B lists of (start, end), "
                    f"got shape {tuple(t.shape)}"
                )
            sample = torch.arange(batch, device=device)[:, None].expand(t.shape[:2])
            keep = t[..., 0] != t[..., 1]
            t, sample = t[keep], sample[keep]
        else:
            if len(spans) != batch:
                raise ValueError(f"{name} has {len(spans)} samples but lengths has {batch}")
            per = [
                _ints(s, f"{name}[{i}]", device).reshape(-1, 2)
                if len(s)
                else torch.zeros(0, 2, dtype=torch.int64, device=device)
                for i, s in enumerate(spans)
            ]
            sample = torch.repeat_interleave(
                torch.arange(batch, device=device),
                torch.tensor([p.shape[0] for p in per], dtype=torch.int64, device=device),
            )
            t = torch.cat(per) if per else torch.zeros(0, 2, dtype=torch.int64, device=device)
        m = _first_bad((t[:, 0] < 0) | (t[:, 1] > lens[sample]) | (t[:, 1] < t[:, 0]))
        if m is not None:
            raise ValueError(
                f"{name}: sample {int(sample[m])} has span ({int(t[m, 0])}, {int(t[m, 1])}), not a range "
                f"inside its {int(lens[sample[m]])} real tokens"
            )
        return t + base[sample][:, None]

    starts, ends, n = from_spans(cu, absolute(image_spans, "image_spans"), absolute(hidden_spans, "hidden_spans"))
    pos = torch.arange(n, device=device)
    padding = (pos % max(seq_len, 1)) >= lens.repeat_interleave(seq_len, output_size=n)
    zero = torch.zeros((), dtype=torch.int32, device=device)
    return torch.where(padding[:, None], zero, starts), torch.where(padding[:, None], zero, ends), n


def from_dense(mask: torch.Tensor, max_intervals: int | None = None):
    """A bool mask (True: may attend): ``[Nq, Nk]`` over packed tokens, or ``[B, L, L]`` with one
    sample per row, laid out as B * L tokens. K is the smallest that expresses it; a row needing
    more than ``max_intervals`` intervals is an error."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool (True: may attend), got {mask.dtype}; an additive float mask converts with `mask == 0`"
        )
    if max_intervals is not None and (
        isinstance(max_intervals, bool) or not isinstance(max_intervals, int) or max_intervals < 1
    ):
        raise ValueError(f"max_intervals must be a positive int or None, got {max_intervals!r}")
    if mask.dim() == 2:
        starts, ends = _rows_in_chunks(mask)
        num_keys = mask.shape[1]
    elif mask.dim() == 3:
        batch, length, keys = mask.shape
        if length != keys:
            raise ValueError(f"a batched mask must be [B, L, L], got {tuple(mask.shape)}")
        starts, ends = _rows_in_chunks(mask.reshape(batch * length, length))
        offset = (torch.arange(batch * length, device=mask.device) // max(length, 1) * length).to(torch.int32)
        seen = ends[:, :1] > starts[:, :1]  # canonical: a row sees something iff its first slot is non-empty
        starts = torch.where(seen, starts + offset[:, None], starts)
        ends = torch.where(seen, ends + offset[:, None], ends)
        num_keys = batch * length
    else:
        raise ValueError(f"mask must be [N, N] (packed) or [B, L, L] (one sample per row), got {tuple(mask.shape)}")
    _check_token_count(max(starts.shape[0], num_keys), "the mask's size")
    _check_max_intervals(starts, ends, max_intervals)
    return starts, ends, num_keys


def _rows_in_chunks(rows: torch.Tensor):
    """canonical_from_dense_rows a chunk of rows at a time: temporaries stay PROBE_ELEMENTS-sized."""
    return _probe_rows(lambda r0, r1: rows[r0:r1], rows.shape[0], rows.shape[1], rows.device)


def _check_max_intervals(starts, ends, max_intervals):
    if max_intervals is None or starts.shape[1] <= max_intervals:
        return
    count = interval_counts(starts, ends)
    row = _first_bad(count > max_intervals)
    raise ValueError(
        f"row {row} of the mask sees {int(count[row])} separate key ranges, more than max_intervals = {max_intervals}"
    )


# ---------------------------------------------------------------------------------------------- mask_mods
def _probe(mask_mod, b: int, h: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """bool [len(rows), len(cols)]: mask_mod at every (row, col), vmapped as FlexAttention does."""
    fn = torch.vmap(mask_mod, in_dims=(None, None, None, 0))
    fn = torch.vmap(fn, in_dims=(None, None, 0, None))
    bt = torch.tensor(b, device=rows.device)
    ht = torch.tensor(h, device=rows.device)
    out = fn(bt, ht, rows, cols)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool or tuple(out.shape) != (rows.numel(), cols.numel()):
        raise ValueError(
            f"mask_mod must return a bool scalar per (b, h, q_idx, kv_idx), got "
            f"{getattr(out, 'dtype', type(out).__name__)} of shape {tuple(getattr(out, 'shape', ()))}"
        )
    return out


def _probe_rows(visible_rows: Callable[[int, int], torch.Tensor], row_count: int, key_count: int, device):
    """Canonical pair of ``row_count`` rows, probing ``visible_rows(r0, r1)`` (bool [r1 - r0, key_count])
    in chunks of at most PROBE_ELEMENTS booleans."""
    step = max(1, PROBE_ELEMENTS // max(key_count, 1))
    return _stack(
        [canonical_from_dense_rows(visible_rows(r0, min(r0 + step, row_count))) for r0 in range(0, row_count, step)],
        device,
    )


def _stack(pairs, device):
    """Canonical pairs of consecutive rows, widened to the largest K and concatenated."""
    if not pairs:
        z = torch.zeros(0, 1, dtype=torch.int32, device=device)
        return z, z.clone()
    k = max(s.shape[1] for s, _ in pairs)
    pairs = [_pad_width(s, e, k) for s, e in pairs]
    return torch.cat([s for s, _ in pairs]), torch.cat([e for _, e in pairs])


def _padded_probe(visible, batch: int, seq_len: int, device):
    """Stack per-sample canonical pairs of a [B, L] layout into B * L token rows (keys offset by b * L)."""
    pairs = []
    for b in range(batch):
        s, e = _probe_rows(lambda r0, r1, b=b: visible(b, r0, r1), seq_len, seq_len, device)
        seen = e[:, :1] > s[:, :1]
        pairs.append((torch.where(seen, s + b * seq_len, s), torch.where(seen, e + b * seq_len, e)))
    return _stack(pairs, device)


def _check_documents(dense_rows, r0, doc_start, doc_end):
    """A packed mask keeps documents apart: the first visible pair across documents is an error."""
    cols = torch.arange(dense_rows.shape[1], device=dense_rows.device)
    lo, hi = doc_start[r0 : r0 + dense_rows.shape[0], None], doc_end[r0 : r0 + dense_rows.shape[0], None]
    across = dense_rows & ((cols[None, :] < lo) | (cols[None, :] >= hi))
    row = _first_bad(across.any(1))
    if row is not None:
        key = _first_bad(across[row])
        raise ValueError(
            f"the mask lets query {r0 + row} (document [{int(lo[row])}, {int(hi[row])})) see key {key} "
            f"in another document; fix the mask_mod or cu_seqlens (a packed mask must keep documents apart)"
        )


def _layout(cu_seqlens, batch_size, seq_len, device):
    """('packed', cu int64) or ('padded', (B, L)) from the keyword form of the mask_mod constructors."""
    if (cu_seqlens is None) == (batch_size is None and seq_len is None):
        raise ValueError(
            "give either cu_seqlens (packed, FlexAttention's b = 0 with global indices) or "
            "batch_size and seq_len (a padded [B, L] batch), not both or neither"
        )
    if cu_seqlens is not None:
        cu = _ints(cu_seqlens, "cu_seqlens", device)
        _check_cu_seqlens(cu)
        _check_token_count(int(cu[-1]), "cu_seqlens[-1]")
        return "packed", cu
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    _check_token_count(batch_size * seq_len, "batch_size * seq_len")
    return "padded", (batch_size, seq_len)


def from_mask_mod(mask_mod, cu_seqlens=None, *, batch_size: int | None = None, seq_len: int | None = None, device=None):
    """Probe a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` exactly, a chunk of rows at
    a time (never N x N at once), at head 0 (the mask must not depend on the head).

    Packed (``cu_seqlens``): FlexAttention's convention for packed batches, ``b = 0`` and global
    token indices; a visible pair across documents is an error. Padded (``batch_size``,
    ``seq_len``): ``b`` is the sample and indices are within it; the result covers B * seq_len
    tokens, sample b's token i being token ``b * seq_len + i``.
    """
    if not callable(mask_mod):
        raise ValueError(f"mask_mod must be callable (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}")
    kind, layout = _layout(cu_seqlens, batch_size, seq_len, device)
    if kind == "packed":
        cu = layout
        dev = cu.device if device is None else torch.device(device)
        n = int(cu[-1])
        pos = torch.arange(n, device=dev)
        cu = cu.to(dev)
        doc = torch.searchsorted(cu, pos, right=True) - 1
        doc_start, doc_end = cu[doc], cu[doc + 1]

        def visible(r0, r1):
            dense = _probe(mask_mod, 0, 0, pos[r0:r1], pos)
            _check_documents(dense, r0, doc_start, doc_end)
            return dense

        starts, ends = _probe_rows(visible, n, n, dev)
        return starts, ends, n
    batch, length = layout
    dev = torch.device("cpu") if device is None else torch.device(device)
    pos = torch.arange(length, device=dev)
    starts, ends = _padded_probe(lambda b, r0, r1: _probe(mask_mod, b, 0, pos[r0:r1], pos), batch, length, dev)
    return starts, ends, batch * length


def _block_map(num_blocks: torch.Tensor, indices: torch.Tensor, kv_blocks: int) -> torch.Tensor:
    """bool [B, H, Q blocks, KV blocks] from a BlockMask's (num_blocks, indices) pair."""
    used = torch.arange(indices.shape[-1], device=indices.device) < num_blocks[..., None]
    dense = torch.zeros(*indices.shape[:-1], kv_blocks + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, torch.where(used, indices.to(torch.int64), kv_blocks), True)
    return dense[..., :kv_blocks]


def from_block_mask(block_mask, cu_seqlens=None):
    """A FlexAttention BlockMask, exactly as flex_attention applies it: a pair is visible iff its
    block is a full block, or a partial block where ``block_mask.mask_mod`` allows it.

    A BlockMask with batch size 1 is packed (``b = 0``, global indices; ``cu_seqlens`` names the
    documents, one document by default, and then Q_LEN may differ from KV_LEN). A batch size B > 1
    is a padded ``[B, L]`` batch laid out as B * L tokens. Every head is probed; a mask that differs
    between heads is an error.
    """
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # pragma: no cover - torch without FlexAttention
        raise ValueError("from_block_mask needs torch.nn.attention.flex_attention (torch >= 2.5)") from None
    if not isinstance(block_mask, BlockMask):
        raise ValueError(f"block_mask must be a torch BlockMask, got {type(block_mask).__name__}")
    q_len, kv_len = (int(x) for x in block_mask.seq_lengths)
    qbs, kvbs = block_mask.BLOCK_SIZE
    batch, heads = block_mask.kv_num_blocks.shape[:2]
    dev = block_mask.kv_num_blocks.device
    kv_blocks = -(-kv_len // kvbs)
    partial = _block_map(block_mask.kv_num_blocks, block_mask.kv_indices, kv_blocks)
    full = torch.zeros_like(partial)
    if block_mask.full_kv_num_blocks is not None:
        full = _block_map(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, kv_blocks)

    def rows(b, h, r0, r1, cols):
        q = torch.arange(r0, r1, device=dev)
        qb, kb = q // qbs, cols // kvbs
        f, p = full[b, h][qb][:, kb], partial[b, h][qb][:, kb]
        return f | (p & _probe(block_mask.mask_mod, b, h, q, cols))

    def same_for_heads(b, r0, r1, cols):
        first = rows(b, 0, r0, r1, cols)
        for h in range(1, heads):
            other = rows(b, h, r0, r1, cols)
            row = _first_bad((other != first).any(1))
            if row is not None:
                raise ValueError(
                    f"the BlockMask differs between heads 0 and {h} at query {r0 + row}; "
                    f"one mask serves every head (build it with H=None)"
                )
        return first

    if batch == 1:
        cu = torch.tensor([0, q_len], device=dev)
        if cu_seqlens is not None:
            cu = _ints(cu_seqlens, "cu_seqlens", dev)
            _check_cu_seqlens(cu)
            if not int(cu[-1]) == q_len == kv_len:
                raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but the BlockMask is {q_len} x {kv_len}")
        keys = torch.arange(kv_len, device=dev)
        pos = torch.arange(q_len, device=dev)
        doc = torch.searchsorted(cu, pos, right=True) - 1

        def visible(r0, r1):
            dense = same_for_heads(0, r0, r1, keys)
            if cu_seqlens is not None:
                _check_documents(dense, r0, cu[doc], cu[doc + 1])
            return dense

        starts, ends = _probe_rows(visible, q_len, kv_len, dev)
        return starts, ends, kv_len
    if cu_seqlens is not None:
        raise ValueError(f"cu_seqlens is for a packed BlockMask (batch size 1), this one has batch size {batch}")
    if q_len != kv_len:
        raise ValueError(f"a batched BlockMask must be square, got Q_LEN = {q_len}, KV_LEN = {kv_len}")
    keys = torch.arange(q_len, device=dev)
    starts, ends = _padded_probe(lambda b, r0, r1: same_for_heads(b, r0, r1, keys), batch, q_len, dev)
    return starts, ends, batch * q_len


__all__ = [
    "MODES",
    "canonical_from_dense_rows",
    "canonical_from_intervals",
    "from_block_mask",
    "from_dense",
    "from_mask_mod",
    "from_padded",
    "from_spans",
    "from_splits",
    "interval_counts",
]
