"""Reference interval attention in plain PyTorch: the oracle the kernels are tested against.

fp32 math, outputs in the input dtype. Chunked over queries: each chunk only touches the key
range its queries can see, and a chunk's score block stays under ``_CHUNK_ELEMS`` floats, so
32k-token inputs never allocate an N x N tensor.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMS = 1 << 24  # fp32 score elements per chunk (64 MiB)


def prepare(mask, q, k):
    return [], []


def _chunks(kv_start: torch.Tensor, kv_end: torch.Tensor, heads: int, num_keys: int):
    """Yield (i0, i1, j0, j1): query chunks and the key range [j0, j1) their queries can see."""
    step = max(1, min(4096, _CHUNK_ELEMS // (heads * max(num_keys, 1))))
    starts, ends = kv_start.split(step), kv_end.split(step)
    lo = torch.stack([s.min() for s in starts]).tolist() if starts else []
    hi = torch.stack([e.max() for e in ends]).tolist() if ends else []
    for c, (j0, j1) in enumerate(zip(lo, hi)):
        yield c * step, c * step + starts[c].numel(), j0, j1


def _scores(q, k, kv_start, kv_end, i0, i1, j0, j1, scale):
    """Masked fp32 scores [Hkv, G, chunk, span] for queries [i0, i1) against keys [j0, j1)."""
    hkv = k.shape[1]
    qc = q[i0:i1].float().unflatten(1, (hkv, -1))  # [c, Hkv, G, D]
    kc = k[j0:j1].float()  # [s, Hkv, D]
    s = torch.einsum("chgd,shd->hgcs", qc, kc) * scale
    j = torch.arange(j0, j1, device=q.device)
    visible = (j[None, :] >= kv_start[i0:i1, None]) & (j[None, :] < kv_end[i0:i1, None])  # [c, s]
    return s.masked_fill(~visible, float("-inf")), visible


def _probabilities(s, row_lse):
    """softmax(s) from its log-normaliser; 0 for rows that see no key (exp(-inf + inf) would be
    NaN there), while NaN in the inputs still propagates."""
    return torch.exp(s - row_lse[..., None]).masked_fill(torch.isneginf(row_lse)[..., None], 0.0)


def forward(q, k, v, kv_start, kv_end, tables, blocks, scale):
    nq, hq, d = q.shape
    out = torch.zeros(nq, hq, v.shape[2], dtype=torch.float32, device=q.device)
    lse = torch.full((hq, nq), float("-inf"), dtype=torch.float32, device=q.device)
    for i0, i1, j0, j1 in _chunks(kv_start, kv_end, hq, k.shape[0]):
        if j1 <= j0:
            continue  # every query of the chunk sees nothing: output 0, lse -inf
        s, visible = _scores(q, k, kv_start, kv_end, i0, i1, j0, j1, scale)
        row_lse = torch.logsumexp(s, dim=-1)  # [Hkv, G, c]; -inf for empty rows
        p = _probabilities(s, row_lse)
        o = torch.einsum("hgcs,shd->chgd", p, v[j0:j1].float())
        out[i0:i1] = o.flatten(1, 2)
        lse[:, i0:i1] = row_lse.flatten(0, 1)
    return out.to(q.dtype), lse


def backward(dout, q, k, v, out, lse, kv_start, kv_end, tables, blocks, scale):
    nq, hq, d = q.shape
    hkv = k.shape[1]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax backward's row term.
    delta = (dout.float() * out.float()).sum(-1).T  # [Hq, Nq]
    for i0, i1, j0, j1 in _chunks(kv_start, kv_end, hq, k.shape[0]):
        if j1 <= j0:
            continue
        s, _ = _scores(q, k, kv_start, kv_end, i0, i1, j0, j1, scale)
        row_lse = lse[:, i0:i1].unflatten(0, (hkv, -1))  # [Hkv, G, c]
        p = _probabilities(s, row_lse)
        do = dout[i0:i1].float().unflatten(1, (hkv, -1))  # [c, Hkv, G, D]
        dv[j0:j1] += torch.einsum("hgcs,chgd->shd", p, do)
        dp = torch.einsum("chgd,shd->hgcs", do, v[j0:j1].float())
        ds = p * (dp - delta[:, i0:i1].unflatten(0, (hkv, -1))[..., None]) * scale
        dq[i0:i1] = torch.einsum("hgcs,shd->chgd", ds, k[j0:j1].float()).flatten(1, 2)
        dk[j0:j1] += torch.einsum("hgcs,chgd->shd", ds, q[i0:i1].float().unflatten(1, (hkv, -1)))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
