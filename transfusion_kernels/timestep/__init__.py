"""Timestep embeddings for the image patches of a packed Transfusion batch.

Public API::

    emb = timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=1.0,
                             max_period=10000.0)       # == diffusers get_timestep_embedding, fp32 [len(t), dim]
    mlp = TimestepMLP(freq_dim, hidden_dim, out_dim)    # == diffusers TimestepEmbedding (linear_1, SiLU, linear_2)
    y = patch_timestep_embedding(x, timesteps, image_index, mlp=None, *, freq_dim=256, ..., backend=None)

``y = x + emb(timesteps)[image_index]`` (rows with index -1 unchanged), in x.dtype with fp32 math.
The embedding (sinusoid, then the optional MLP) is computed once per image (M rows) and added to
every patch in one memory-bound pass over x. Differentiable in x and in the MLP weights, not in
the timesteps.

Backend module interface
------------------------
Each backend (``reference.py``, ``triton.py``, ``cuda.py``) is a module with three functions. The
dispatcher below validates every argument before calling them, so a backend may assume: all
tensors on one device and contiguous; ``x``/``dy`` 2-D [P, D] in fp16/bf16/fp32 with P >= 1;
``timesteps`` 1-D [M] of any integer or floating dtype (convert to fp32 the way ``Tensor.float()``
does); ``image_index`` int32 [P] with values in [-1, M); ``w1`` [H, freq_dim], ``b1`` [H] or None,
``w2`` [D, H], ``b2`` [D] or None, each fp16/bf16/fp32 (``w1`` None means no MLP and then
freq_dim == D). The config keywords are ``freq_dim`` (int), ``flip_sin_to_cos`` (bool),
``downscale_freq_shift``, ``scale``, ``max_period`` (floats).

``forward(x, timesteps, image_index, w1, b1, w2, b2, **config) -> y``
    New tensor like x: ``x + emb[image_index]`` rounded once to x.dtype, emb in fp32.
    The sinusoid arguments must be diffusers' fp32 values: ``scale * (float(t) * freq[k])`` with
    freq from ``reference.frequencies`` (or the same fp32 ops computed in-kernel).
``segment_sum(dy, image_index, num_images) -> demb``
    fp32 [num_images, D]: row m is the sum of dy over the rows p with image_index[p] == m (zero
    for an image without patches). Called only when an MLP weight needs a gradient.
``mlp_backward(demb, timesteps, w1, b1, w2, **config) -> (dw1, db1, dw2, db2)``
    fp32 gradients of ``sum(demb * emb)`` in the MLP weights (db1 computed even when b1 is None).
    A backend may return ``reference.mlp_backward(...)``: it is M-row work.

The kernel backends also define ``supports(x) -> reason or None`` (what their kernels cover: on a
reason ``backends.select`` raises for a named backend and passes it over under "auto"). Nothing
else is required: dx = dy is handled here, and so are the casts of the gradients to the weights'
dtypes.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import nn

from transfusion_kernels.backends import Op, select
from transfusion_kernels.timestep import reference

__all__ = ["TIMESTEP", "TimestepMLP", "patch_timestep_embedding", "timestep_embedding"]

_IMPLS = {
    "reference": "transfusion_kernels.timestep.reference",
    "triton": "transfusion_kernels.timestep.triton",
    "cuda": "transfusion_kernels.timestep.cuda",
}
TIMESTEP = Op("patch_timestep_embedding", _IMPLS)

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_T_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
             torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- public functions


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal timestep embedding, fp32 [len(t), dim]: the same values as
    ``diffusers.models.embeddings.get_timestep_embedding(t, dim, flip_sin_to_cos,
    downscale_freq_shift, scale, max_period)`` (note the defaults here are Transfusion's / DiT's:
    cos first, no shift). An odd ``dim`` gets a zero last column, as in diffusers."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in _T_DTYPES:
        raise ValueError(f"timestep_embedding: t must be a 1-D integer or floating tensor, got {_describe(t)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"timestep_embedding: dim must be a positive int, got {dim!r}")
    shift, scale, max_period = _check_config(dim, downscale_freq_shift, scale, max_period, "timestep_embedding")
    return reference.sinusoid(t, dim, bool(flip_sin_to_cos), shift, scale, max_period)


class TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2, laid out like diffusers' ``TimestepEmbedding(in_channels=freq_dim,
    time_embed_dim=hidden_dim, out_dim=out_dim)`` so state dicts load across unchanged.

    Pass it as ``mlp=`` to :func:`patch_timestep_embedding`; calling it directly maps
    [N, freq_dim] -> [N, out_dim] exactly as the diffusers module does."""

    def __init__(self, freq_dim: int, hidden_dim: int, out_dim: int | None = None, *, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        out_dim = hidden_dim if out_dim is None else out_dim
        for name, n in (("freq_dim", freq_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"TimestepMLP: {name} must be a positive int, got {n!r}")
        self.linear_1 = nn.Linear(freq_dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_dim, out_dim, bias=bias, device=device, dtype=dtype)

    @property
    def freq_dim(self) -> int:
        return self.linear_1.in_features

    @property
    def hidden_dim(self) -> int:
        return self.linear_1.out_features

    @property
    def out_dim(self) -> int:
        return self.linear_2.out_features

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        if not isinstance(sample, torch.Tensor) or sample.dim() < 1 or sample.shape[-1] != self.freq_dim:
            raise ValueError(f"TimestepMLP: sample must be a tensor [..., freq_dim = {self.freq_dim}], "
                             f"got {_describe(sample)}")
        return self.linear_2(self.act(self.linear_1(sample)))

    def weights(self):
        """(w1, b1, w2, b2), biases None when the module has none."""
        return (self.linear_1.weight, self.linear_1.bias, self.linear_2.weight, self.linear_2.bias)

    @classmethod
    def from_diffusers(cls, te: nn.Module, copy: bool = True) -> "TimestepMLP":
        """A TimestepMLP with the weights of a diffusers ``TimestepEmbedding``. ``copy=False`` shares
        the diffusers module's ``linear_1``/``linear_2`` (training one trains the other)."""
        if getattr(te, "cond_proj", None) is not None:
            raise ValueError("TimestepMLP.from_diffusers: te has a cond_proj, which TimestepMLP does not model")
        if getattr(te, "post_act", None) is not None:
            raise ValueError("TimestepMLP.from_diffusers: te has a post_act, which TimestepMLP does not model")
        if not isinstance(getattr(te, "act", None), nn.SiLU):
            raise ValueError(f"TimestepMLP.from_diffusers: te.act must be SiLU, got {getattr(te, 'act', None)!r}")
        l1, l2 = te.linear_1, te.linear_2
        w = l1.weight
        mod = cls(l1.in_features, l1.out_features, l2.out_features, bias=l1.bias is not None,
                  device=w.device, dtype=w.dtype)
        if copy:
            mod.load_state_dict({k: v for k, v in te.state_dict().items() if k.startswith(("linear_1.", "linear_2."))})
        else:
            mod.linear_1, mod.linear_2 = l1, l2
        return mod


def patch_timestep_embedding(
    x: torch.Tensor,
    timesteps: torch.Tensor,
    image_index: torch.Tensor,
    mlp=None,
    *,
    freq_dim: int = 256,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
    backend: str | None = None,
) -> torch.Tensor:
    """``x + emb(timesteps)[image_index]`` for the patches of a packed batch.

    x: [P, D] fp16/bf16/fp32. timesteps: [M], integer or floating, one per image.
    image_index: int32 [P] in [-1, M); -1 = the token gets nothing (text, BOI/EOI, padding).
    mlp: None (sinusoid only; freq_dim must equal D), a :class:`TimestepMLP`, or a tuple
    (w1 [H, freq_dim], b1 [H] or None, w2 [D, H], b2 [D] or None).
    Returns a new [P, D] tensor of x's dtype. The embedding is computed once per image in fp32 and
    added to its patches; gradients flow to x (dx = dy) and to the MLP weights.

    The range of image_index is checked when the op runs (one small device-to-host read)."""
    w1, b1, w2, b2 = _mlp_weights(mlp)
    freq_dim = _check_inputs(x, timesteps, image_index, w1, b1, w2, b2, freq_dim)
    shift, scale, max_period = _check_config(freq_dim, downscale_freq_shift, scale, max_period,
                                             "patch_timestep_embedding")
    name = select(TIMESTEP, backend, x)
    return torch.ops.transfusion_kernels.patch_timestep_embedding(
        x, timesteps, image_index, w1, b1, w2, b2, freq_dim, bool(flip_sin_to_cos), shift, scale, max_period, name,
    )


# ----------------------------------------------------------------------------- validation


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return type(t).__name__


def _err(msg: str) -> ValueError:
    return ValueError(f"patch_timestep_embedding: {msg}")


def _check_config(dim, downscale_freq_shift, scale, max_period, op: str):
    """The sinusoid's float parameters: finite, max_period > 0, and a frequency table without a
    division by zero (diffusers returns NaN there; we refuse it)."""
    values = []
    for name, v in (("downscale_freq_shift", downscale_freq_shift), ("scale", scale), ("max_period", max_period)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite real number, got {v!r}")
        values.append(float(v))
    shift, scale, max_period = values
    if max_period <= 0:
        raise ValueError(f"{op}: max_period must be positive, got {max_period}")
    half = dim // 2
    if half > 0 and half - shift == 0:
        raise ValueError(f"{op}: downscale_freq_shift must differ from dim // 2 = {half} (the frequency exponent "
                         f"divides by dim // 2 - downscale_freq_shift), got {shift}")
    return shift, scale, max_period


def _mlp_weights(mlp):
    if mlp is None:
        return None, None, None, None
    if isinstance(mlp, TimestepMLP):
        return mlp.weights()
    if isinstance(mlp, nn.Module):
        raise _err(f"mlp must be a TimestepMLP (use TimestepMLP.from_diffusers for a diffusers "
                   f"TimestepEmbedding) or a (w1, b1, w2, b2) tuple, got {type(mlp).__name__}")
    if not isinstance(mlp, (tuple, list)) or len(mlp) != 4:
        raise _err(f"mlp must be None, a TimestepMLP or a (w1, b1, w2, b2) tuple, got {type(mlp).__name__}")
    return tuple(mlp)


def _check_inputs(x, timesteps, image_index, w1, b1, w2, b2, freq_dim) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _X_DTYPES:
        raise _err(f"x must be a 2-D float16/bfloat16/float32 tensor [P, D], got {_describe(x)}")
    P, D = x.shape
    if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1 or timesteps.dtype not in _T_DTYPES:
        raise _err(f"timesteps must be a 1-D integer or floating tensor [M], got {_describe(timesteps)}")
    if not isinstance(image_index, torch.Tensor) or image_index.dtype != torch.int32:
        raise _err(f"image_index must be an int32 tensor [P], got {_describe(image_index)}")
    if image_index.shape != (P,):
        raise _err(f"image_index must have shape [P] = [{P}] (one entry per row of x), "
                   f"got {tuple(image_index.shape)}")
    if isinstance(freq_dim, bool) or not isinstance(freq_dim, int) or freq_dim < 1:
        raise _err(f"freq_dim must be a positive int, got {freq_dim!r}")
    for name, t in (("timesteps", timesteps), ("image_index", image_index)):
        if t.device != x.device:
            raise _err(f"{name} is on {t.device} but x is on {x.device}")
    if w1 is None:
        if any(w is not None for w in (b1, w2, b2)):
            raise _err("mlp tuple has w1=None but other weights set")
        if freq_dim != D:
            raise _err(f"freq_dim must equal D = x.shape[1] = {D} when mlp is None (sinusoid only), "
                       f"got freq_dim={freq_dim}")
        return freq_dim
    for name, w, dims in (("w1", w1, 2), ("b1", b1, 1), ("w2", w2, 2), ("b2", b2, 1)):
        if w is None and name in ("w1", "w2"):
            raise _err(f"mlp {name} is None")
        if w is None:
            continue
        if not isinstance(w, torch.Tensor) or w.dim() != dims or w.dtype not in _X_DTYPES:
            raise _err(f"mlp {name} must be a {dims}-D float16/bfloat16/float32 tensor, got {_describe(w)}")
        if w.device != x.device:
            raise _err(f"mlp {name} is on {w.device} but x is on {x.device}")
    H = w1.shape[0]
    if w1.shape[1] != freq_dim:
        raise _err(f"freq_dim={freq_dim} does not match mlp w1 of shape {tuple(w1.shape)} "
                   f"(expected [H, freq_dim]); pass freq_dim={w1.shape[1]}")
    if b1 is not None and b1.shape != (H,):
        raise _err(f"mlp b1 must have shape [H] = [{H}], got {tuple(b1.shape)}")
    if w2.shape != (D, H):
        raise _err(f"mlp w2 must have shape [D, H] = [{D}, {H}] (D = x.shape[1]), got {tuple(w2.shape)}")
    if b2 is not None and b2.shape != (D,):
        raise _err(f"mlp b2 must have shape [D] = [{D}], got {tuple(b2.shape)}")
    return freq_dim


def _check_index_range(image_index: torch.Tensor, num_images: int) -> None:
    # Data-dependent, so it runs inside the op (eagerly, also under torch.compile), not in the tracer.
    if image_index.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(image_index))
    if lo < -1 or hi >= num_images:
        raise _err(f"image_index values must lie in [-1, M) = [-1, {num_images}) (M = len(timesteps)), "
                   f"got values in [{lo}, {hi}]")


# ----------------------------------------------------------------------------- custom ops


def _cfg(freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    return dict(freq_dim=freq_dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=downscale_freq_shift,
                scale=scale, max_period=max_period)


def _c(t):
    return None if t is None else t.contiguous()


@torch.library.custom_op("transfusion_kernels::patch_timestep_embedding", mutates_args=())
def _patch_op(
    x: torch.Tensor, timesteps: torch.Tensor, image_index: torch.Tensor,
    w1: Optional[torch.Tensor], b1: Optional[torch.Tensor], w2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
    freq_dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float, max_period: float,
    backend: str,
) -> torch.Tensor:
    _check_index_range(image_index, timesteps.shape[0])
    if x.shape[0] == 0:
        return torch.empty_like(x)
    return TIMESTEP.module(backend).forward(
        x.contiguous(), timesteps.contiguous(), image_index.contiguous(), _c(w1), _c(b1), _c(w2), _c(b2),
        **_cfg(freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period))


@_patch_op.register_fake
def _(x, timesteps, image_index, w1, b1, w2, b2, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale,
      max_period, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("transfusion_kernels::patch_timestep_segment_sum", mutates_args=())
def _segment_sum_op(dy: torch.Tensor, image_index: torch.Tensor, num_images: int, backend: str) -> torch.Tensor:
    if dy.shape[0] == 0:
        return dy.new_zeros(num_images, dy.shape[1], dtype=torch.float32)
    return TIMESTEP.module(backend).segment_sum(dy.contiguous(), image_index.contiguous(), num_images)


@_segment_sum_op.register_fake
def _(dy, image_index, num_images, backend):
    return dy.new_empty(num_images, dy.shape[1], dtype=torch.float32)


@torch.library.custom_op("transfusion_kernels::timestep_mlp_backward", mutates_args=())
def _mlp_backward_op(
    demb: torch.Tensor, timesteps: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
    freq_dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float, max_period: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = TIMESTEP.module(backend).mlp_backward(
        demb.contiguous(), timesteps.contiguous(), w1.contiguous(), _c(b1), w2.contiguous(),
        **_cfg(freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period))
    return tuple(g.contiguous() for g in grads)


@_mlp_backward_op.register_fake
def _(demb, timesteps, w1, b1, w2, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, backend):
    f32 = dict(dtype=torch.float32)
    return (demb.new_empty(w1.shape, **f32), demb.new_empty(w1.shape[0], **f32),
            demb.new_empty(w2.shape, **f32), demb.new_empty(w2.shape[0], **f32))


def _setup_context(ctx, inputs, output):
    x, timesteps, image_index, w1, b1, w2, b2, *cfg, backend = inputs
    ctx.save_for_backward(timesteps, image_index, w1, b1, w2)
    ctx.weight_dtypes = tuple(None if w is None else w.dtype for w in (w1, b1, w2, b2))
    ctx.cfg = cfg
    ctx.backend = backend


def _backward(ctx, dy):
    timesteps, image_index, w1, b1, w2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = dy if need[0] else None
    grads = [None] * 4
    if w1 is not None and any(need[3:7]):
        demb = _segment_sum_op(dy, image_index, timesteps.shape[0], ctx.backend)
        full = _mlp_backward_op(demb, timesteps, w1, b1, w2, *ctx.cfg, ctx.backend)
        for i, (g, n, dtype) in enumerate(zip(full, need[3:7], ctx.weight_dtypes)):
            if n:
                grads[i] = g.to(dtype)
    return (dx, None, None, *grads, None, None, None, None, None, None)


_patch_op.register_autograd(_backward, setup_context=_setup_context)
