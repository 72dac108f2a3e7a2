"""The attention mask as key intervals per query: one interval, or a union of K.

Query i may see key j iff ``starts[i, k] <= j < ends[i, k]`` for some k. Per row the endpoints
are non-decreasing (``s0 <= e0 <= s1 <= e1 <= ...``): sorted, disjoint intervals; unused slots
are empty (``s == e``). K = 1 is the Transfusion mask (causal over the packed sequence,
bidirectional inside each image, no attention across documents):

    kv_start[i] = start of i's document
    kv_end[i]   = end of i's image if i is an image patch, else i + 1

The same contract covers plain causal, document, prefix-LM, sliding-window and the sampling masks
(a chunk of new queries against a cached prefix); K > 1 covers masks that hide part of a row's
past: BAGEL-style noise splits, hidden ("not attended") spans, sink plus window. Everything here
is built with vectorised torch ops on the input's device in O(N * K) memory. The kernels' tile
plans are built beside the attention op (``transfusion_kernels/attention/plan.py``) and cached on
the mask, so one mask serves every layer.
"""

from __future__ import annotations

import operator

import torch

INT32_MAX = 2**31 - 1


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _as_int32(x, name: str, device=None) -> torch.Tensor:
    """Integers (python ints, or a tensor of any integer dtype) as an int32 tensor, converted
    once; values outside int32 are an error, floats are never truncated."""
    x = _int_values(x, name, device) if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 else x
    if x.dtype != torch.int32:
        if x.numel() and (int(x.min()) < -INT32_MAX - 1 or int(x.max()) > INT32_MAX):
            raise ValueError(f"{name} values must fit in int32, got values in [{int(x.min())}, {int(x.max())}]")
        x = x.to(torch.int32)
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


def check_block(block: int, name: str) -> int:
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


def check_spans(spans: torch.Tensor, cu: torch.Tensor, name: str = "image_spans") -> None:
    """[M, 2] half-open spans ``name``: non-empty, sorted, disjoint, each inside one document."""
    if spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"{name} must have shape [M, 2], got {tuple(spans.shape)}")
    if spans.device != cu.device:
        raise ValueError(f"{name} is on {spans.device} but cu_seqlens is on {cu.device}")
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
            raise ValueError(f"{name}[{m}] = ({int(start[m])}, {int(end[m])}) {why}")
    m = _first_bad(start[1:] < end[:-1])
    if m is not None:
        raise ValueError(
            f"{name}[{m + 1}] = ({int(start[m + 1])}, {int(end[m + 1])}) begins before "
            f"{name}[{m}] = ({int(start[m])}, {int(end[m])}) ends: spans must be sorted and non-overlapping"
        )
    doc_first = torch.searchsorted(cu, start, right=True)
    doc_last = torch.searchsorted(cu, end - 1, right=True)
    m = _first_bad(doc_first != doc_last)
    if m is not None:
        raise ValueError(
            f"{name}[{m}] = ({int(start[m])}, {int(end[m])}) crosses a document boundary "
            f"(cu_seqlens = {cu.tolist() if cu.numel() <= 16 else '...'})"
        )


def _num_keys(num_keys) -> int:
    try:
        n = None if isinstance(num_keys, bool) else operator.index(num_keys)
    except TypeError:
        n = None
    if n is None or not 0 <= n <= INT32_MAX:
        raise ValueError(f"num_keys must be an int in [0, {INT32_MAX}], got {num_keys!r}")
    return n


def _check_intervals(s, e, num_keys: int, monotone: bool | None) -> bool:
    """Validate an interval mask (int32 [Nq] or [Nq, K]); returns whether it is monotone (K = 1,
    kv_start and kv_end both non-decreasing)."""
    for name, t in (("kv_start", s), ("kv_end", e)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() not in (1, 2):
            raise ValueError(
                f"{name} must be an int32 tensor [Nq] or [Nq, K], got "
                f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}"
            )
    if s.shape != e.shape:
        raise ValueError(f"kv_start and kv_end must have the same shape, got {tuple(s.shape)} and {tuple(e.shape)}")
    if s.dim() == 2 and s.shape[1] < 1:
        raise ValueError(f"a mask needs at least one interval slot per query, got shape {tuple(s.shape)}")
    if e.device != s.device:
        raise ValueError(f"kv_end is on {e.device} but kv_start is on {s.device}")
    n = num_keys
    if s.dim() == 1:
        for bad, why in ((s < 0, "kv_start < 0"), (e < s, "kv_end < kv_start"), (e > n, f"kv_end > num_keys = {n}")):
            i = _first_bad(bad)
            if i is not None:
                raise ValueError(f"query {i}: interval [{int(s[i])}, {int(e[i])}) is invalid: {why}")
        is_monotone = bool(((s[1:] >= s[:-1]) & (e[1:] >= e[:-1])).all()) if s.numel() > 1 else True
    else:
        ends = torch.stack([s, e], 2).flatten(1)  # [Nq, 2K]: s0, e0, s1, e1, ...
        checks = (
            (ends[:, 0] < 0, "a start < 0"),
            (ends[:, -1] > n, f"an end > num_keys = {n}"),
            (
                (ends[:, 1:] < ends[:, :-1]).any(1),
                "the endpoints must be non-decreasing (s0 <= e0 <= s1 <= e1 <= ...: sorted, disjoint intervals, "
                "unused slots empty)",
            ),
        )
        for bad, why in checks:
            i = _first_bad(bad)
            if i is not None:
                shown = ", ".join(f"[{a}, {b})" for a, b in zip(s[i].tolist(), e[i].tolist()))
                raise ValueError(f"query {i}: intervals {shown} are invalid: {why}")
        is_monotone = s.shape[1] == 1 and _check_intervals(s[:, 0], e[:, 0], n, None)
    if monotone and not is_monotone:
        raise ValueError("monotone=True, but kv_start and kv_end are not both non-decreasing (or K > 1)")
    return is_monotone


class HybridMask:
    """Per-query key intervals (one, or a union of K), shared by every layer.

    Build with :meth:`from_spans` (Transfusion), :meth:`causal`, :meth:`from_intervals` (any
    interval mask, K >= 1), :meth:`cached` (new tokens against a KV cache), or the converters of
    other models' masks (:meth:`from_splits`, :meth:`from_dense`, :meth:`from_mask_mod`,
    :meth:`from_block_mask`).
    """

    def __init__(
        self,
        kv_start: torch.Tensor,
        kv_end: torch.Tensor,
        num_keys: int,
        *,
        monotone: bool | None = None,
        _checked: bool = False,
    ):
        """Query i sees keys [kv_start[i, k], kv_end[i, k]) of ``num_keys`` for each k; both
        int32 [Nq] (one interval per query) or [Nq, K] (a union of K sorted, disjoint intervals,
        unused slots empty), on one device. The intervals are checked (one device sync);
        ``monotone`` (K = 1, kv_start and kv_end both non-decreasing) is computed when not given
        and verified when claimed."""
        if not _checked:
            num_keys = _num_keys(num_keys)
            monotone = _check_intervals(kv_start, kv_end, num_keys, monotone)
        self.starts = (kv_start[:, None] if kv_start.dim() == 1 else kv_start).contiguous()  # [Nq, K]
        self.ends = (kv_end[:, None] if kv_end.dim() == 1 else kv_end).contiguous()
        self.num_keys = int(num_keys)
        # kv_start and kv_end both non-decreasing in i (K = 1): key-tile plans are exact and cheap.
        self.monotone = bool(monotone)
        # Kernel plans built from this mask (attention/plan.py), by backend and block sizes.
        self.plans: dict[tuple, object] = {}

    @property
    def num_intervals(self) -> int:
        """K, the interval slots per query (1: the Transfusion mask and its fast path)."""
        return self.starts.shape[1]

    @property
    def kv_start(self) -> torch.Tensor:
        """int32 [Nq] for K = 1, else [Nq, K]: the interval starts."""
        return self.starts.view(-1) if self.num_intervals == 1 else self.starts

    @property
    def kv_end(self) -> torch.Tensor:
        """int32 [Nq] for K = 1, else [Nq, K]: the interval ends (exclusive)."""
        return self.ends.view(-1) if self.num_intervals == 1 else self.ends

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
        check_spans(spans, cu)
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
        """Any interval mask: query i sees keys [kv_start[i], kv_end[i]) (``[Nq]``), or the union
        of [kv_start[i, k], kv_end[i, k]) over k (``[Nq, K]``, sorted, disjoint, unused slots
        empty). Python lists and any integer dtype are accepted (converted once to int32);
        ``num_keys`` defaults to the largest end."""
        s = _as_int32(kv_start, "kv_start")
        e = _as_int32(kv_end, "kv_end", device=s.device)
        if num_keys is None:
            num_keys = int(e.max()) if e.numel() and e.dim() in (1, 2) else 0
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
            raise ValueError(
                f"cache_lens and query_lens must have the same length, got {cache.numel()} and {new.numel()}"
            )
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
        return self.starts.shape[0]

    @property
    def device(self) -> torch.device:
        return self.starts.device

    def visible_pairs(self) -> int:
        """Number of (query, key) pairs the mask allows: the FLOP count is 4 * D * Hq * this."""
        return int((self.ends - self.starts).to(torch.int64).sum())

    def to(self, device) -> "HybridMask":
        return HybridMask(
            self.starts.to(device), self.ends.to(device), self.num_keys, monotone=self.monotone, _checked=True
        )

    def __repr__(self) -> str:
        return (
            f"HybridMask(num_queries={self.num_queries}, num_keys={self.num_keys}, "
            f"num_intervals={self.num_intervals}, device={self.device})"
        )

    def visible(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """bool [len(rows), len(cols)]: whether query rows[a] sees key cols[b]."""
        s, e = self.starts[rows], self.ends[rows]  # [R, K]
        c = cols[None, :, None]
        return ((c >= s[:, None, :]) & (c < e[:, None, :])).any(-1)

    # ------------------------------------------------------------------ exports
    def to_dense(self) -> torch.Tensor:
        """bool [Nq, Nk]; allocates N^2: for tests and small cases only."""
        return self.visible(
            torch.arange(self.num_queries, device=self.device), torch.arange(self.num_keys, device=self.device)
        )

    def to_flex_block_mask(self, block_size: int = 128):
        """The same mask as a torch FlexAttention BlockMask (for comparison and benchmarks)."""
        from torch.nn.attention.flex_attention import create_block_mask

        check_block(block_size, "block_size")
        # one 1-D tensor per slot: the mask_mod is traced per element, indexed by q_idx only
        cols = [(self.starts[:, k].contiguous(), self.ends[:, k].contiguous()) for k in range(self.num_intervals)]

        def interval_mask(b, h, q_idx, kv_idx):
            seen = (kv_idx >= cols[0][0][q_idx]) & (kv_idx < cols[0][1][q_idx])
            for s, e in cols[1:]:
                seen = seen | ((kv_idx >= s[q_idx]) & (kv_idx < e[q_idx]))
            return seen

        return create_block_mask(
            interval_mask,
            B=None,
            H=None,
            Q_LEN=self.num_queries,
            KV_LEN=self.num_keys,
            device=self.device,
            BLOCK_SIZE=block_size,
        )

    # ------------------------------------------------------------------ other models' masks
    # Thin wrappers of transfusion_kernels.mask_constructors (imported on first use); each returns
    # the canonical [N, K] intervals of that model's rule, exactly, or a one-line ValueError.
    _transfusion_from_spans = from_spans  # the K = 1 fast path above, kept for hidden_spans=None

    @classmethod
    def from_spans(cls, cu_seqlens, image_spans, hidden_spans=None) -> "HybridMask":
        """Transfusion mask: causal within each document, bidirectional within each image.

        cu_seqlens: [B + 1] document boundaries (0, ..., N). image_spans: [M, 2] absolute
        half-open (start, end) over patch tokens, sorted, non-overlapping, each inside one
        document. hidden_spans: [M', 2] under the same rules; a key inside a hidden span is seen
        by no query outside that span (a noised copy of an image, lucidrains' "not attended"
        items): K grows by one per hidden span before a query.
        """
        if hidden_spans is None:
            return cls._transfusion_from_spans(cu_seqlens, image_spans)
        from transfusion_kernels import mask_constructors

        return cls(*mask_constructors.from_spans(cu_seqlens, image_spans, hidden_spans))

    @classmethod
    def from_splits(cls, split_lens, modes, *, device=None) -> "HybridMask":
        """BAGEL-style packing: per sample, split lengths and modes ("causal", "full", "noise");
        see ``mask_constructors.from_splits``."""
        from transfusion_kernels import mask_constructors

        return cls(*mask_constructors.from_splits(split_lens, modes, device=device))

    @classmethod
    def from_padded(cls, lengths, seq_len: int, image_spans=None, hidden_spans=None) -> "HybridMask":
        """A padded [B, seq_len] batch (per-sample lengths, spans in each sample's positions) as
        B * seq_len tokens; padded tokens see nothing and are seen by nothing. See
        ``mask_constructors.from_padded``."""
        from transfusion_kernels import mask_constructors

        return cls(*mask_constructors.from_padded(lengths, seq_len, image_spans, hidden_spans))

    @classmethod
    def from_dense(cls, mask: torch.Tensor, max_intervals: int | None = None) -> "HybridMask":
        """A bool mask, [Nq, Nk] (packed) or [B, L, L] (one sample per row), with the smallest K."""
        from transfusion_kernels import mask_constructors

        return cls(*mask_constructors.from_dense(mask, max_intervals))

    @classmethod
    def from_mask_mod(
        cls, mask_mod, cu_seqlens=None, *, batch_size: int | None = None, seq_len: int | None = None, device=None
    ) -> "HybridMask":
        """A FlexAttention mask_mod probed exactly in chunks: packed (``cu_seqlens``, b = 0, global
        indices; pairs across documents are an error) or padded (``batch_size``, ``seq_len``)."""
        from transfusion_kernels import mask_constructors

        return cls(
            *mask_constructors.from_mask_mod(
                mask_mod, cu_seqlens, batch_size=batch_size, seq_len=seq_len, device=device
            )
        )

    @classmethod
    def from_block_mask(cls, block_mask, cu_seqlens=None) -> "HybridMask":
        """A FlexAttention BlockMask exactly as flex_attention applies it (full blocks, and its
        mask_mod in partial blocks); batch size 1 is packed, more is a padded batch."""
        from transfusion_kernels import mask_constructors

        return cls(*mask_constructors.from_block_mask(block_mask, cu_seqlens))
