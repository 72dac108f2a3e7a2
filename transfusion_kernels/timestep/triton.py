"""Triton backend of the timestep-embedding ops.

Forward, three launches:
  1. ``_hidden_kernel``: the sinusoid of each image's timestep, generated tile by tile in registers,
     times w1 (tl.dot, fp32), + b1, SiLU -> a [M, H] fp32. Without an MLP, ``_sinusoid_kernel``
     writes the sinusoid [M, D] instead and steps 1-2 are skipped.
  2. linear_2 on the M rows: cuBLAS (torch.addmm) in fp32; M is at most a few hundred, so this is
     a small GEMM that a hand-written kernel would not beat.
  3. ``_add_kernel``: the memory-bound pass y = x + emb[image_index] over [P, D], row blocks of x,
     the emb row gathered per patch (it stays in L2: M * D is small), -1 rows masked.

Backward (only when an MLP weight needs a gradient; dx = dy needs no kernel):
  1. Segmented sum demb[m] = sum of dy over the patches of image m, deterministic and atomic-free:
     the patches are grouped by image (a stable argsort of image_index, on device) and cut into
     pieces of at most ``PIECE_ROWS`` patches of one image; ``_piece_sum_kernel`` sums each piece
     into a partial row, ``_image_sum_kernel`` sums each image's partial rows in a fixed order.
     Same inputs, same block sizes -> bitwise the same gradients, run after run.
  2. MLP backward on M rows: ``_hidden_kernel`` recomputes a and silu'(h), the sinusoid kernel
     rebuilds s, and four small fp32 GEMMs/reductions (torch) give dw1, db1, dw2, db2.

Sin/cos arguments are reduced to [-pi, pi] in the kernel (two-constant Cody-Waite) before
tl.sin/tl.cos, so the result does not depend on how the backend lowers them for large
arguments (timesteps reach 1000 rad); the reduction is exact for |argument| < 2**16 * 2 pi
(~4e5 rad) and degrades gracefully beyond. The frequency table is diffusers' own fp32 computation
(reference.frequencies), cached per device, so arguments match diffusers bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from transfusion_kernels.timestep import reference

# Block sizes (module-level so tests can shrink them to exercise multi-block paths on tiny inputs).
ADD_BLOCK = 4096  # elements of x per program in the add pass
ADD_MAX_BLOCK_D = 512
PIECE_ROWS = 128  # patches per partial sum in the backward reduction
SUM_BLOCK_D = 128
SUM_BLOCK_R = 32
IMAGE_SUM_BLOCK_T = 16  # partial rows per step of the per-image sum
SINUSOID_BLOCK_M = 16
SINUSOID_MAX_BLOCK_D = 256


def supports(x) -> str | None:
    """The kernels cover every input the op accepts (README, "Supported shapes and dtypes")."""
    return None


HIDDEN_BLOCK_M = 16  # tl.dot needs >= 16 rows
HIDDEN_BLOCK_H = 64
HIDDEN_BLOCK_K = 32

_INV_2PI = 0.15915494309189535
_2PI_HI = 6.28125  # 8 significant bits: k * _2PI_HI is exact for |k| < 2**16
_2PI_LO = 0.0019353071693331003  # 2*pi - _2PI_HI, rounded to fp32 (residual ~1e-11)


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


_FREQ_CACHE: dict = {}


def _frequencies(half: int, shift: float, max_period: float, device) -> torch.Tensor:
    key = (half, shift, max_period, str(device))
    f = _FREQ_CACHE.get(key)
    if f is None:
        # a dummy element keeps the pointer valid when half == 0
        f = reference.frequencies(half, shift, max_period, device) if half > 0 else torch.zeros(1, device=device)
        _FREQ_CACHE[key] = f
    return f


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _sinusoid_tile(t, freq_ptr, cols, half, scale, FLIP: tl.constexpr):
    """[BM, BK] fp32 tile of the sinusoid for timesteps t [BM] (fp32) and columns cols [BK]."""
    second = cols >= half
    k = tl.where(second, cols - half, cols)
    valid = cols < 2 * half  # the odd-dim pad column and anything past it are 0
    f = tl.load(freq_ptr + k, mask=valid, other=0.0)
    arg = t[:, None] * f[None, :]
    arg = scale * arg  # same two fp32 roundings as diffusers
    n = tl.floor(arg * _INV_2PI + 0.5)
    r = (arg - n * _2PI_HI) - n * _2PI_LO
    if FLIP:
        v = tl.where(second[None, :], tl.sin(r), tl.cos(r))
    else:
        v = tl.where(second[None, :], tl.cos(r), tl.sin(r))
    return tl.where(valid[None, :], v, 0.0)


@triton.jit
def _sinusoid_kernel(
    t_ptr, freq_ptr, out_ptr, M, DIM, half, scale, FLIP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    t = tl.load(t_ptr + rm, mask=rm < M, other=0).to(tl.float32)
    s = _sinusoid_tile(t, freq_ptr, cols, half, scale, FLIP)
    mask = (rm[:, None] < M) & (cols[None, :] < DIM)
    tl.store(out_ptr + rm[:, None] * DIM + cols[None, :], s, mask=mask)


@triton.jit
def _hidden_kernel(
    t_ptr,
    freq_ptr,
    w1_ptr,
    b1_ptr,
    a_ptr,
    ds_ptr,
    M,
    H,
    F,
    half,
    scale,
    FLIP: tl.constexpr,
    HAS_B1: tl.constexpr,
    STORE_DSILU: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
):
    """a = silu(sinusoid(t) @ w1^T + b1) [M, H] fp32; optionally silu'(h) for the backward."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rh = tl.program_id(1) * BH + tl.arange(0, BH)
    t = tl.load(t_ptr + rm, mask=rm < M, other=0).to(tl.float32)
    acc = tl.zeros((BM, BH), dtype=tl.float32)
    for k0 in range(0, F, BK):
        rk = k0 + tl.arange(0, BK)
        s = _sinusoid_tile(t, freq_ptr, rk, half, scale, FLIP)
        wmask = (rk[:, None] < F) & (rh[None, :] < H)
        w = tl.load(w1_ptr + rh[None, :] * F + rk[:, None], mask=wmask, other=0.0).to(tl.float32)
        acc += tl.dot(s, w, input_precision="ieee")
    if HAS_B1:
        acc += tl.load(b1_ptr + rh, mask=rh < H, other=0.0).to(tl.float32)[None, :]
    sig = 1.0 / (1.0 + tl.exp(-acc))
    mask = (rm[:, None] < M) & (rh[None, :] < H)
    offs = rm[:, None] * H + rh[None, :]
    tl.store(a_ptr + offs, acc * sig, mask=mask)
    if STORE_DSILU:
        tl.store(ds_ptr + offs, sig * (1.0 + acc * (1.0 - sig)), mask=mask)


@triton.jit
def _round_to(y, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even. bf16 is rounded on the bits: the Triton interpreter's
    fp32->bf16 cast truncates, and this keeps CPU tests and GPU runs bit-identical (a few integer
    ops in a memory-bound kernel)."""
    if DTYPE == tl.bfloat16:
        u = y.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(DTYPE)


@triton.jit
def _add_kernel(x_ptr, idx_ptr, e_ptr, y_ptr, P, D, M, stride_x, stride_y, BP: tl.constexpr, BD: tl.constexpr):
    rp = tl.program_id(0) * BP + tl.arange(0, BP)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    pmask = rp < P
    cmask = cols < D
    idx = tl.load(idx_ptr + rp, mask=pmask, other=-1)
    has = (idx >= 0) & (idx < M)  # the upper bound only guards memory: the dispatcher checks the range
    rp64 = rp.to(tl.int64)
    mask = pmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rp64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    e = tl.load(e_ptr + idx.to(tl.int64)[:, None] * D + cols[None, :], mask=has[:, None] & cmask[None, :], other=0.0)
    y = x.to(tl.float32) + e
    tl.store(y_ptr + rp64[:, None] * stride_y + cols[None, :], _round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _piece_sum_kernel(dy_ptr, order_ptr, start_ptr, end_ptr, partial_ptr, D, BR: tl.constexpr, BD: tl.constexpr):
    """partial[p] = sum of dy rows order[start[p]:end[p]] (one image's patches)."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = cols < D
    start = tl.load(start_ptr + p)
    end = tl.load(end_ptr + p)
    if start < end:  # slots past the last piece are empty and never read
        acc = tl.zeros((BR, BD), dtype=tl.float32)
        for r0 in range(start, end, BR):
            r = r0 + tl.arange(0, BR)
            rmask = r < end
            src = tl.load(order_ptr + r, mask=rmask, other=0).to(tl.int64)
            acc += tl.load(
                dy_ptr + src[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
            ).to(tl.float32)
        tl.store(partial_ptr + p.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _image_sum_kernel(partial_ptr, off_ptr, out_ptr, D, BT: tl.constexpr, BD: tl.constexpr):
    """out[m] = sum of partial rows off[m]:off[m+1], in order (zero for an image without patches)."""
    m = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = cols < D
    lo = tl.load(off_ptr + m)
    hi = tl.load(off_ptr + m + 1)
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for p0 in range(lo, hi, BT):
        p = p0 + tl.arange(0, BT)
        acc += tl.load(
            partial_ptr + p.to(tl.int64)[:, None] * D + cols[None, :],
            mask=(p < hi)[:, None] & cmask[None, :],
            other=0.0,
        )
    tl.store(out_ptr + m.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=cmask)


# ----------------------------------------------------------------------------- launchers


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


def sinusoid(timesteps, dim, *, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    """fp32 [M, dim], the values of reference.sinusoid."""
    M = timesteps.shape[0]
    half = dim // 2
    out = _empty((M, dim), torch.float32, timesteps.device)
    if M == 0:
        return out
    freq = _frequencies(half, downscale_freq_shift, max_period, timesteps.device)
    BM, BD = SINUSOID_BLOCK_M, min(_pow2(dim, 16), SINUSOID_MAX_BLOCK_D)
    grid = (triton.cdiv(M, BM), triton.cdiv(dim, BD))
    _sinusoid_kernel[grid](timesteps, freq, out, M, dim, half, scale, FLIP=flip_sin_to_cos, BM=BM, BD=BD)
    return out


def hidden(timesteps, w1, b1, *, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, with_dsilu=False):
    """a = silu(linear_1(sinusoid)) fp32 [M, H], and silu'(h) when with_dsilu."""
    M, H = timesteps.shape[0], w1.shape[0]
    dev = timesteps.device
    a = _empty((M, H), torch.float32, dev)
    ds = _empty((M, H), torch.float32, dev) if with_dsilu else a
    if M > 0:
        freq = _frequencies(freq_dim // 2, downscale_freq_shift, max_period, dev)
        BM, BH, BK = HIDDEN_BLOCK_M, min(_pow2(H, 16), HIDDEN_BLOCK_H), min(_pow2(freq_dim, 16), HIDDEN_BLOCK_K)
        grid = (triton.cdiv(M, BM), triton.cdiv(H, BH))
        _hidden_kernel[grid](
            timesteps,
            freq,
            w1,
            w1 if b1 is None else b1,
            a,
            ds,
            M,
            H,
            freq_dim,
            freq_dim // 2,
            scale,
            FLIP=flip_sin_to_cos,
            HAS_B1=b1 is not None,
            STORE_DSILU=with_dsilu,
            BM=BM,
            BH=BH,
            BK=BK,
        )
    return (a, ds) if with_dsilu else a


def embed(timesteps, w1, b1, w2, b2, **cfg):
    """fp32 [M, D]: the per-image embedding."""
    if w1 is None:
        return sinusoid(timesteps, cfg["freq_dim"], **{k: v for k, v in cfg.items() if k != "freq_dim"})
    a = hidden(timesteps, w1, b1, **cfg)
    w2t = w2.float().t()
    return torch.addmm(b2.float(), a, w2t) if b2 is not None else a @ w2t


def add_rows(x, emb, image_index):
    P, D = x.shape
    M = emb.shape[0]
    y = _empty((P, D), x.dtype, x.device)
    if M == 0:  # no images: every index is -1 and emb is never read, but needs a valid pointer
        emb = torch.zeros(1, D, dtype=torch.float32, device=x.device)
    BD = min(_pow2(D), ADD_MAX_BLOCK_D)
    BP = max(1, ADD_BLOCK // BD)
    grid = (triton.cdiv(P, BP), triton.cdiv(D, BD))
    _add_kernel[grid](
        x, image_index, emb, y, P, D, M, x.stride(0), y.stride(0), BP=BP, BD=BD, num_warps=8 if BP * BD >= 4096 else 4
    )
    return y


def forward(x, timesteps, image_index, w1, b1, w2, b2, **cfg):
    return add_rows(x, embed(timesteps, w1, b1, w2, b2, **cfg), image_index)


def _pieces(image_index: torch.Tensor, num_images: int, rows: int):
    """Group the patches by image and cut each image into pieces of at most `rows` patches.

    Returns (order, start, end, offsets): the patch rows in image order (int32 [P]); for each of
    T >= the number of pieces slots, the piece's range [start, end) in `order` (empty past the
    last piece); and offsets int32 [M + 1] such that image m owns slots offsets[m]:offsets[m+1].
    All on device, no host sync (T is a bound known from the shapes)."""
    dev = image_index.device
    P, M = image_index.shape[0], num_images
    key = torch.where(image_index >= 0, image_index, M)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.searchsorted(sorted_key, torch.arange(M + 1, dtype=key.dtype, device=dev))  # int64 [M+1]
    seg_start, seg_end = bounds[:-1], bounds[1:]
    n_pieces = (seg_end - seg_start + rows - 1) // rows
    offsets = torch.zeros(M + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(n_pieces, 0)
    T = triton.cdiv(P, rows) + M
    slot = torch.arange(T, dtype=torch.int64, device=dev)
    m = (torch.searchsorted(offsets, slot, right=True) - 1).clamp(max=M - 1)
    start = seg_start[m] + (slot - offsets[m]) * rows
    end = torch.minimum(start + rows, seg_end[m])
    live = slot < offsets[M]
    start = torch.where(live, start, 0)
    end = torch.where(live, end, 0)
    return order.to(torch.int32), start.to(torch.int32), end.to(torch.int32), offsets.to(torch.int32)


def segment_sum(dy, image_index, num_images):
    P, D = dy.shape
    out = _empty((num_images, D), torch.float32, dy.device)
    if num_images == 0:
        return out
    order, start, end, offsets = _pieces(image_index, num_images, PIECE_ROWS)
    T = start.shape[0]
    partial = _empty((T, D), torch.float32, dy.device)
    BD = min(_pow2(D, 16), SUM_BLOCK_D)
    _piece_sum_kernel[(T, triton.cdiv(D, BD))](dy, order, start, end, partial, D, BR=SUM_BLOCK_R, BD=BD)
    _image_sum_kernel[(num_images, triton.cdiv(D, BD))](partial, offsets, out, D, BT=IMAGE_SUM_BLOCK_T, BD=BD)
    return out


def mlp_backward(demb, timesteps, w1, b1, w2, **cfg):
    s = sinusoid(timesteps, cfg["freq_dim"], **{k: v for k, v in cfg.items() if k != "freq_dim"})
    a, dsilu = hidden(timesteps, w1, b1, with_dsilu=True, **cfg)
    dh = (demb @ w2.float()) * dsilu
    return dh.t() @ s, dh.sum(0), demb.t() @ a, demb.sum(0)
