"""Triton interval-mask attention (FlashAttention-2 style), forward and backward.

Query i sees keys ``kv_start[i] <= j < kv_end[i]``. The mask's tile tables tell each program
which key (or query) blocks to visit and which of them every row sees in full:

* forward and dq, one program per (query head, query tile): key blocks outside
  ``[kv_lo, kv_hi)`` are never loaded; blocks inside ``[full_lo, full_hi)`` run with no mask
  arithmetic and unmasked loads; the few blocks in between apply the interval test.
* dk/dv, one program per (kv head, key tile): query blocks come from the key table's
  ``[q_lo, q_hi)``, FULL inside ``[qfull_lo, qfull_hi)``; the program loops over the query heads
  of its GQA group, so dk/dv are summed without atomics (deterministic) and K/V are never copied.

The FULL run of blocks is anchored at ``full_lo`` (not at a multiple of the block size), so a
document that starts mid-tile still gets unmasked blocks; the masked blocks before it end
exactly at ``full_lo`` and may start below ``kv_lo``: their loads are masked to ``[kv_lo, kv_hi)``.

Softmax runs in fp32 in base 2 (``log2(e)`` folded into the scale); ``lse`` is stored in natural
log, ``-inf`` for a query that sees nothing (its output and gradients are 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# Block configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Block sizes (the tile tables depend on them) and launch parameters.

    ``blocks`` order, as handed from ``prepare`` to ``forward``/``backward``:
    (fwd query tile, fwd key step, dk/dv key tile, dk/dv query step, dq query tile, dq key step).
    """

    block_m: int
    block_n: int
    kv_block_n: int
    kv_block_m: int
    dq_block_m: int
    dq_block_n: int
    fwd_warps: int = 4
    fwd_stages: int = 3
    bwd_warps: int = 4
    bwd_stages: int = 3

    @property
    def blocks(self) -> list[int]:
        return [self.block_m, self.block_n, self.kv_block_n, self.kv_block_m, self.dq_block_m, self.dq_block_n]


# Small blocks under the interpreter: fast enough on a CPU and every tile edge gets exercised.
INTERPRET_CONFIG = Config(32, 16, 32, 16, 32, 16, 1, 1, 1, 1)

# GPU defaults per (padded head dim, element size), chosen for H100 (sm_90) and fine on A100:
# forward BM=128/BN=64 for D<=128 as in FlashAttention-2; the backward uses narrow inner steps
# (32) so the dk/dv and dq accumulators stay in registers; D=256 and fp32 halve the tiles.
GPU_CONFIGS: dict[tuple[int, int], Config] = {
    (32, 2): Config(128, 64, 128, 32, 128, 32, 4, 3, 4, 4),
    (64, 2): Config(128, 64, 128, 32, 128, 32, 4, 3, 4, 4),
    (128, 2): Config(128, 64, 128, 32, 128, 32, 8, 3, 8, 3),
    (256, 2): Config(64, 32, 64, 32, 64, 32, 8, 2, 8, 2),
    (32, 4): Config(64, 32, 64, 32, 64, 32, 4, 2, 4, 2),
    (64, 4): Config(64, 32, 64, 32, 64, 32, 4, 2, 4, 2),
    (128, 4): Config(64, 32, 32, 32, 64, 32, 4, 2, 4, 2),
    (256, 4): Config(32, 16, 32, 16, 32, 16, 4, 1, 4, 1),
}


def _padded_head_dim(d: int) -> int:
    if not 1 <= d <= 256:
        raise ValueError(f"head dim must be in [1, 256] for the triton backend, got {d}")
    return max(16, triton.next_power_of_2(d))


def pick_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> Config:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32 for the triton backend, got {dtype}")
    dp = _padded_head_dim(head_dim)
    if torch.device(device).type != "cuda":  # the interpreter
        return INTERPRET_CONFIG
    return GPU_CONFIGS[(dp, 4 if dtype == torch.float32 else 2)]


def _launch_params(blocks: list[int], head_dim: int, dtype: torch.dtype, device: torch.device) -> Config:
    """The config for ``blocks``: the default one when they match it, else the same warps and
    stages with the given blocks (callers may pass their own block sizes through ``prepare``)."""
    cfg = pick_config(head_dim, dtype, device)
    if list(blocks) == cfg.blocks:
        return cfg
    bm, bn, kbn, kbm, qbm, qbn = blocks
    return Config(bm, bn, kbn, kbm, qbm, qbn, cfg.fwd_warps, cfg.fwd_stages, cfg.bwd_warps, cfg.bwd_stages)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _phases(lo, hi, full_lo, full_hi, B: tl.constexpr):
    """Split the visit range [lo, hi) into masked [start, f_start), FULL [f_start, f_end) (whole
    blocks of B anchored at full_lo) and masked [f_end, hi). Without a whole FULL block, the
    entire range is masked."""
    n_full = tl.maximum(full_hi - full_lo, 0) // B
    has_full = n_full > 0
    f_start = tl.where(has_full, full_lo, hi)
    f_end = f_start + n_full * B
    # masked blocks before the FULL run end exactly at f_start
    start = tl.where(has_full, f_start - ((f_start - lo + B - 1) // B) * B, lo)
    return start, f_start, f_end


@triton.jit
def _load(ptrs, rows, lo, hi, offs_d, D: tl.constexpr, DP: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [rows, DP] tile; rows outside [lo, hi) and padded head-dim columns read 0."""
    if CHECK_ROWS:
        if DP != D:
            x = tl.load(ptrs, mask=((rows >= lo) & (rows < hi))[:, None] & (offs_d < D)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=((rows >= lo) & (rows < hi))[:, None], other=0.0)
    else:
        if DP != D:
            x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store(ptrs, x, row_ok, offs_d, D: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr):
    """Store an fp32 [rows, DP] tile in the buffer's dtype, skipping padded rows and columns."""
    y = _cast(x, ptrs.dtype.element_ty, PREC).to(ptrs.dtype.element_ty)
    if DP != D:
        tl.store(ptrs, y, mask=row_ok[:, None] & (offs_d < D)[None, :])
    else:
        tl.store(ptrs, y, mask=row_ok[:, None])


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation. PREC "upcast" (bf16 under the interpreter, which has no
    bf16 matmul): the operands go to fp32 first; bf16 x bf16 products are exact in fp32, so the
    numerics are those of the GPU's bf16 dot."""
    if PREC == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=PREC)
    return c


@triton.jit
def _cast(x, dtype, PREC: tl.constexpr):
    """x.to(dtype). Under "upcast" the interpreter's fp32 -> bf16 conversion truncates; round to
    nearest even by hand instead, as the GPU does, and keep the (bf16-exact) value in fp32."""
    if PREC == "upcast":
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        y = b.to(tl.float32, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, kvs, kve, k_base, v_base, k_rel, v_rel, s_kn, s_vn,
               offs_n, offs_d, start, end, kv_lo, kv_hi, qk_scale,
               D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
               MASKED: tl.constexpr, PREC: tl.constexpr):
    # loop-carried pointers (int64 base: N * stride may pass 2**31)
    k_ptrs = k_base + start.to(tl.int64) * s_kn + k_rel
    v_ptrs = v_base + start.to(tl.int64) * s_vn + v_rel
    for n0 in range(start, end, BN):
        cols = n0 + offs_n
        k = _load(k_ptrs, cols, kv_lo, kv_hi, offs_d, D, DP, MASKED)
        qk = _dot(q, tl.trans(k), None, PREC)
        if MASKED:
            vis = (cols[None, :] >= kvs[:, None]) & (cols[None, :] < kve[:, None])
            qk = tl.where(vis, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # a row that has seen nothing yet keeps m = -inf; subtract 0 instead (p = 0, no NaN)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_ptrs, cols, kv_lo, kv_hi, offs_d, D, DP, MASKED)
        acc = acc * alpha[:, None]
        acc = _dot(_cast(p, v.dtype, PREC), v, acc, PREC)
        m_i = m_new
        k_ptrs += BN * s_kn
        v_ptrs += BN * s_vn
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KVS, KVE, TAB,
              s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, s_on, s_oh, s_lh,
              Nq, n_tiles, qk_scale,
              GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    h = tl.program_id(0)
    tile = n_tiles - 1 - tl.program_id(1)  # later (in causal masks: heavier) tiles first
    kvh = h // GROUP
    kv_lo = tl.load(TAB + tile * 4)
    kv_hi = tl.load(TAB + tile * 4 + 1)
    full_lo = tl.load(TAB + tile * 4 + 2)
    full_hi = tl.load(TAB + tile * 4 + 3)

    offs_m = tile * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    row_ok = offs_m < Nq
    q_ptrs = Q + h.to(tl.int64) * s_qh + offs_m.to(tl.int64)[:, None] * s_qn + offs_d[None, :]
    q = _load(q_ptrs, offs_m, 0, Nq, offs_d, D, DP, True)
    kvs = tl.load(KVS + offs_m, mask=row_ok, other=0)
    kve = tl.load(KVE + offs_m, mask=row_ok, other=0)  # padded rows: empty interval

    k_base = K + kvh.to(tl.int64) * s_kh
    v_base = V + kvh.to(tl.int64) * s_vh
    k_rel = offs_n[:, None] * s_kn + offs_d[None, :]
    v_rel = offs_n[:, None] * s_vn + offs_d[None, :]

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    start, f_start, f_end = _phases(kv_lo, kv_hi, full_lo, full_hi, BN)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kvs, kve, k_base, v_base, k_rel, v_rel, s_kn, s_vn,
                               offs_n, offs_d, start, f_start, kv_lo, kv_hi, qk_scale,
                               D, DP, BN, True, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kvs, kve, k_base, v_base, k_rel, v_rel, s_kn, s_vn,
                               offs_n, offs_d, f_start, f_end, kv_lo, kv_hi, qk_scale,
                               D, DP, BN, False, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kvs, kve, k_base, v_base, k_rel, v_rel, s_kn, s_vn,
                               offs_n, offs_d, f_end, kv_hi, kv_lo, kv_hi, qk_scale,
                               D, DP, BN, True, PREC)

    empty = l_i == 0.0  # the query sees no key: output 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = O + h.to(tl.int64) * s_oh + offs_m.to(tl.int64)[:, None] * s_on + offs_d[None, :]
    _store(o_ptrs, out, row_ok, offs_d, D, DP, PREC)
    tl.store(LSE + h.to(tl.int64) * s_lh + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta(O, DO, DELTA, s_on, s_oh, s_don, s_doh, s_dh, Nq,
               D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr):
    """delta[h, i] = sum_d dout[i, h, d] * out[i, h, d] (fp32)."""
    h = tl.program_id(0)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    rows = offs_m.to(tl.int64)[:, None]
    o = _load(O + h.to(tl.int64) * s_oh + rows * s_on + offs_d[None, :], offs_m, 0, Nq, offs_d, D, DP, True)
    do = _load(DO + h.to(tl.int64) * s_doh + rows * s_don + offs_d[None, :], offs_m, 0, Nq, offs_d, D, DP, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h.to(tl.int64) * s_dh + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, KVS, KVE,
                q_rel, do_rel, s_qn, s_don, offs_m, offs_d, start, end, Nq, qk_scale,
                D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                MASKED: tl.constexpr, PREC: tl.constexpr):
    q_ptrs = q_base + start.to(tl.int64) * s_qn + q_rel
    do_ptrs = do_base + start.to(tl.int64) * s_don + do_rel
    for m0 in range(start, end, BM):
        rows = m0 + offs_m
        q = _load(q_ptrs, rows, 0, Nq, offs_d, D, DP, MASKED)
        do = _load(do_ptrs, rows, 0, Nq, offs_d, D, DP, MASKED)
        if MASKED:
            ok = (rows >= 0) & (rows < Nq)
            lse = tl.load(lse_base + rows, mask=ok, other=0.0)
            # rows that see nothing have lse = -inf: flip it so that p = exp2(-inf) = 0
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
            delta = tl.load(delta_base + rows, mask=ok, other=0.0)
            kvs = tl.load(KVS + rows, mask=ok, other=0)
            kve = tl.load(KVE + rows, mask=ok, other=0)
        else:
            lse2 = tl.load(lse_base + rows) * LOG2E
            delta = tl.load(delta_base + rows)
        qkT = _dot(k, tl.trans(q), None, PREC)  # [BN, BM]
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            vis = (cols[:, None] >= kvs[None, :]) & (cols[:, None] < kve[None, :])
            pT = tl.where(vis, pT, 0.0)
        dv = _dot(_cast(pT, do.dtype, PREC), do, dv, PREC)
        dpT = _dot(v, tl.trans(do), None, PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(_cast(dsT, q.dtype, PREC), q, dk, PREC)
        q_ptrs += BM * s_qn
        do_ptrs += BM * s_don
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, KVS, KVE, TAB, DK, DV,
                   s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, s_don, s_doh,
                   s_dkn, s_dkh, s_dvn, s_dvh, s_lh,
                   Nq, Nk, qk_scale, scale,
                   GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    kvh = tl.program_id(0)
    tile = tl.program_id(1)  # early key tiles are seen by the most queries: start them first
    q_lo = tl.load(TAB + tile * 4)
    q_hi = tl.load(TAB + tile * 4 + 1)
    qf_lo = tl.load(TAB + tile * 4 + 2)
    qf_hi = tl.load(TAB + tile * 4 + 3)

    cols = tile * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    col_ok = cols < Nk
    cols64 = cols.to(tl.int64)[:, None]
    k = _load(K + kvh.to(tl.int64) * s_kh + cols64 * s_kn + offs_d[None, :], cols, 0, Nk, offs_d, D, DP, True)
    v = _load(V + kvh.to(tl.int64) * s_vh + cols64 * s_vn + offs_d[None, :], cols, 0, Nk, offs_d, D, DP, True)
    dk = tl.zeros([BN, DP], tl.float32)
    dv = tl.zeros([BN, DP], tl.float32)
    q_rel = offs_m[:, None] * s_qn + offs_d[None, :]
    do_rel = offs_m[:, None] * s_don + offs_d[None, :]
    start, f_start, f_end = _phases(q_lo, q_hi, qf_lo, qf_hi, BM)

    for g in range(GROUP):  # the query heads sharing this kv head
        h = (kvh * GROUP + g).to(tl.int64)
        q_base = Q + h * s_qh
        do_base = DO + h * s_doh
        lse_base = LSE + h * s_lh
        delta_base = DELTA + h * s_lh
        dk, dv = _dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, KVS, KVE,
                             q_rel, do_rel, s_qn, s_don, offs_m, offs_d, start, f_start, Nq, qk_scale,
                             D, DP, BM, True, PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, KVS, KVE,
                             q_rel, do_rel, s_qn, s_don, offs_m, offs_d, f_start, f_end, Nq, qk_scale,
                             D, DP, BM, False, PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, KVS, KVE,
                             q_rel, do_rel, s_qn, s_don, offs_m, offs_d, f_end, q_hi, Nq, qk_scale,
                             D, DP, BM, True, PREC)

    _store(DK + kvh.to(tl.int64) * s_dkh + cols64 * s_dkn + offs_d[None, :], dk * scale, col_ok, offs_d, D, DP, PREC)
    _store(DV + kvh.to(tl.int64) * s_dvh + cols64 * s_dvn + offs_d[None, :], dv, col_ok, offs_d, D, DP, PREC)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, kvs, kve, k_base, v_base, k_rel, v_rel, s_kn, s_vn,
              offs_n, offs_d, start, end, kv_lo, kv_hi, qk_scale,
              D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
              MASKED: tl.constexpr, PREC: tl.constexpr):
    k_ptrs = k_base + start.to(tl.int64) * s_kn + k_rel
    v_ptrs = v_base + start.to(tl.int64) * s_vn + v_rel
    for n0 in range(start, end, BN):
        cols = n0 + offs_n
        k = _load(k_ptrs, cols, kv_lo, kv_hi, offs_d, D, DP, MASKED)
        v = _load(v_ptrs, cols, kv_lo, kv_hi, offs_d, D, DP, MASKED)
        qk = _dot(q, tl.trans(k), None, PREC)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            vis = (cols[None, :] >= kvs[:, None]) & (cols[None, :] < kve[:, None])
            p = tl.where(vis, p, 0.0)
        dp = _dot(do, tl.trans(v), None, PREC)
        ds = p * (dp - delta[:, None])
        dq = _dot(_cast(ds, k.dtype, PREC), k, dq, PREC)
        k_ptrs += BN * s_kn
        v_ptrs += BN * s_vn
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, KVS, KVE, TAB, DQ,
                 s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, s_don, s_doh, s_dqn, s_dqh, s_lh,
                 Nq, n_tiles, qk_scale, scale,
                 GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    h = tl.program_id(0)
    tile = n_tiles - 1 - tl.program_id(1)
    kvh = h // GROUP
    kv_lo = tl.load(TAB + tile * 4)
    kv_hi = tl.load(TAB + tile * 4 + 1)
    full_lo = tl.load(TAB + tile * 4 + 2)
    full_hi = tl.load(TAB + tile * 4 + 3)

    offs_m = tile * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    row_ok = offs_m < Nq
    rows64 = offs_m.to(tl.int64)[:, None]
    h64 = h.to(tl.int64)
    q = _load(Q + h64 * s_qh + rows64 * s_qn + offs_d[None, :], offs_m, 0, Nq, offs_d, D, DP, True)
    do = _load(DO + h64 * s_doh + rows64 * s_don + offs_d[None, :], offs_m, 0, Nq, offs_d, D, DP, True)
    lse = tl.load(LSE + h64 * s_lh + offs_m, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # empty rows: p = 0
    delta = tl.load(DELTA + h64 * s_lh + offs_m, mask=row_ok, other=0.0)
    kvs = tl.load(KVS + offs_m, mask=row_ok, other=0)
    kve = tl.load(KVE + offs_m, mask=row_ok, other=0)

    k_base = K + kvh.to(tl.int64) * s_kh
    v_base = V + kvh.to(tl.int64) * s_vh
    k_rel = offs_n[:, None] * s_kn + offs_d[None, :]
    v_rel = offs_n[:, None] * s_vn + offs_d[None, :]
    dq = tl.zeros([BM, DP], tl.float32)
    start, f_start, f_end = _phases(kv_lo, kv_hi, full_lo, full_hi, BN)
    dq = _dq_inner(dq, q, do, lse2, delta, kvs, kve, k_base, v_base, k_rel, v_rel, s_kn, s_vn,
                   offs_n, offs_d, start, f_start, kv_lo, kv_hi, qk_scale, D, DP, BN, True, PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, kvs, kve, k_base, v_base, k_rel, v_rel, s_kn, s_vn,
                   offs_n, offs_d, f_start, f_end, kv_lo, kv_hi, qk_scale, D, DP, BN, False, PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, kvs, kve, k_base, v_base, k_rel, v_rel, s_kn, s_vn,
                   offs_n, offs_d, f_end, kv_hi, kv_lo, kv_hi, qk_scale, D, DP, BN, True, PREC)
    _store(DQ + h64 * s_dqh + rows64 * s_dqn + offs_d[None, :], dq * scale, row_ok, offs_d, D, DP, PREC)


# ----------------------------------------------------------------------------------------------
# Backend functions (the contract of transfusion_kernels.attention)
# ----------------------------------------------------------------------------------------------
# triton.jit picks the interpreter when the module is imported, not when a kernel runs.
_INTERPRETED = type(_attn_fwd).__name__ == "InterpretedFunction"


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"the triton attention kernels need CUDA tensors, got {x.device.type} tensors; for CPU tests set "
            "TRITON_INTERPRET=1 before transfusion_kernels.attention.triton is first imported"
        )


def prepare(mask, q: torch.Tensor, k: torch.Tensor, config: Config | None = None):
    """Tile tables and block sizes for ``forward``/``backward``: the forward query table, the
    dk/dv key table and the dq query table (the mask caches them per block size)."""
    cfg = config if config is not None else pick_config(q.shape[-1], q.dtype, q.device)
    tables = [mask.query_tiles(cfg.block_m), mask.key_tiles(cfg.kv_block_n), mask.query_tiles(cfg.dq_block_m)]
    tables = [t.to(device=q.device, dtype=torch.int32).contiguous() for t in tables]
    return tables, cfg.blocks


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels fill (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_table(t: torch.Tensor, n: int, block: int, what: str) -> None:
    rows = triton.cdiv(n, block)
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] != 4 or t.dtype != torch.int32:
        raise ValueError(
            f"tables: {what} must be int32 [{rows}, 4] for {n} tokens and block {block}, "
            f"got {t.dtype} {list(t.shape)}; build it with prepare(mask, q, k)"
        )


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests) get exact fp32 dots; 16-bit inputs ignore the setting
    if dtype == torch.bfloat16 and _INTERPRETED:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _ints(kv_start: torch.Tensor, kv_end: torch.Tensor):
    return kv_start.to(torch.int32).contiguous(), kv_end.to(torch.int32).contiguous()


def _device_guard(x: torch.Tensor):
    if x.is_cuda:
        return torch.cuda.device(x.device)
    import contextlib

    return contextlib.nullcontext()


def forward(q, k, v, kv_start, kv_end, tables, blocks, scale):
    _check_device(q)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    cfg = _launch_params(blocks, d, q.dtype, q.device)
    _check_table(tables[0], nq, cfg.block_m, "tables[0] (forward query tiles)")
    kvs, kve = _ints(kv_start, kv_end)
    out = _empty((nq, hq, d), q.dtype, q.device)
    lse = _empty((hq, nq), torch.float32, q.device)
    n_tiles = triton.cdiv(nq, cfg.block_m)
    if nq == 0 or hq == 0:
        return out, lse
    with _device_guard(q):
        _attn_fwd[(hq, n_tiles)](
            q, k, v, out, lse, kvs, kve, tables[0],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            nq, n_tiles, float(scale) * LOG2E,
            GROUP=hq // hkv, D=d, DP=_padded_head_dim(d), BM=cfg.block_m, BN=cfg.block_n,
            PREC=_precision(q.dtype), num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
        )
    return out, lse


def backward(dout, q, k, v, out, lse, kv_start, kv_end, tables, blocks, scale):
    _check_device(q)
    q, k, v, out, dout = (_unit_last(x) for x in (q, k, v, out, dout))
    lse = lse.contiguous()
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    cfg = _launch_params(blocks, d, q.dtype, q.device)
    _check_table(tables[1], nk, cfg.kv_block_n, "tables[1] (dk/dv key tiles)")
    _check_table(tables[2], nq, cfg.dq_block_m, "tables[2] (dq query tiles)")
    kvs, kve = _ints(kv_start, kv_end)
    dp = _padded_head_dim(d)
    group = hq // hkv
    prec = _precision(q.dtype)
    dq = _empty((nq, hq, d), q.dtype, q.device)
    dk = _empty((nk, hkv, d), k.dtype, k.device)
    dv = _empty((nk, hkv, d), v.dtype, v.device)
    if hq == 0:
        return dq, dk, dv
    if nq == 0:  # nothing sees any key
        return dq, dk.zero_(), dv.zero_()
    delta = _empty((hq, nq), torch.float32, q.device)
    qk_scale = float(scale) * LOG2E
    with _device_guard(q):
        bm_delta = 64 if q.is_cuda else 32
        _bwd_delta[(hq, triton.cdiv(nq, bm_delta))](
            out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
            delta.stride(0), nq, D=d, DP=dp, BM=bm_delta,
        )
        if nk > 0:
            _attn_bwd_dkdv[(hkv, triton.cdiv(nk, cfg.kv_block_n))](
                q, k, v, dout, lse, delta, kvs, kve, tables[1], dk, dv,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                lse.stride(0), nq, nk, qk_scale, float(scale),
                GROUP=group, D=d, DP=dp, BM=cfg.kv_block_m, BN=cfg.kv_block_n, PREC=prec,
                num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages,
            )
        n_tiles = triton.cdiv(nq, cfg.dq_block_m)
        _attn_bwd_dq[(hq, n_tiles)](
            q, k, v, dout, lse, delta, kvs, kve, tables[2], dq,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            nq, n_tiles, qk_scale, float(scale),
            GROUP=group, D=d, DP=dp, BM=cfg.dq_block_m, BN=cfg.dq_block_n, PREC=prec,
            num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages,
        )
    return dq, dk, dv
