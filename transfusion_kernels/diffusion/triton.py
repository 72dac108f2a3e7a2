"""Triton backend of the diffusion ops.

``affine_step``: one fused elementwise pass over ``[R, L]`` (the contract in ``reference.py``),
tiled as ``BLOCK_R`` rows x ``BLOCK_L`` columns so that long rows (latents: R = batch,
L = C*H*W) and short rows (packed patches: R = patches, L = channels) both fill a block. Noise is
drawn in the kernel with the Philox4x32-10 + Box-Muller definition of
``transfusion_kernels.philox`` (not ``tl.randn``, whose counter/key layout differs), so a seed
gives the same noise here as on the reference and CUDA backends.

``affine_step(..., velocity=True)`` writes ``noise - sample`` (the flow-matching target) as the
second output in the same pass.

``diffusion_loss``: one pass over ``pred``/``target`` (and ``minus``: d = pred - (target - minus)) that writes per-block partial sums of the
weighted squared error and, when a gradient is needed, d loss / d pred in the same pass (the
upstream gradient is a scalar, so the backward is a scale of it). The per-patch weights
1 / (patches of its image * C * images) come from a sort of ``image_index`` (static shapes, no
host sync). The partial sums are reduced in a fixed order: the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from transfusion_kernels.backends import triton_interpret

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements per program under the interpreter, which runs one numpy op per block: large blocks
# keep tests fast (module-level so tests can shrink them to run many programs on tiny inputs).
INTERPRET_TILE = 4096
INTERPRET_MAX_BLOCK_C = 1024


def supports(sample) -> str | None:
    """The affine-step kernel covers every input the ops accept."""
    return None


def supports_loss(pred) -> str | None:
    """The loss kernel covers every input diffusion_loss accepts."""
    return None


PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox_randn(offs, seed_lo, seed_hi, ACCURATE: tl.constexpr):
    """Standard normal for int64 element indices ``offs``, as ``philox.randn``."""
    c0 = (offs & 0xFFFFFFFF).to(tl.uint32)
    c1 = (offs >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    m0 = tl.full(c0.shape, PHILOX_M0, tl.uint32)
    m1 = tl.full(c0.shape, PHILOX_M1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    # Box-Muller. u1 = (a + 0.5) / 2^24 with a = c0 >> 8 is exact in fp32 only below 1/2; above,
    # use the exact complement t = 1 - u1 = (2^24 - 1 - a + 0.5) / 2^24 and log(u1) = log1p(-t),
    # so the values near u1 = 1 (z near 0) keep full precision.
    a = c0 >> 8
    u1 = (a.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    t = ((16777215 - a).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    w = 1.0 - t
    if ACCURATE:
        log_lo = libdevice.log(u1)
        log_w = libdevice.log(w)
    else:  # the interpreter has no libdevice; numpy's log is accurate
        log_lo = tl.log(u1)
        log_w = tl.log(w)
    # log1p(-t) = log(w) * (-t) / (w - 1) (w - 1 is exact): accurate to a few ulp.
    log_hi = tl.where(w == 1.0, -t, log_w * (-t) / (w - 1.0))
    log_u1 = tl.where(a < 8388608, log_lo, log_hi)
    radius = tl.sqrt_rn(-2.0 * log_u1)
    theta = (c1 >> 8).to(tl.float32) * (6.283185307179586 / 16777216.0)
    if ACCURATE:
        cos = libdevice.cos(theta)
    else:
        cos = tl.cos(theta)
    return radius * cos


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _affine_kernel(
    sample_ptr,
    mo_ptr,
    coef_ptr,
    noise_ptr,
    out_ptr,
    noise_out_ptr,
    R,
    L,
    seed_lo,
    seed_hi,
    clip,
    HAS_MO: tl.constexpr,
    NOISE_IN: tl.constexpr,
    DRAW: tl.constexpr,
    STORE_NOISE: tl.constexpr,
    VELOCITY: tl.constexpr,
    CLIP: tl.constexpr,
    ACCURATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    rmask = rows < R
    mask = rmask[:, None] & (cols < L)[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
    cptr = coef_ptr + rows * 6
    c0 = tl.load(cptr + 0, mask=rmask, other=0.0)[:, None]
    c1 = tl.load(cptr + 1, mask=rmask, other=0.0)[:, None]
    c2 = tl.load(cptr + 2, mask=rmask, other=0.0)[:, None]
    c3 = tl.load(cptr + 3, mask=rmask, other=0.0)[:, None]
    c4 = tl.load(cptr + 4, mask=rmask, other=0.0)[:, None]
    c5 = tl.load(cptr + 5, mask=rmask, other=0.0)[:, None]

    s = tl.load(sample_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = c0 * s
    if HAS_MO:
        m = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = x0 + c1 * m
    if CLIP:
        nan = x0 != x0
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
        x0 = tl.where(nan, float("nan"), x0)  # NaN stays NaN, as in the reference and CUDA kernels
    out = c2 * x0 + c3 * s
    if HAS_MO:
        out = out + c4 * m
    z = tl.zeros_like(s)
    if NOISE_IN:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = out + c5 * z
    if DRAW:
        # Round to the output dtype before use: the returned noise reproduces the output.
        n = _philox_randn(offs, seed_lo, seed_hi, ACCURATE).to(out_ptr.dtype.element_ty)
        z = n.to(tl.float32)
        out = out + c5 * z
        if STORE_NOISE:
            tl.store(noise_out_ptr + offs, n, mask=mask)
    if VELOCITY:  # the flow-matching target noise - sample, in the second output
        tl.store(noise_out_ptr + offs, (z - s).to(noise_out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _empty(shape, dtype, device) -> torch.Tensor:
    # Every output is allocated here, so tests can poison it (fill with NaN).
    return torch.empty(shape, dtype=dtype, device=device)


def _tiles(R: int, L: int, target: int):
    block_l = min(triton.next_power_of_2(max(L, 1)), target)
    block_r = min(max(target // block_l, 1), triton.next_power_of_2(max(R, 1)))
    return block_r, block_l


def affine_step(sample, model_output, coef, noise, seed, clip_range, return_noise, *, has_noise=True, velocity=False):
    """The fused step; arguments as ``reference.affine_step``."""
    if sample.dtype not in _DTYPES:
        raise TypeError(f"sample must be float16, bfloat16 or float32, got {sample.dtype}")
    if not sample.is_contiguous():
        raise ValueError("sample must be contiguous")
    for name, x in (("model_output", model_output), ("noise", noise)):
        if x is not None and (x.shape != sample.shape or x.dtype != sample.dtype or not x.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous tensor with the shape and dtype of sample")
    R = sample.shape[0]
    if coef.shape != (R, 6) or coef.dtype != torch.float32 or not coef.is_contiguous():
        raise ValueError(f"coef must be a contiguous float32 tensor of shape ({R}, 6)")
    out = _empty(sample.shape, sample.dtype, sample.device)
    draw = noise is None and has_noise
    store_noise = draw and return_noise and not velocity
    noise_out = _empty(sample.shape, sample.dtype, sample.device) if (store_noise or velocity) else None
    if sample.numel() == 0:
        return out, noise_out
    L = sample.numel() // R
    interp = triton_interpret()
    # On a GPU the Philox rounds hold more registers per element: smaller tiles keep occupancy
    # up (64 registers at 512, against 111 at 1024, per ptxas for sm_80).
    block_r, block_l = _tiles(R, L, INTERPRET_TILE if interp else (512 if draw else 2048))
    grid = (triton.cdiv(R, block_r), triton.cdiv(L, block_l))
    seed = int(seed) if draw else 0
    _affine_kernel[grid](
        sample,
        model_output if model_output is not None else sample,
        coef,
        noise if noise is not None else sample,
        out,
        noise_out if noise_out is not None else out,
        R,
        L,
        seed & 0xFFFFFFFF,
        seed >> 32,
        float(clip_range) if clip_range is not None else 0.0,
        HAS_MO=model_output is not None,
        NOISE_IN=noise is not None,
        DRAW=draw,
        STORE_NOISE=store_noise,
        VELOCITY=velocity,
        CLIP=clip_range is not None,
        ACCURATE=not interp,
        BLOCK_R=block_r,
        BLOCK_L=block_l,
        num_warps=4,
    )
    return out, noise_out


# --------------------------------------------------------------------------------------------
# diffusion loss
# --------------------------------------------------------------------------------------------


@triton.jit
def _loss_kernel(
    pred_ptr,
    target_ptr,
    minus_ptr,
    w_ptr,
    partial_ptr,
    grad_ptr,
    P,
    C,
    MINUS: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = rows < P
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c_start in range(0, C, BLOCK_C):
        cols = c_start + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < C)[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MINUS:
            t = t - tl.load(minus_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32) - t
        d = tl.where((w > 0)[:, None], d, 0.0)  # ignored rows (weight 0): a NaN there stays out
        acc += tl.sum(d * d, axis=1)
        if GRAD:
            g = (2.0 * w)[:, None] * d
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid, tl.sum(acc * w, axis=0))


def patch_weights(image_index: torch.Tensor, C: int) -> torch.Tensor:
    """float32 [P]: 1 / (patches of the row's image * C * images with a patch), 0 for index < 0.
    Sort-based, so no host sync and no bound on the index values."""
    idx = image_index.long()
    ordered, _ = torch.sort(idx)
    count = torch.searchsorted(ordered, idx, right=True) - torch.searchsorted(ordered, idx)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    num_images = (starts & (ordered >= 0)).sum().clamp(min=1)
    w = 1.0 / (count.double() * C * num_images.double())
    return torch.where(idx >= 0, w, torch.zeros_like(w)).float()


def diffusion_loss(pred, target, image_index, compute_grad, minus=None):
    """As ``reference.diffusion_loss``: (float32 loss, d loss / d pred or None)."""
    P, C = pred.shape
    w = patch_weights(image_index, C)
    grad = _empty(pred.shape, pred.dtype, pred.device) if compute_grad else None
    if P == 0:
        return torch.zeros((), dtype=torch.float32, device=pred.device), grad
    interp = triton_interpret()
    block_c = min(triton.next_power_of_2(C), INTERPRET_MAX_BLOCK_C if interp else 128)
    block_p = max(1, min((INTERPRET_TILE if interp else 1024) // block_c, triton.next_power_of_2(P)))
    nblocks = triton.cdiv(P, block_p)
    partial = _empty((nblocks,), torch.float32, pred.device)
    _loss_kernel[(nblocks,)](
        pred,
        target,
        minus if minus is not None else target,
        w,
        partial,
        grad if grad is not None else pred,
        P,
        C,
        MINUS=minus is not None,
        GRAD=compute_grad,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return partial.sum(), grad
