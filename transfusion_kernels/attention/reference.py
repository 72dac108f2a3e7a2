"""Reference interval attention in plain PyTorch: the oracle the kernels are tested against.

fp32 math, outputs in the input dtype. Chunked over queries: consecutive query blocks are merged
into a chunk while that costs little more than keeping them apart, and each chunk only touches
the key range its queries can see, so a packed batch of documents costs about the sum of the
documents' L^2, not (sum L)^2, and a chunk's score block stays under ``_CHUNK_ELEMS`` floats
(32k-token inputs never allocate an N x N tensor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from transfusion_kernels.attention.plan import KernelPlan

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


def _chunks(starts: torch.Tensor, ends: torch.Tensor, heads: int):
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
    cap = max(_CHUNK_ELEMS // max(heads, 1), _ROWS)
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


def _scores(q, k, starts, ends, i0, i1, j0, j1, scale, softcap):
    """Masked fp32 scores [Hkv, G, chunk, span] for queries [i0, i1) against keys [j0, j1), and
    tanh of the capped scores (None without softcap)."""
    hkv = k.shape[1]
    qc = q[i0:i1].float().unflatten(1, (hkv, -1))  # [c, Hkv, G, D]
    kc = k[j0:j1].float()  # [s, Hkv, D]
    s = torch.einsum("chgd,shd->hgcs", qc, kc) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = softcap * t
    j = torch.arange(j0, j1, device=q.device)[None, :, None]
    visible = ((j >= starts[i0:i1, None, :]) & (j < ends[i0:i1, None, :])).any(-1)  # [c, s]
    return s.masked_fill(~visible, float("-inf")), t


def _probabilities(s, row_lse):
    """softmax(s) from its log-normaliser; 0 for rows that see no key (exp(-inf + inf) would be
    NaN there), while NaN in the inputs still propagates."""
    return torch.exp(s - row_lse[..., None]).masked_fill(torch.isneginf(row_lse)[..., None], 0.0)


def _intervals(starts, ends):
    return starts.reshape(starts.shape[0], -1), ends.reshape(ends.shape[0], -1)


def forward(q, k, v, starts, ends, plan, scale, softcap=0.0):
    nq, hq, d = q.shape
    starts, ends = _intervals(starts, ends)
    out = torch.zeros(nq, hq, v.shape[2], dtype=torch.float32, device=q.device)
    lse = torch.full((hq, nq), float("-inf"), dtype=torch.float32, device=q.device)
    for i0, i1, j0, j1 in _chunks(starts, ends, hq):
        if j1 <= j0:
            continue  # every query of the chunk sees nothing: output 0, lse -inf
        s, _ = _scores(q, k, starts, ends, i0, i1, j0, j1, scale, softcap)
        row_lse = torch.logsumexp(s, dim=-1)  # [Hkv, G, c]; -inf for empty rows
        p = _probabilities(s, row_lse)
        o = torch.einsum("hgcs,shd->chgd", p, v[j0:j1].float())
        out[i0:i1] = o.flatten(1, 2)
        lse[:, i0:i1] = row_lse.flatten(0, 1)
    return out.to(q.dtype), lse


def backward(dout, q, k, v, out, lse, starts, ends, plan, scale, softcap=0.0):
    nq, hq, d = q.shape
    hkv = k.shape[1]
    starts, ends = _intervals(starts, ends)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax backward's row term.
    delta = (dout.float() * out.float()).sum(-1).T  # [Hq, Nq]
    for i0, i1, j0, j1 in _chunks(starts, ends, hq):
        if j1 <= j0:
            continue
        s, t = _scores(q, k, starts, ends, i0, i1, j0, j1, scale, softcap)
        row_lse = lse[:, i0:i1].unflatten(0, (hkv, -1))  # [Hkv, G, c]
        p = _probabilities(s, row_lse)
        do = dout[i0:i1].float().unflatten(1, (hkv, -1))  # [c, Hkv, G, D]
        dv[j0:j1] += torch.einsum("hgcs,chgd->shd", p, do)
        dp = torch.einsum("chgd,shd->hgcs", do, v[j0:j1].float())
        ds = p * (dp - delta[:, i0:i1].unflatten(0, (hkv, -1))[..., None]) * scale
        if softcap:  # d(cap * tanh(s / cap)) / ds = 1 - tanh^2
            ds = ds * (1 - t * t)
        dq[i0:i1] = torch.einsum("hgcs,shd->chgd", ds, k[j0:j1].float()).flatten(1, 2)
        dk[j0:j1] += torch.einsum("hgcs,chgd->shd", ds, q[i0:i1].float().unflatten(1, (hkv, -1)))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
