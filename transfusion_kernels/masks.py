"""The Transfusion attention mask as one key interval per query.

Query i may see key j iff ``kv_start[i] <= j < kv_end[i]``. For the Transfusion rule (causal over
the packed sequence, bidirectional inside each image, no attention across documents):

    kv_start[i] = start of i's document
    kv_end[i]   = end of i's image if i is an image patch, else i + 1

The same contract covers plain causal, document, prefix-LM, sliding-window and the sampling masks
(a chunk of new queries against a cached prefix). Everything here is built with vectorised torch
ops on the input's device in O(N) memory; the per-tile tables that the kernels read are computed
once per block size and cached on the mask, so one mask serves every layer.
"""
from __future__ import annotations

import operator
import weakref

import torch

INT32_MAX = 2**31 - 1


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _as_int32(x, name: str, device=None) -> torch.Tensor:
    """An int32 tensor as given, or python integers converted (never truncating floats)."""
    if not isinstance(x, torch.Tensor):
        x = _int_values(x, name, device)
        if x.numel() and (int(x.min()) < -INT32_MAX - 1 or int(x.max()) > INT32_MAX):
            raise ValueError(f"{name} values must fit in int32, got values in [{int(x.min())}, {int(x.max())}]")
        x = x.to(torch.int32)
    if x.dtype != torch.int32:
        raise ValueError(f"{name} must be an int32 tensor, got dtype {x.dtype}")
    return x


def _int_values(x, name: str, device=None) -> torch.Tensor:
    """Integers (a tensor of an integer dtype, or python ints) as an int64 tensor."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name} must be integers (a tensor or a sequence of ints), got {x!r}: {e}") from None
        if x.numel() == 0:
            x = x.to(torch.int64)
    if x.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")
    return x.to(torch.int64)


def _check_block(block: int, name: str) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{name} must be a positive int, got {block!r}")
    return block


def _first_bad(bad: torch.Tensor) -> int | None:
    """Index of the first True in a 1-D bool tensor, or None (one device sync)."""
    idx = torch.nonzero(bad.flatten())
    return None if idx.numel() == 0 else int(idx[0])


def _check_cu_seqlens(cu: torch.Tensor) -> None:
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {int(cu[0])}")
    bad = _first_bad(cu[1:] < cu[:-1])
    if bad is not None:
        raise ValueError(
            f"cu_seqlens must be non-decreasing: cu_seqlens[{bad + 1}] = {int(cu[bad + 1])} "
            f"< cu_seqlens[{bad}] = {int(cu[bad])}"
        )


def _check_spans(spans: torch.Tensor, cu: torch.Tensor) -> None:
    if spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"image_spans must have shape [M, 2], got {tuple(spans.shape)}")
    if spans.device != cu.device:
        raise ValueError(f"image_spans is on {spans.device} but cu_seqlens is on {cu.device}")
    if spans.shape[0] == 0:
        return
    n = int(cu[-1])
    start, end = spans[:, 0].contiguous(), spans[:, 1].contiguous()
    checks = [
        (start < 0, "starts before 0"),
        (end > n, f"ends after the last token (N = {n})"),
        (end <= start, "is empty (end <= start)"),
    ]
    for bad_mask, why in checks:
        m = _first_bad(bad_mask)
        if m is not None:
            raise ValueError(f"image_spans[{m}] = ({int(start[m])}, {int(end[m])}) {why}")
    m = _first_bad(start[1:] < end[:-1])
    if m is not None:
        raise ValueError(
            f"image_spans[{m + 1}] = ({int(start[m + 1])}, {int(end[m + 1])}) begins before "
            f"image_spans[{m}] = ({int(start[m])}, {int(end[m])}) ends: spans must be sorted and non-overlapping"
        )
    doc_first = torch.searchsorted(cu, start, right=True)
    doc_last = torch.searchsorted(cu, end - 1, right=True)
    m = _first_bad(doc_first != doc_last)
    if m is not None:
        raise ValueError(
            f"image_spans[{m}] = ({int(start[m])}, {int(end[m])}) crosses a document boundary "
            f"(cu_seqlens = {cu.tolist() if cu.numel() <= 16 else '...'})"
        )


def _check_intervals(s, e, num_keys, monotone: bool | None) -> bool:
    """Validate an interval mask; returns whether it is monotone."""
    for name, t in (("kv_start", s), ("kv_end", e)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor, got {getattr(t, 'dtype', type(t).__name__)} "
                             f"of shape {tuple(getattr(t, 'shape', ()))}")
    if s.shape != e.shape:
        raise ValueError(f"kv_start and kv_end must be 1-D of equal length, got {tuple(s.shape)} and {tuple(e.shape)}")
    if e.device != s.device:
        raise ValueError(f"kv_end is on {e.device} but kv_start is on {s.device}")
    try:
        n = None if isinstance(num_keys, bool) else operator.index(num_keys)
    except TypeError:
        n = None
    if n is None or not 0 <= n <= INT32_MAX:
        raise ValueError(f"num_keys must be an int in [0, {INT32_MAX}], got {num_keys!r}")
    for bad, why in ((s < 0, "kv_start < 0"), (e < s, "kv_end < kv_start"), (e > n, f"kv_end > num_keys = {n}")):
        i = _first_bad(bad)
        if i is not None:
            raise ValueError(f"query {i}: interval [{int(s[i])}, {int(e[i])}) is invalid: {why}")
    is_monotone = bool(((s[1:] >= s[:-1]) & (e[1:] >= e[:-1])).all()) if s.numel() > 1 else True
    if monotone and not is_monotone:
        raise ValueError("monotone=True, but kv_start and kv_end are not both non-decreasing")
    return is_monotone


class HybridMask:
    """Per-query key intervals plus the tile tables the kernels need.

    Build with :meth:`from_spans` (Transfusion), :meth:`causal`, :meth:`from_intervals` (any
    interval mask) or :meth:`cached` (new tokens against a KV cache).
    """

    def __init__(self, kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int, *,
                 monotone: bool | None = None, _checked: bool = False):
        """Query i sees keys [kv_start[i], kv_end[i]) of ``num_keys``; both int32 [Nq] on one device.
        The intervals are checked (one device sync); ``monotone`` (kv_start and kv_end both
        non-decreasing) is computed when not given and verified when claimed."""
        if not _checked:
            monotone = _check_intervals(kv_start, kv_end, num_keys, monotone)
            kv_start, kv_end = kv_start.contiguous(), kv_end.contiguous()
        self.kv_start = kv_start
        self.kv_end = kv_end
        self.num_keys = int(num_keys)
        # kv_start and kv_end both non-decreasing in i: tile tables are exact and cheap.
        self.monotone = bool(monotone)
        self._tables: dict[tuple[str, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_spans(cls, cu_seqlens, image_spans) -> "HybridMask":
        """Transfusion mask: causal within each document, bidirectional within each image.

        cu_seqlens: int32 [B + 1] document boundaries (0, ..., N). image_spans: int32 [M, 2]
        absolute half-open (start, end) over patch tokens, sorted, non-overlapping, each inside
        one document.
        """
        cu = _as_int32(cu_seqlens, "cu_seqlens").contiguous()
        spans = _as_int32(image_spans, "image_spans", device=cu.device).contiguous()
        if spans.numel() == 0:
            spans = spans.reshape(0, 2)
        _check_cu_seqlens(cu)
        _check_spans(spans, cu)
        n = int(cu[-1])
        pos = torch.arange(n, dtype=torch.int32, device=cu.device)
        doc = torch.searchsorted(cu, pos, right=True, out_int32=True) - 1
        kv_start = cu[doc]
        kv_end = pos + 1
        if spans.shape[0] > 0:
            img = torch.searchsorted(spans[:, 0].contiguous(), pos, right=True, out_int32=True) - 1
            span_end = spans[:, 1][img.clamp_min(0)]
            inside = (img >= 0) & (pos < span_end)
            kv_end = torch.where(inside, span_end, kv_end)
        return cls(kv_start, kv_end, n, monotone=True, _checked=True)

    @classmethod
    def causal(cls, cu_seqlens) -> "HybridMask":
        """Causal attention within each document of a packed batch."""
        cu = _as_int32(cu_seqlens, "cu_seqlens")
        return cls.from_spans(cu, torch.zeros(0, 2, dtype=torch.int32, device=cu.device))

    @classmethod
    def from_intervals(cls, kv_start, kv_end, num_keys: int | None = None) -> "HybridMask":
        """Any interval mask: query i sees keys [kv_start[i], kv_end[i])."""
        s = _as_int32(kv_start, "kv_start")
        e = _as_int32(kv_end, "kv_end", device=s.device)
        if num_keys is None:
            num_keys = int(e.max()) if e.numel() and e.dim() == 1 else 0
        return cls(s, e, num_keys)

    @classmethod
    def cached(cls, cache_lens, query_lens, bidirectional: bool = False, device=None) -> "HybridMask":
        """New tokens of B sequences against their KV caches (sampling).

        Keys are packed per sequence as [cache_lens[b] cached keys, query_lens[b] new keys];
        queries are the new tokens, packed. New token j of sequence b sees its sequence's keys
        [0, cache_lens[b] + (query_lens[b] if bidirectional else j + 1)): an image chunk being
        denoised uses bidirectional=True, text decoding bidirectional=False.
        """
        cache = _int_values(cache_lens, "cache_lens", device).flatten()
        cache = cache if device is None else cache.to(device)
        new = _int_values(query_lens, "query_lens", cache.device).flatten().to(cache.device)
        if cache.shape != new.shape:
            raise ValueError(f"cache_lens and query_lens must have the same length, got {cache.numel()} and {new.numel()}")
        for name, t in (("cache_lens", cache), ("query_lens", new)):
            b = _first_bad(t < 0)
            if b is not None:
                raise ValueError(f"{name}[{b}] = {int(t[b])} is negative")
        seq_keys = cache + new
        for name, total in (("cache_lens + query_lens", int(seq_keys.sum())), ("query_lens", int(new.sum()))):
            if total > INT32_MAX:
                raise ValueError(f"sum of {name} = {total} does not fit in int32 (at most {INT32_MAX} tokens)")
        key_base = torch.cumsum(seq_keys, 0) - seq_keys
        nq = int(new.sum())
        seq = torch.repeat_interleave(torch.arange(new.numel(), device=cache.device), new, output_size=nq)
        j = torch.arange(nq, device=cache.device) - (torch.cumsum(new, 0) - new)[seq]
        kv_start = key_base[seq]
        kv_end = kv_start + cache[seq] + (new[seq] if bidirectional else j + 1)
        return cls(kv_start.to(torch.int32), kv_end.to(torch.int32), int(seq_keys.sum()), monotone=True, _checked=True)

    # ------------------------------------------------------------------ properties
    @property
    def num_queries(self) -> int:
        return self.kv_start.numel()

    @property
    def device(self) -> torch.device:
        return self.kv_start.device

    def visible_pairs(self) -> int:
        """Number of (query, key) pairs the mask allows: the FLOP count is 4 * D * Hq * this."""
        return int((self.kv_end - self.kv_start).to(torch.int64).sum())

    def to(self, device) -> "HybridMask":
        return HybridMask(self.kv_start.to(device), self.kv_end.to(device), self.num_keys, monotone=self.monotone,
                          _checked=True)

    def __repr__(self) -> str:
        return f"HybridMask(num_queries={self.num_queries}, num_keys={self.num_keys}, device={self.device})"

    # ------------------------------------------------------------------ tile tables
    def query_tiles(self, block_m: int) -> torch.Tensor:
        """int32 [ceil(Nq / block_m), 4]: per query tile (kv_lo, kv_hi, full_lo, full_hi).

        No query of the tile sees a key outside [kv_lo, kv_hi); every query of the tile sees
        every key in [full_lo, full_hi) (empty when full_lo >= full_hi). A key tile
        [n0, n0 + BN) is FULL iff full_lo <= n0 and n0 + BN <= full_hi.
        """
        key = ("q", _check_block(block_m, "block_m"))
        if key not in self._tables:
            self._tables[key] = self._query_tiles(block_m)
        return self._tables[key]

    def key_tiles(self, block_n: int) -> torch.Tensor:
        """int32 [ceil(Nk / block_n), 4]: per key tile (q_lo, q_hi, qfull_lo, qfull_hi).

        No query outside [q_lo, q_hi) sees a key of the tile; every query in
        [qfull_lo, qfull_hi) sees all of them. Exact for monotone masks; for others the query
        range is a superset (at query-tile granularity) and the full range is empty.
        """
        key = ("k", _check_block(block_n, "block_n"))
        if key not in self._tables:
            self._tables[key] = self._key_tiles(block_n)
        return self._tables[key]

    def _query_tiles(self, bm: int) -> torch.Tensor:
        n = self.num_queries
        t = -(-n // bm)
        pad = t * bm - n

        def tiled(x, fill):
            return torch.nn.functional.pad(x, (0, pad), value=fill).view(t, bm)

        s, e = self.kv_start, self.kv_end
        return torch.stack(
            [
                tiled(s, INT32_MAX).amin(1),
                tiled(e, 0).amax(1),
                tiled(s, 0).amax(1),
                tiled(e, INT32_MAX).amin(1),
            ],
            dim=1,
        ).to(torch.int32).contiguous()

    def _key_tiles(self, bn: int) -> torch.Tensor:
        nk, nq = self.num_keys, self.num_queries
        t = -(-nk // bn)
        n0 = torch.arange(t, dtype=torch.int32, device=self.device) * bn
        n1 = torch.clamp(n0 + bn, max=nk)
        s, e = self.kv_start, self.kv_end
        if self.monotone:
            q_lo = torch.searchsorted(e, n0, right=True, out_int32=True)  # first i with kv_end > n0
            q_hi = torch.searchsorted(s, n1, right=False, out_int32=True)  # first i with kv_start >= n1
            full_hi = torch.searchsorted(s, n0, right=True, out_int32=True)  # kv_start <= n0 before this
            full_lo = torch.searchsorted(e, n1, right=False, out_int32=True)  # kv_end >= n1 from here
            return torch.stack([q_lo, torch.maximum(q_hi, q_lo), full_lo, full_hi], 1).contiguous()
        # General masks: coverage at query-tile granularity, O((Nq / g) * (Nk / bn)) booleans.
        g = 64
        qt = self.query_tiles(g)
        touches = (qt[:, None, 0] < n1[None, :]) & (qt[:, None, 1] > n0[None, :])  # [Tq, Tk]
        any_q = touches.any(0)
        idx = torch.arange(qt.shape[0], dtype=torch.int32, device=self.device)[:, None]
        first = torch.where(touches, idx, INT32_MAX).amin(0)
        last = torch.where(touches, idx, -1).amax(0)
        q_lo = torch.where(any_q, first * g, 0)
        q_hi = torch.where(any_q, torch.clamp((last + 1) * g, max=nq), 0)
        zero = torch.zeros_like(q_lo)
        return torch.stack([q_lo, q_hi, zero, zero], 1).to(torch.int32).contiguous()

    # ------------------------------------------------------------------ exports
    def to_dense(self) -> torch.Tensor:
        """bool [Nq, Nk]; allocates N^2: for tests and small cases only."""
        j = torch.arange(self.num_keys, device=self.device)
        return (j[None, :] >= self.kv_start[:, None]) & (j[None, :] < self.kv_end[:, None])

    def to_flex_block_mask(self, block_size: int = 128):
        """The same mask as a torch FlexAttention BlockMask (for comparison and benchmarks)."""
        from torch.nn.attention.flex_attention import create_block_mask

        _check_block(block_size, "block_size")
        kv_start, kv_end = self.kv_start, self.kv_end

        def interval_mask(b, h, q_idx, kv_idx):
            return (kv_idx >= kv_start[q_idx]) & (kv_idx < kv_end[q_idx])

        return create_block_mask(
            interval_mask, B=None, H=None, Q_LEN=self.num_queries, KV_LEN=self.num_keys,
            device=self.device, BLOCK_SIZE=block_size,
        )


# ---------------------------------------------------------------------------------------------- work order
# id(table) -> (weak reference to the table, its order); a WeakKeyDictionary would compare
# tensors with == on a hash hit. Entries leave with their table.
_ORDERS: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def heaviest_first(table: torch.Tensor) -> torch.Tensor:
    """int32 [rows]: the tile indices of a tile table (``HybridMask.query_tiles`` /
    ``key_tiles``) by decreasing visit range ``hi - lo``, ties in tile order: the order in which
    a kernel's blocks take their tiles (block i processes tile order[i]), so that the longest
    tiles start in the first wave and the short ones fill the tail (a longest-first list
    schedule). Cached per table in eager mode (the mask caches the tables, so this runs once
    per mask and block size); computed in the graph under torch.compile."""
    compiling = torch.compiler.is_compiling()
    entry = None if compiling else _ORDERS.get(id(table))
    if entry is not None and entry[0]() is table:
        return entry[1]
    work = (table[:, 1] - table[:, 0]).clamp_min(0)
    order = torch.argsort(work, descending=True, stable=True).to(torch.int32)
    if not compiling:
        _ORDERS[id(table)] = (weakref.ref(table), order)
        weakref.finalize(table, _ORDERS.pop, id(table), None)
    return order
