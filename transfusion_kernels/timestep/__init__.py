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
public functions validate every argument (``validation.py``) before the custom ops (``ops.py``)
call them, so a backend may assume: all
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

import torch
from torch import nn

from transfusion_kernels.backends import select
from transfusion_kernels.timestep import reference
from transfusion_kernels.timestep.ops import TIMESTEP
from transfusion_kernels.timestep.validation import T_DTYPES, check_config, check_inputs, describe, err

__all__ = ["TIMESTEP", "TimestepMLP", "patch_timestep_embedding", "timestep_embedding"]


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
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in T_DTYPES:
        raise ValueError(f"timestep_embedding: t must be a 1-D integer or floating tensor, got {describe(t)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"timestep_embedding: dim must be a positive int, got {dim!r}")
    shift, scale, max_period = check_config(dim, downscale_freq_shift, scale, max_period, "timestep_embedding")
    return reference.sinusoid(t, dim, bool(flip_sin_to_cos), shift, scale, max_period)


class TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2, laid out like diffusers' ``TimestepEmbedding(in_channels=freq_dim,
    time_embed_dim=hidden_dim, out_dim=out_dim)`` so state dicts load across unchanged.

    Pass it as ``mlp=`` to :func:`patch_timestep_embedding`; calling it directly maps
    [N, freq_dim] -> [N, out_dim] exactly as the diffusers module does."""

    def __init__(
        self, freq_dim: int, hidden_dim: int, out_dim: int | None = None, *, bias: bool = True, device=None, dtype=None
    ):
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
            raise ValueError(
                f"TimestepMLP: sample must be a tensor [..., freq_dim = {self.freq_dim}], got {describe(sample)}"
            )
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
        mod = cls(
            l1.in_features, l1.out_features, l2.out_features, bias=l1.bias is not None, device=w.device, dtype=w.dtype
        )
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
    freq_dim = check_inputs(x, timesteps, image_index, w1, b1, w2, b2, freq_dim)
    shift, scale, max_period = check_config(
        freq_dim, downscale_freq_shift, scale, max_period, "patch_timestep_embedding"
    )
    name = select(TIMESTEP, backend, x)
    return torch.ops.transfusion_kernels.patch_timestep_embedding(
        x,
        timesteps,
        image_index,
        w1,
        b1,
        w2,
        b2,
        freq_dim,
        bool(flip_sin_to_cos),
        shift,
        scale,
        max_period,
        name,
    )


def _mlp_weights(mlp):
    if mlp is None:
        return None, None, None, None
    if isinstance(mlp, TimestepMLP):
        return mlp.weights()
    if isinstance(mlp, nn.Module):
        raise err(
            f"mlp must be a TimestepMLP (use TimestepMLP.from_diffusers for a diffusers "
            f"TimestepEmbedding) or a (w1, b1, w2, b2) tuple, got {type(mlp).__name__}"
        )
    if not isinstance(mlp, (tuple, list)) or len(mlp) != 4:
        raise err(f"mlp must be None, a TimestepMLP or a (w1, b1, w2, b2) tuple, got {type(mlp).__name__}")
    return tuple(mlp)
