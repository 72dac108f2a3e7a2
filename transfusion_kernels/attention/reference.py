"""Reference interval attention in plain PyTorch: the oracle the kernels are tested against.

fp32 math, outputs in the input dtype. Chunked over queries: consecutive query blocks are merged
into a chunk while that costs little more than keeping them apart, and each chunk only touches
the key range its queries can see, so a packed batch of documents costs about the sum of the
documents' L^2, not (sum L)^2, and a chunk's score block stays under ``_CHUNK_ELEMS`` floats
(32k-token inputs never allocate an N x N tensor).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from transfusion_kernels.attention.plan import KernelPlan

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_CHUNK_ELEMS = 1 << 24  # fp32 score elements per chunk and all heads (64 MiB)
_ROWS = 64  # query rows per block that chunks are made of
_MERGE = 1.5  # merge two chunks while the merged score block is at most this much larger
_SMALL = 1 << 14  # score elements per head below which chunks merge anyway (per-call overhead)


@dataclass(frozen=True)
class _NoConfig:
    def to_list(self) -> list[int]:
        return []


@dataclass(frozen=True)
class Plan(KernelPlan):
    """The reference needs nothing precomputed: its chunks come from the intervals."""

    config: _NoConfig

    @classmethod
    def config_from(cls, ints):
        return _NoConfig()


def prepare(mask, q, k) -> Plan:
    return Plan(_NoConfig())


def _chunks(starts: torch.Tensor, ends: torch.Tensor, cap: int):
    """Yield (i0, i1, j0, j1): query chunks and the key range [j0, j1) their queries can see."""
    n = starts.shape[0]
    if n == 0:
        return
    nonempty = ends > starts
    lo = torch.where(nonempty, starts, torch.iinfo(torch.int32).max).amin(1)
    hi = torch.where(nonempty, ends, 0).amax(1)
    t = -(-n // _ROWS)
    pad = t * _ROWS - n
    lo = torch.nn.functional.pad(lo, (0, pad), value=torch.iinfo(torch.int32).max).view(t, _ROWS).amin(1).tolist()
    hi = torch.nn.functional.pad(hi, (0, pad), value=0).view(t, _ROWS).amax(1).tolist()
    i0, j0, j1 = 0, lo[0], hi[0]
    for b in range(1, t):
        r0, r1 = b * _ROWS, min((b + 1) * _ROWS, n)
        if lo[b] >= hi[b]:  # a block that sees nothing joins any chunk for free
            m0, m1 = j0, j1
        elif j0 >= j1:
            m0, m1 = lo[b], hi[b]
        else:
            m0, m1 = min(j0, lo[b]), max(j1, hi[b])
        merged = (r1 - i0) * max(m1 - m0, 0)
        apart = (r0 - i0) * max(j1 - j0, 0) + (r1 - r0) * max(hi[b] - lo[b], 0)
        if merged <= cap and (merged <= _MERGE * apart or merged <= _SMALL):
            j0, j1 = m0, m1
            continue
        yield i0, r0, j0, j1
        i0, j0, j1 = r0, lo[b], hi[b]
    yield i0, n, j0, j1


def _groups(starts: torch.Tensor, ends: torch.Tensor, heads: int):
    """The chunks that see keys, batched: consecutive chunks join a group while padding them all
    to the group's largest row count R and key span S wastes little and the [C, H, R, S] score
    block stays under the cap. Yields (rows [C, R], row_ok, keys [C, S], key_ok): token indices
    (padding clamped into the chunk) and which of them are real."""
    cap = max(_CHUNK_ELEMS // max(heads, 1), _ROWS)  # score elements per head of a chunk or group
    chunks = [c for c in _chunks(starts, ends, cap) if c[3] > c[2]]
    group: list = []
    for c in chunks + [None]:
        if c is not None and group:
            rows = max(max(g[1] - g[0] for g in group), c[1] - c[0])
            span = max(max(g[3] - g[2] for g in group), c[3] - c[2])
            padded = (len(group) + 1) * rows * span
            real = sum((g[1] - g[0]) * (g[3] - g[2]) for g in group + [c])
            if padded <= cap and padded <= _MERGE * real:
                group.append(c)
                continue
        if group:
            yield _indices(group, starts.device)
        group = [c] if c is not None else []


def _indices(group, device):
    lo = torch.tensor([[g[0], g[1], g[2], g[3]] for g in group], device=device)
    r = torch.arange(int((lo[:, 1] - lo[:, 0]).max()), device=device)
    s = torch.arange(int((lo[:, 3] - lo[:, 2]).max()), device=device)
    rows, keys = lo[:, :1] + r, lo[:, 2:3] + s
    row_ok, key_ok = rows < lo[:, 1:2], keys < lo[:, 3:4]
    return torch.minimum(rows, lo[:, 1:2] - 1), row_ok, torch.minimum(keys, lo[:, 3:4] - 1), key_ok


def _run(idx: torch.Tensor) -> slice | None:
    """The slice of tokens idx covers when it is one run of consecutive tokens (equal chunks of a
    packed batch), else None."""
    flat = idx.flatten()
    if flat.numel() and int(flat[-1] - flat[0]) + 1 == flat.numel() and bool((flat[1:] > flat[:-1]).all()):
        return slice(int(flat[0]), int(flat[-1]) + 1)
    return None


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] as fp32 (a view of a consecutive run)."""
    run = _run(idx)
    return x[idx].float() if run is None else x[run].float().view(*idx.shape, *x.shape[1:])


def _scatter(dst: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor, src: torch.Tensor, add: bool) -> None:
    """dst[idx[ok]] = src[ok] (or +=, where chunks may share tokens), as a slice when it can."""
    run = _run(idx)
    if run is not None and bool(ok.all()):
        target = dst[run].view(src.shape)  # src may be a permuted view: read in place, one pass
        if add:
            target.add_(src)
        else:
            target.copy_(src)
    elif add:
        dst.index_add_(0, idx[ok], src[ok])
    else:
        dst[idx[ok]] = src[ok]


def _hidden(starts, ends, rows, row_ok, keys, key_ok) -> torch.Tensor:
    """fp32 [C, 1, 1, R, S]: 0 for the pairs of each chunk its queries see, -inf for the others
    (added to the scores: many times faster than masked_fill with a broadcast mask on the CPU)."""
    j = keys[:, None, :, None]  # [C, 1, S, 1]
    visible = ((j >= starts[rows][:, :, None, :]) & (j < ends[rows][:, :, None, :])).any(-1)  # [C, R, S]
    visible &= row_ok[:, :, None] & key_ok[:, None, :]
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
    return bias.masked_fill_(~visible, float("-inf"))[:, None, None]


_CACHE_ELEMS = 1 << 23  # masks whose chunks hold more pairs than this recompute them per call


def _planned(starts: torch.Tensor, ends: torch.Tensor, heads: int) -> list:
    """[(rows, row_ok, keys, key_ok, hidden)] of every group, cached on the interval tensors (a
    mask's, shared by its layers and by forward and backward) while they are small and unchanged."""
    key = (heads, starts._version, ends._version)
    cached = getattr(starts, "_tk_reference_groups", None)
    if cached is not None and cached[0] == key and cached[1]() is ends:
        return cached[2]
    groups, size = [], 0
    for g in _groups(starts, ends, heads):
        groups.append((*g, _hidden(starts, ends, *g)))
        size += groups[-1][4].numel()
    if size <= _CACHE_ELEMS and not torch.compiler.is_compiling():
        starts._tk_reference_groups = (key, weakref.ref(ends), groups)
    return groups


def _heads(x: torch.Tensor, idx: torch.Tensor, factor: float = 1.0, transposed: bool = False) -> torch.Tensor:
    """x[idx] (tokens [C, L] of x [N, H, D]) as fp32 [C, H, L, D] (or [C, H, D, L]), head-major
    and contiguous (one pass that also scales it): the matmuls below read their second operand
    untransposed, several times faster on the CPU than through a transposed view."""
    src = _gather(x, idx).permute(0, 2, 3, 1) if transposed else _gather(x, idx).permute(0, 2, 1, 3)
    out = torch.empty(src.shape, dtype=torch.float32, device=x.device)
    return torch.mul(src, factor, out=out) if factor != 1.0 else out.copy_(src)


def _query_factor(scale: float, softcap: float) -> float:
    """What the queries are multiplied by before Q K^T: the scale, in base 2 (times log2(e):
    torch.exp2 of the masked -inf is many times faster than torch.exp on the CPU), or over the
    cap when there is one."""
    return scale / softcap if softcap else scale * _LOG2E


_WORKSPACE = threading.local()
_KEEP = 1 << 22  # fp32 elements of score-block workspace a thread keeps between calls (16 MiB)


def _block(slot: int, shape, device) -> torch.Tensor:
    """An uninitialised fp32 score block from this thread's workspace ``slot`` (0: scores and
    probabilities, 1: dP and dS). Fresh multi-MiB CPU allocations cost their page faults on
    every call, about as much as the score arithmetic here; larger blocks, and GPU ones, are
    allocated as usual."""
    n = 1
    for x in shape:
        n *= x
    if device.type != "cpu" or n > _KEEP:
        return torch.empty(shape, dtype=torch.float32, device=device)
    slots = _WORKSPACE.__dict__.setdefault("slots", {})
    buf = slots.get(slot)
    if buf is None or buf.numel() < n:
        buf = slots[slot] = torch.empty(n, dtype=torch.float32)
    return buf[:n].view(shape)


def _scores(qh, kt, hidden, softcap):
    """Masked fp32 base-2 scores [C, Hkv, G, R, S] of each chunk's queries qh [C, Hq, R, D]
    (already times ``_query_factor``) against its keys kt [C, Hkv, D, S] (``hidden``: -inf on the
    pairs to mask), and tanh of the capped scores (None without softcap). The query heads of a
    key head are consecutive: [C, Hkv, G * R, D] times [C, Hkv, D, S] is one batched matmul."""
    c, hq, r, d = qh.shape
    hkv = kt.shape[1]
    s = torch.matmul(qh.view(c, hkv, -1, d), kt, out=_block(0, (c, hkv, hq // hkv * r, kt.shape[-1]), qh.device))
    s = s.view(c, hkv, hq // hkv, r, -1)
    t = None
    if softcap:
        t = torch.tanh(s)
        s = t * (softcap * _LOG2E)
    if bool(torch.isfinite(s.sum())):  # every score finite (one pass; an overflowing sum only costs the slow path)
        return s.add_(hidden), t
    # a non-finite score (inf + -inf would be NaN): mask by selection, so that a hidden pair is
    # -inf whatever its score and only a visible NaN or inf reaches its row
    return s.masked_fill_(torch.isneginf(hidden), float("-inf")), t


def _intervals(starts, ends):
    return (starts[:, None], ends[:, None]) if starts.dim() == 1 else (starts, ends)


def forward(q, k, v, starts, ends, plan, scale, softcap=0.0):
    nq, hq, d = q.shape
    hkv = k.shape[1]
    starts, ends = _intervals(starts, ends)
    out = torch.zeros(nq, hq, v.shape[2], dtype=torch.float32, device=q.device)
    lse = torch.full((nq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for rows, row_ok, keys, key_ok, hidden in _planned(starts, ends, hq):
        qh = _heads(q, rows, _query_factor(scale, softcap))
        s, _ = _scores(qh, _heads(k, keys, transposed=True), hidden, softcap)  # [C, Hkv, G, R, S]
        # softmax with one exp2: a row that sees nothing gets p = 0, lse = -inf
        m = s.amax(-1, keepdim=True)
        m.masked_fill_(torch.isneginf(m), 0.0)
        p = torch.exp2(s.sub_(m), out=s)
        total = p.sum(-1, keepdim=True)  # [C, Hkv, G, R, 1]
        row_lse = (m + torch.log2(total)).mul_(_LN2).view(p.shape[0], hq, -1)  # [C, Hq, R]
        c, _, g, r, _ = p.shape
        o = torch.matmul(p.view(c, hkv, g * r, -1), _heads(v, keys))  # [C, Hkv, G * R, Dv]
        o = o.view(c, hkv, g, r, -1).div_(total.masked_fill_(total == 0, 1.0)).view(c, hq, r, -1)
        _scatter(out, rows, row_ok, o.permute(0, 2, 1, 3), add=False)  # token-major [C, R, Hq, Dv]
        lse[rows[row_ok]] = row_lse.transpose(1, 2)[row_ok]
    return out.to(q.dtype), lse.T.contiguous()


def backward(dout, q, k, v, out, lse, starts, ends, plan, scale, softcap=0.0):
    nq, hq, d = q.shape
    hkv = k.shape[1]
    starts, ends = _intervals(starts, ends)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax backward's row term.
    delta = (dout.float() * out.float()).sum(-1)  # [Nq, Hq]
    # rows that see nothing (lse = -inf): subtract +inf instead, so that p = exp(-inf) = 0
    lse_t = lse.T.masked_fill(torch.isneginf(lse.T), float("inf")) * _LOG2E  # [Nq, Hq], base 2
    factor = _query_factor(scale, softcap)
    dk_factor = scale / factor if factor else 0.0  # dK from the scaled queries (scale 0: dK = 0)
    for rows, row_ok, keys, key_ok, hidden in _planned(starts, ends, hq):
        qh, doh = _heads(q, rows, factor), _heads(dout, rows)
        kh, kt, vt = _heads(k, keys), _heads(k, keys, transposed=True), _heads(v, keys, transposed=True)
        c, r, s_len = rows.shape[0], rows.shape[1], keys.shape[1]
        s, t = _scores(qh, kt, hidden, softcap)  # [C, Hkv, G, R, S]
        row_lse = lse_t[rows].permute(0, 2, 1).reshape(c, hkv, -1, r, 1)  # [C, Hkv, G, R, 1]
        p = torch.exp2(s.sub_(row_lse), out=s).view(c, hkv, -1, s_len)  # [C, Hkv, G * R, S]
        do = doh.view(c, hkv, -1, doh.shape[-1])  # [C, Hkv, G * R, Dv]
        dv_h = torch.matmul(p.transpose(-1, -2), do)  # [C, Hkv, S, Dv], summed over the group
        row_delta = delta[rows].permute(0, 2, 1).reshape(c, hkv, -1, 1)  # [C, Hkv, G * R, 1]
        ds = torch.matmul(do, vt, out=_block(1, p.shape, p.device)).sub_(row_delta).mul_(p)
        if softcap:  # d(cap * tanh(s / cap)) / ds = 1 - tanh^2
            ds.mul_((1 - t * t).view(ds.shape))
        dq_h = torch.matmul(ds, kh).mul_(scale).view(c, hq, r, -1)  # [C, Hq, R, D]
        dk_h = torch.matmul(ds.transpose(-1, -2), qh.view(c, hkv, -1, d)).mul_(dk_factor)  # [C, Hkv, S, D]
        # token-major [C, L, H, D] views; chunks may share keys (a cached prefix): dK, dV add up
        _scatter(dq, rows, row_ok, dq_h.permute(0, 2, 1, 3), add=False)
        _scatter(dk, keys, key_ok, dk_h.permute(0, 2, 1, 3), add=True)
        _scatter(dv, keys, key_ok, dv_h.permute(0, 2, 1, 3), add=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
