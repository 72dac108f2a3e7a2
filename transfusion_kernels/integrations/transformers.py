"""Transfusion masks in Hugging Face transformers models: ``tk.hybrid_attention`` as an attention
implementation.

Importing this module registers the attention function under the name ``"transfusion"``. Any
model whose attention layers dispatch through ``transformers.AttentionInterface`` (Llama, Mistral,
Qwen2, Gemma, ... in transformers >= 4.51, all of 5.x) can then run with a :class:`tk.HybridMask`::

    import transfusion_kernels as tk
    from transfusion_kernels.integrations import transformers as tk_hf

    model = LlamaForCausalLM(config)                     # or from_pretrained(...)
    model.set_attn_implementation("transfusion")         # transformers 5.x; on 4.x pass
                                                         # attn_implementation="transfusion" when loading
    mask = tk.HybridMask.from_spans(cu_seqlens, image_spans)
    out = model(input_ids=ids,                           # [1, N]: the packed batch
                position_ids=tk_hf.packed_position_ids(cu_seqlens)[None],
                transfusion_mask=mask)                   # forwarded to every attention layer

Passing the mask:
  * as the keyword ``transfusion_mask=`` of the model call: models whose forward takes
    ``**kwargs`` hand it to the attention function (transformers 5.x; 4.51+ for most decoders);
  * or with ``with tk_hf.use_mask(mask): model(...)`` where the keyword does not reach the
    attention layers (older model code, pipelines that filter keywords). The keyword wins when both
    are given. ``use_mask(mask, backend="triton")`` also picks the attention backend; the keyword
    for that is ``transfusion_backend=``.

Layout: the packed batch is [1, N] and the mask covers its N tokens. A batch [B, S] of B rows with
equal lengths is flattened to B * S tokens, so build the mask over those (documents must not cross
rows: put a document boundary at every multiple of S). With a KV cache the queries are the new
tokens and the keys the cache plus the new tokens (``tk.HybridMask.cached``).

The HybridMask is the whole mask: the ``attention_mask`` transformers passes in (None on 5.x for
this implementation; a dense causal mask on some 4.x models) is ignored, so express padding in the
HybridMask (or pack without padding). Attention dropout is not supported.

Version notes: the registration uses ``transformers.AttentionInterface`` (4.51+), else the
``ALL_ATTENTION_FUNCTIONS`` dict of 4.48-4.50. transformers 4.45-4.47 choose attention classes per
model and have no pluggable attention function: ``register()`` raises there. Tested with 5.x.
"""
from __future__ import annotations

import contextlib

import torch

from transfusion_kernels.attention import hybrid_attention
from transfusion_kernels.masks import HybridMask

ATTN_IMPLEMENTATION = "transfusion"

# Innermost use_mask() block last: (mask, backend). A list, not a ContextVar, so torch.compile
# can read it (the entry is a constant of the traced call).
_STACK: list[tuple[HybridMask, str | None]] = []


@contextlib.contextmanager
def use_mask(mask: HybridMask, backend: str | None = None):
    """Run the model calls inside the block with ``mask`` (and attention ``backend``)."""
    if not isinstance(mask, HybridMask):
        raise TypeError(f"use_mask: mask must be a tk.HybridMask, got {type(mask).__name__}")
    _STACK.append((mask, backend))
    try:
        yield mask
    finally:
        _STACK.pop()


def packed_position_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 [N]: positions that restart at 0 at every document start (for RoPE in a packed batch)."""
    cu = torch.as_tensor(cu_seqlens).to(torch.int64)
    n = int(cu[-1])
    pos = torch.arange(n, device=cu.device)
    doc = torch.searchsorted(cu, pos, right=True) - 1
    return pos - cu[doc]


def transfusion_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D]
    (transformers' layout) -> (attn_output [B, Sq, Hq, D], None)."""
    mask = kwargs.get("transfusion_mask")
    backend = kwargs.get("transfusion_backend")
    if mask is None and _STACK:
        mask, ctx_backend = _STACK[-1]
        backend = backend if backend is not None else ctx_backend
    if mask is None:
        raise ValueError(
            "attention implementation 'transfusion' needs a tk.HybridMask: call the model with "
            "transfusion_mask=mask, or inside `with transfusion_kernels.integrations.transformers.use_mask(mask):`"
        )
    if not isinstance(mask, HybridMask):
        raise TypeError(f"transfusion_mask must be a tk.HybridMask, got {type(mask).__name__}")
    if dropout:
        raise ValueError(f"attention implementation 'transfusion' has no attention dropout (got dropout={dropout}); "
                         "set the model's attention_dropout to 0")
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attention implementation 'transfusion' does not support {name}={kwargs[name]!r}; "
                             "express a window in the HybridMask intervals instead")
    B, Hq, Sq, D = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]
    if mask.num_queries != B * Sq or mask.num_keys != B * Sk:
        raise ValueError(
            f"transfusion_mask covers {mask.num_queries} queries x {mask.num_keys} keys, but the layer has "
            f"batch {B} x {Sq} queries and {B} x {Sk} keys (a [B, S] batch is flattened to B * S tokens)"
        )
    # [B, H, S, D] -> [B * S, H, D]: a view when B == 1 (the packed case), one copy otherwise.
    q = query.transpose(1, 2).reshape(B * Sq, Hq, D)
    k = key.transpose(1, 2).reshape(B * Sk, Hkv, D)
    v = value.transpose(1, 2).reshape(B * Sk, Hkv, value.shape[-1])
    out = hybrid_attention(q, k, v, mask, softmax_scale=scaling, backend=backend)
    return out.view(B, Sq, Hq, out.shape[-1]), None


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention function with transformers under ``name`` (idempotent)."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        AttentionInterface = None
    if AttentionInterface is not None:
        AttentionInterface.register(name, transfusion_attention_forward)
        return name
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as e:
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__} has no pluggable attention functions; the "
            f"'{name}' attention needs transformers >= 4.48 (AttentionInterface: >= 4.51)"
        ) from e
    ALL_ATTENTION_FUNCTIONS[name] = transfusion_attention_forward
    return name


register()

__all__ = ["ATTN_IMPLEMENTATION", "packed_position_ids", "register", "transfusion_attention_forward", "use_mask"]
