"""CUDA C++ backend of the timestep-embedding ops (csrc/timestep/), per the backend interface in
``transfusion_kernels/timestep/__init__.py`` (the dispatcher has validated every argument).

Forward: ``timestep_sinusoid`` writes the sinusoid of each image's timestep (fp32 [M, freq_dim],
diffusers' own frequency table, so the arguments match diffusers bit for bit); the optional MLP
runs on those M rows with cuBLAS (torch, fp32); ``timestep_add_rows`` is the memory-bound pass
y = x + emb[image_index] over [P, D] with 16-byte vector accesses.

Backward: ``timestep_segment_sum`` sums dy per image deterministically (the rows of each image in
the order of a stable sort of image_index, in pieces of ``PIECE_ROWS`` rows, then the pieces in
order), atomic-free: same inputs, bitwise the same gradient. The MLP backward is M-row work and
uses the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfusion_kernels.backends import require_extension
from transfusion_kernels.timestep import reference

PIECE_ROWS = 128  # rows per partial sum in the backward reduction

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_FREQ_CACHE: dict = {}


def supports(x) -> str | None:
    """The kernels cover every input the op accepts (README, "Supported shapes and dtypes")."""
    return None


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _frequencies(half: int, shift: float, max_period: float, device) -> torch.Tensor:
    key = (half, shift, max_period, str(device))
    f = _FREQ_CACHE.get(key)
    if f is None:
        f = _FREQ_CACHE[key] = reference.frequencies(half, shift, max_period, device).contiguous()
    return f


def sinusoid(timesteps, dim, *, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    """fp32 [M, dim], the same values as ``reference.sinusoid``."""
    ext = require_extension()
    t = timesteps.float().contiguous()  # the conversion diffusers does (Tensor.float())
    M = t.shape[0]
    out = _empty((M, dim), torch.float32, t.device)
    if M and dim:
        freq = _frequencies(dim // 2, float(downscale_freq_shift), float(max_period), t.device)
        with torch.cuda.device(t.device):
            ext.timestep_sinusoid(
                out.data_ptr(),
                t.data_ptr(),
                freq.data_ptr(),
                M,
                dim,
                bool(flip_sin_to_cos),
                float(downscale_freq_shift),
                float(scale),
                float(max_period),
                _stream(t.device),
            )
    return out


def forward(
    x, timesteps, image_index, w1, b1, w2, b2, *, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period
):
    ext = require_extension()
    emb = sinusoid(
        timesteps,
        freq_dim,
        flip_sin_to_cos=flip_sin_to_cos,
        downscale_freq_shift=downscale_freq_shift,
        scale=scale,
        max_period=max_period,
    )
    if w1 is not None:
        h = F.silu(F.linear(emb, w1.float(), None if b1 is None else b1.float()))
        emb = F.linear(h, w2.float(), None if b2 is None else b2.float()).contiguous()
    P, D = x.shape
    y = _empty((P, D), x.dtype, x.device)
    with torch.cuda.device(x.device):
        ext.timestep_add_rows(
            y.data_ptr(),
            x.data_ptr(),
            emb.data_ptr(),
            image_index.data_ptr(),
            P,
            D,
            _DTYPE_NAMES[x.dtype],
            _stream(x.device),
        )
    return y


def segment_sum(dy, image_index, num_images):
    ext = require_extension()
    P, D = dy.shape
    M = int(num_images)
    demb = _empty((M, D), torch.float32, dy.device)
    if M == 0 or D == 0:
        return demb
    # Rows grouped by image (stable: each image's rows keep their order); -1 rows sort first and
    # are never read. seg[m] = first position of image m; all on device, no host sync.
    sorted_index, order = torch.sort(image_index, stable=True)
    seg = torch.searchsorted(sorted_index, torch.arange(M + 1, dtype=image_index.dtype, device=dy.device))
    pieces = (seg[1:] - seg[:-1] + PIECE_ROWS - 1) // PIECE_ROWS
    piece_offsets = torch.cat([pieces.new_zeros(1), torch.cumsum(pieces, 0)])
    max_pieces = P // PIECE_ROWS + M  # >= sum over images of ceil(rows / PIECE_ROWS)
    partial = torch.empty((max_pieces, D), dtype=torch.float32, device=dy.device)
    with torch.cuda.device(dy.device):
        ext.timestep_segment_sum(
            demb.data_ptr(),
            partial.data_ptr(),
            dy.data_ptr(),
            order.data_ptr(),
            seg.data_ptr(),
            piece_offsets.data_ptr(),
            M,
            D,
            max_pieces,
            PIECE_ROWS,
            _DTYPE_NAMES[dy.dtype],
            _stream(dy.device),
        )
    return demb


def mlp_backward(demb, timesteps, w1, b1, w2, *, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    # M-row work (a few small GEMMs): the reference's cuBLAS calls are what a kernel would do.
    return reference.mlp_backward(
        demb,
        timesteps,
        w1,
        b1,
        w2,
        freq_dim=freq_dim,
        flip_sin_to_cos=flip_sin_to_cos,
        downscale_freq_shift=downscale_freq_shift,
        scale=scale,
        max_period=max_period,
    )
