"""``tk.flex_attention``: the hybrid-attention kernels behind torch's ``flex_attention`` signature.

A model written against ``torch.nn.attention.flex_attention.flex_attention(q, k, v, block_mask=bm,
score_mod=...)`` switches by changing that one call. The BlockMask is converted once into
interval form (``mask_constructors.from_block_mask``: probed exactly through its ``mask_mod``)
and cached on a weak reference to it, per batch size and lengths; arbitrary ``score_mod``s
cannot run in these kernels, the tanh logit cap they are mostly used for is ``softcap=``.
"""

from __future__ import annotations

import weakref

import torch

from transfusion_kernels.attention import hybrid_attention
from transfusion_kernels.masks import HybridMask

# BlockMask -> {(batch, Nq, Nk, device): HybridMask}; entries leave with their BlockMask.
_CONVERTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _per_sample(starts: torch.Tensor, ends: torch.Tensor, batch: int, nq: int, nk: int) -> HybridMask:
    """One sample's [nq, K] intervals repeated for ``batch`` samples laid out one after another."""
    offset = (torch.arange(batch, device=starts.device, dtype=torch.int32) * nk).repeat_interleave(nq)[:, None]
    return HybridMask.from_intervals(starts.repeat(batch, 1) + offset, ends.repeat(batch, 1) + offset, batch * nk)


def _mask_for(block_mask, batch: int, nq: int, nk: int, device) -> HybridMask:
    if block_mask is None:  # every query sees every key of its sample
        zeros = torch.zeros(nq, 1, dtype=torch.int32, device=device)
        return _per_sample(zeros, zeros + nk, batch, nq, nk)
    key = (batch, nq, nk, str(device))
    cache = _CONVERTED.setdefault(block_mask, {})
    if key not in cache:
        from transfusion_kernels.mask_constructors import from_block_mask

        q_len, kv_len = (int(x) for x in block_mask.seq_lengths)
        if (q_len, kv_len) != (nq, nk):
            raise ValueError(
                f"block_mask is for Q_LEN = {q_len}, KV_LEN = {kv_len}, but q has {nq} tokens and k {nk}; "
                "build the BlockMask for these lengths"
            )
        mask_batch = int(block_mask.kv_num_blocks.shape[0])
        starts, ends, _ = from_block_mask(block_mask)
        if mask_batch == 1:
            mask = _per_sample(starts.to(device), ends.to(device), batch, nq, nk)
        elif mask_batch == batch:
            mask = HybridMask.from_intervals(starts.to(device), ends.to(device), batch * nk)
        else:
            raise ValueError(
                f"block_mask has batch size {mask_batch} but q has {batch}; build it with B=None or B={batch}"
            )
        cache[key] = mask
    return cache[key]


def flex_attention(
    q,
    k,
    v,
    block_mask=None,
    *,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    softcap=None,
    score_mod=None,
    backend=None,
):
    """``torch.nn.attention.flex_attention.flex_attention`` on the hybrid-attention kernels.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] (Hq a multiple of Hkv with ``enable_gqa=True``);
    ``block_mask``: a BlockMask (one for every head; batch size 1 or B) or None (no mask);
    ``softcap=c`` maps scores to ``c * tanh(score / c)``. Returns out [B, Hq, Nq, D] (a view, as
    strided as the kernels wrote it) and, with ``return_lse``, lse [B, Hq, Nq] (natural log).
    """
    if score_mod is not None:
        raise ValueError(
            "tk.flex_attention does not run an arbitrary score_mod; for a tanh logit cap "
            "(score -> c * tanh(score / c)) pass softcap=c instead"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-D tensor [batch, heads, tokens, head_dim], got "
                f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}"
            )
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v must share the batch size and k, v their heads and tokens, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError(
            f"q has {q.shape[1]} heads and k {k.shape[1]}: pass enable_gqa=True for grouped-query attention"
        )
    mask = _mask_for(block_mask, q.shape[0], q.shape[2], k.shape[2], q.device)
    out, lse = hybrid_attention(
        q, k, v, mask, softmax_scale=scale, return_lse=True, backend=backend, softcap=softcap, layout="bhnd"
    )
    return (out, lse) if return_lse else out


__all__ = ["flex_attention"]
