"""Transfusion masks in Hugging Face transformers models: ``tk.hybrid_attention`` as an attention
implementation.

Importing this module changes nothing in transformers. ``register()`` adds the name
``"transfusion"`` twice, as an attention function (``transformers.AttentionInterface``) and as a
mask builder (``AttentionMaskInterface``), and returns it; ``unregister()`` puts back what was
there. The mask transformers builds for each forward then reaches the attention as key intervals.
Any model whose attention layers dispatch through the attention interface and whose masks come
from ``transformers.masking_utils`` (Llama, Mistral, Qwen2, ... in transformers 5.x) runs with no
extra argument::

    from transfusion_kernels.integrations import transformers as tk_hf

    model = LlamaForCausalLM(config)                      # or from_pretrained(...)
    model.set_attn_implementation(tk_hf.register())
    model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16)   # as with sdpa

The mask path reads no tensor values on the host, so ``generate()`` does not wait on the GPU and
a forward compiles with ``torch.compile(fullgraph=True)``. Its checks (a padding gap, image ids)
raise ValueError for CPU tensors and are device-side asserts on a GPU or in a compiled graph.
``use_mask`` blocks are per thread.

What the mask is made of, per row of the batch (absolute positions, as transformers counts them):

  * causal, over the KV cache and the new tokens (cache positions and offsets from the cache);
  * ``attention_mask`` (padding) folded into the intervals. Left padding, and right padding
    without new tokens after it, are intervals; a row whose real keys have a gap before a query
    (right padding, then generated tokens) raises: pad on the left for ``generate()``;
  * the model's sliding window (Mistral, Qwen2): query p sees keys from p - window + 1;
  * packed documents from ``position_ids`` that restart per sequence (what
    ``DataCollatorWithFlattening`` produces and flash-attention-2 reads), in calls without past
    keys. sdpa and eager only do this when ``attention_mask`` is None and no cache is used;
  * images (bidirectional spans): ``transfusion_image_ids``, int [B, L] over the same positions as
    ``attention_mask`` (left padding included), -1 for text and one id per image, each image one
    contiguous run (transformers' ``block_sequence_ids`` convention). Positions at or after L are
    text, so the ids of the prompt keep working through ``generate()``. Pass it as a keyword of
    the model call, or around ``generate()`` (which rejects unknown keywords)::

        with tk_hf.use_mask(image_ids=image_ids):
            model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16)

    An image sees its whole span; with a sliding window it also sees back to the window of its
    first token (transformers' union of window and block).

A fixed mask instead of all of the above: ``transfusion_mask=tk.HybridMask`` (keyword) or
``use_mask(mask)``, over the batch flattened to [B * Sq] queries x [B * Sk] keys (documents must
not cross rows). Padding and the sliding window are still applied to it. It fits one call's
shapes, so it is for forward calls; ``generate()`` needs the derived mask above. A 4-D
``attention_mask`` (boolean or additive 0 / -inf) is used as the whole mask, like eager does,
when every query's visible keys are one interval. ``use_mask(..., backend="triton")`` or the
keyword ``transfusion_backend=`` picks the attention backend. The keywords win over the block.

Logit softcapping (Gemma-2's ``attn_logit_softcapping``, the ``softcap`` keyword) is applied
to the scaled scores as in transformers' eager attention.

Refused with an error: attention dropout, chunked or bidirectional
(``is_causal=False``) masks and models that add their own mask functions (``or_mask_function`` /
``and_mask_function``): these are not intervals or not kernels of this package.

Version notes: transformers 5.x (the mask builder interface). On 4.48-4.50 the attention function
is registered in ``ALL_ATTENTION_FUNCTIONS`` and needs ``transfusion_mask``.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from transfusion_kernels.attention import hybrid_attention
from transfusion_kernels.backends import thread_stack
from transfusion_kernels.masks import HybridMask

ATTN_IMPLEMENTATION = "transfusion"

# Per thread, innermost use_mask() block last: {keyword: value}. threading.local, not a
# ContextVar: torch.compile (2.13) cannot trace ContextVar.get(), and it guards on this.
_LOCAL = threading.local()


def _stack() -> list[dict]:
    return thread_stack(_LOCAL)


def _check(ok: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless ``ok`` (a bool tensor) holds, without a host read of a
    GPU tensor: CPU tensors are read eagerly, elsewhere (and under torch.compile) it is a
    device-side assert."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            raise ValueError(message)
    else:
        torch._assert_async(ok.all(), message)


@contextlib.contextmanager
def use_mask(mask: HybridMask | None = None, backend: str | None = None, *, image_ids: torch.Tensor | None = None):
    """Run the model calls inside the block (``generate()`` included) with a fixed ``mask``, the
    attention ``backend`` and/or the images ``image_ids`` (int [B, L], -1 for text)."""
    if mask is not None and not isinstance(mask, HybridMask):
        raise TypeError(f"use_mask: mask must be a tk.HybridMask, got {type(mask).__name__}")
    stack = _stack()
    stack.append({"transfusion_mask": mask, "transfusion_backend": backend, "transfusion_image_ids": image_ids})
    try:
        yield mask
    finally:
        stack.pop()


def packed_position_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 [N]: positions that restart at 0 at every document start (for RoPE in a packed batch)."""
    cu = torch.as_tensor(cu_seqlens).to(torch.int64)
    n = int(cu[-1])
    pos = torch.arange(n, device=cu.device)
    doc = torch.searchsorted(cu, pos, right=True) - 1
    return pos - cu[doc]


def _run_bounds(new_run: torch.Tensor):
    """For [B, L] run starts: (first index, one past the last index) of each position's run."""
    L = new_run.shape[-1]
    idx = torch.arange(L, device=new_run.device).expand_as(new_run)
    start = torch.where(new_run, idx, 0).cummax(-1).values
    last = torch.cat([new_run[:, 1:], torch.ones_like(new_run[:, :1])], -1)  # last index of its run
    end = torch.where(last, idx + 1, L).flip(-1).cummin(-1).values.flip(-1)
    return start, end


class MaskRequest:
    """What the mask builder hands every attention layer of one forward: sizes, offsets, padding
    and window. The first layer turns it into a HybridMask, the others reuse it."""

    ndim = 4  # transformers passes a 4-D mask through create_causal_mask unchanged (static caches)

    def __init__(self, batch, q_length, kv_length, q_offset=0, kv_offset=0, padding=None, window=None):
        self.batch, self.q_length, self.kv_length = int(batch), int(q_length), int(kv_length)
        # q_offset is a 0-d tensor with a cache (transformers' get_query_offset): kept on device.
        self.q_offset, self.kv_offset = q_offset, int(kv_offset)
        self.window = window
        self.padding = padding  # bool [B, >= kv_offset + kv_length] over absolute positions, or None
        # (transfusion_mask, position_ids, image_ids, the mask built from them), matched by
        # identity; the request holds its inputs for its one forward, so no identity is reused.
        self._masks: list[tuple] = []

    def hybrid(self, Sq, Sk, explicit, position_ids, image_ids, device) -> HybridMask:
        if (Sq, Sk) != (self.q_length, self.kv_length):
            raise ValueError(
                f"the layer has {Sq} queries x {Sk} keys but transformers built its mask for "
                f"{self.q_length} x {self.kv_length}: the cache layout is not supported"
            )
        for e, pos, ids, mask in self._masks:
            if e is explicit and pos is position_ids and ids is image_ids:
                return mask
        mask = self._build(explicit, position_ids, image_ids, device)
        self._masks.append((explicit, position_ids, image_ids, mask))
        return mask

    def _build(self, explicit, position_ids, image_ids, device) -> HybridMask:
        B, Sq, Sk = self.batch, self.q_length, self.kv_length
        p = self.q_offset + torch.arange(Sq, device=device).expand(B, Sq)  # absolute query positions
        if explicit is not None:
            lo, hi = _rows_of(explicit, B, Sq, Sk, device)
            if self.window is not None:
                lo = torch.maximum(lo, p - self.window + 1 - self.kv_offset)
        else:
            lo, hi = self._derived(p, position_ids, image_ids, device)
        lo, hi = lo.clamp(0, Sk), hi.clamp(0, Sk)
        lo = torch.minimum(lo, hi)
        if self.padding is not None:
            need = self.kv_offset + Sk  # the queries are among the keys; keys past the mask are not real
            pad = torch.nn.functional.pad(self.padding.to(device), (0, max(0, need - self.padding.shape[1])))
            real_q = pad.gather(1, p.clamp(max=need - 1))
            lo, hi = _fold_padding(lo, hi, pad[:, self.kv_offset : self.kv_offset + Sk], real_q)
        return _flatten(lo, hi, Sk)

    def _derived(self, p, position_ids, image_ids, device):
        B, Sq, Sk = self.batch, self.q_length, self.kv_length
        hi = p + 1
        lo = torch.zeros_like(p)
        block_start = None
        if image_ids is not None:
            ids = torch.as_tensor(image_ids, device=device)
            if ids.dim() != 2 or ids.shape[0] != B or ids.dtype.is_floating_point:
                raise ValueError(
                    f"transfusion_image_ids must be integers of shape [batch={B}, L], got "
                    f"{ids.dtype} {tuple(ids.shape)}"
                )
            L = ids.shape[1]
            ids = ids.long()
            new_run = torch.ones_like(ids, dtype=torch.bool)
            new_run[:, 1:] = ids[:, 1:] != ids[:, :-1]
            # an id that starts two runs of a row: equal neighbours among the sorted run starts
            run_ids = torch.where(new_run & (ids >= 0), ids, -1).sort(-1).values
            _check(
                ~((run_ids[:, 1:] == run_ids[:, :-1]) & (run_ids[:, 1:] >= 0)),
                "transfusion_image_ids: an image id occurs in two separate runs of a row; "
                "give each image its own id and one contiguous span",
            )
            run_start, run_end = _run_bounds(new_run)
            inside = p < L
            pc = p.clamp(max=L - 1)
            in_img = inside & (ids.gather(1, pc) >= 0)
            hi = torch.where(in_img, torch.maximum(hi, run_end.gather(1, pc)), hi)
            block_start = torch.where(in_img, run_start.gather(1, pc), p)
        no_past = isinstance(self.q_offset, int) and self.q_offset == 0 and self.kv_offset == 0 and Sq == Sk
        if position_ids is not None and position_ids.dim() <= 2 and no_past:
            pos = position_ids.to(device).expand(B, Sq)
            new_doc = torch.ones_like(pos, dtype=torch.bool)
            new_doc[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
            doc_start, doc_end = _run_bounds(new_doc)
            if block_start is not None:
                _check(
                    hi <= doc_end.gather(1, p),
                    "transfusion_image_ids: an image crosses a document boundary (position_ids restart inside it)",
                )
            lo = doc_start
        if self.window is not None:
            w_lo = p - self.window + 1
            lo = torch.maximum(lo, w_lo if block_start is None else torch.minimum(w_lo, block_start))
        return lo - self.kv_offset, hi - self.kv_offset


def _rows_of(mask: HybridMask, B, Sq, Sk, device):
    """A HybridMask over [B * Sq] x [B * Sk] as per-row key indices [B, Sq]."""
    if not isinstance(mask, HybridMask):
        raise TypeError(f"transfusion_mask must be a tk.HybridMask, got {type(mask).__name__}")
    if mask.num_intervals != 1:
        raise ValueError(
            f"transfusion_mask has {mask.num_intervals} intervals per query; the transformers integration "
            "folds padding and windows into one interval per query: call tk.hybrid_attention with the "
            "mask directly for unions"
        )
    if mask.num_queries != B * Sq or mask.num_keys != B * Sk:
        raise ValueError(
            f"transfusion_mask covers {mask.num_queries} queries x {mask.num_keys} keys, but the layer has "
            f"batch {B} x {Sq} queries and {B} x {Sk} keys (a [B, S] batch is flattened to B * S tokens; with "
            "generate() or a KV cache leave transfusion_mask out: the mask is derived from the call)"
        )
    base = (torch.arange(B, device=device) * Sk)[:, None]
    lo = mask.kv_start.to(device).long().view(B, Sq) - base
    hi = mask.kv_end.to(device).long().view(B, Sq) - base
    _check(
        (hi <= lo) | ((lo >= 0) & (hi <= Sk)),
        "transfusion_mask lets a query see keys of another row of the "
        "batch; put a document boundary at every row start",
    )
    return lo, hi


def _fold_padding(lo, hi, valid, real_q):
    """Intersect [lo, hi) with the real keys ``valid`` [B, Sk]; a real query whose visible real
    keys are not one interval raises."""
    B, Sk = valid.shape
    idx = torch.arange(Sk, device=valid.device).expand(B, Sk)
    sentinel = torch.full((B, 1), Sk, device=valid.device, dtype=torch.long)
    first_from = torch.cat([torch.where(valid, idx, Sk), sentinel], 1).flip(1).cummin(1).values.flip(1)
    last_before = torch.cat([-torch.ones_like(sentinel), torch.where(valid, idx, -1)], 1).cummax(1).values
    count = torch.cat([torch.zeros_like(sentinel), valid.long().cumsum(1)], 1)
    n = count.gather(1, hi) - count.gather(1, lo)
    f, l = first_from.gather(1, lo), last_before.gather(1, hi)
    gap = (n > 0) & (l - f + 1 != n)
    _check(
        ~(gap & real_q),
        "attention_mask leaves a gap in the keys of a real query (padding between real "
        "tokens, e.g. right padding followed by generated tokens): the transfusion attention sees one key "
        "interval per query; pad on the left (tokenizer.padding_side = 'left')",
    )
    keep = (n > 0) & ~gap
    return torch.where(keep, f, lo), torch.where(keep, l + 1, lo)


def _flatten(lo, hi, Sk) -> HybridMask:
    base = (torch.arange(lo.shape[0], device=lo.device) * Sk)[:, None]
    s, e = (lo + base).flatten().to(torch.int32), (hi + base).flatten().to(torch.int32)
    # valid by construction (0 <= lo <= hi <= Sk per row): no checking pass, which reads on the host
    return HybridMask(s, e, lo.shape[0] * Sk, _checked=True)


def _from_dense(mask: torch.Tensor, B, Sq, Sk) -> HybridMask:
    """A 4-D boolean or additive (0 / -inf) mask [B or 1, 1, Sq, Sk] whose rows are intervals."""
    if mask.shape[1] != 1 or mask.shape[2:] != (Sq, Sk) or mask.shape[0] not in (1, B):
        raise ValueError(f"a 4-D attention_mask must have shape [{B} or 1, 1, {Sq}, {Sk}], got {tuple(mask.shape)}")
    m = mask[:, 0].expand(B, Sq, Sk)
    if m.dtype != torch.bool:
        allowed = m > torch.finfo(m.dtype).min / 2
        _check(
            ~allowed | (m == 0),
            "a 4-D additive attention_mask with values other than 0 and -inf (a bias) "
            "is not supported by the transfusion attention",
        )
        m = allowed
    n = m.sum(-1)
    lo = m.long().argmax(-1)
    hi = Sk - m.flip(-1).long().argmax(-1)
    _check(
        (n == 0) | (hi - lo == n),
        "the 4-D attention_mask is not one key interval per query; the transfusion "
        "attention supports interval masks only",
    )
    return _flatten(torch.where(n > 0, lo, 0), torch.where(n > 0, hi, 0), Sk)


def transfusion_mask_interface(
    batch_size,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask=None,
    local_size=None,
    use_vmap=False,
    config=None,
    **kwargs,
):
    """The ``AttentionMaskInterface`` function: a :class:`MaskRequest` instead of a dense mask."""
    if isinstance(attention_mask, MaskRequest):
        return attention_mask  # built by generate() for a static cache and passed back in
    if use_vmap:
        raise ValueError(
            "attention implementation 'transfusion': this model adds its own mask functions "
            "(or_mask_function / and_mask_function), which are not interval masks here; pass "
            "transfusion_mask= or transfusion_image_ids= instead"
        )
    if "allow_is_bidirectional_skip" in kwargs:
        raise ValueError(
            "attention implementation 'transfusion' is causal; bidirectional masks (is_causal=False) are not supported"
        )
    if local_size is not None and local_size != getattr(config, "sliding_window", None):
        raise ValueError(
            f"attention implementation 'transfusion' does not support chunked attention (local size "
            f"{local_size}); only the sliding window config.sliding_window"
        )
    # Folded in even when it is all ones: testing that would read it on the host every forward.
    padding = attention_mask.to(torch.bool) if isinstance(attention_mask, torch.Tensor) else None
    return MaskRequest(batch_size, q_length, kv_length, q_offset, kv_offset, padding, local_size)


def transfusion_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D]
    (transformers' layout) -> (attn_output [B, Sq, Hq, D], None)."""
    stack = _stack()
    opts = dict(stack[-1]) if stack else {}
    opts.update(
        {
            k: kwargs[k]
            for k in ("transfusion_mask", "transfusion_backend", "transfusion_image_ids")
            if kwargs.get(k) is not None
        }
    )
    explicit, image_ids = opts.get("transfusion_mask"), opts.get("transfusion_image_ids")
    if dropout:
        raise ValueError(
            f"attention implementation 'transfusion' has no attention dropout (got dropout={dropout}); "
            "set the model's attention_dropout to 0"
        )
    B, Hq, Sq, D = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        if explicit is not None or image_ids is not None:
            raise ValueError(
                "a 4-D attention_mask is the whole mask: leave transfusion_mask and "
                "transfusion_image_ids out, or pass a 2-D attention_mask"
            )
        mask = _from_dense(attention_mask, B, Sq, Sk)
    else:
        if attention_mask is None:  # model code that builds no mask: no cache, the layer's own window
            if Sq != Sk and explicit is None:
                raise ValueError(
                    "attention implementation 'transfusion': this model built no attention mask for "
                    f"{Sq} queries against {Sk} keys; pass transfusion_mask=tk.HybridMask"
                )
            attention_mask = MaskRequest(B, Sq, Sk, Sk - Sq, 0, None, kwargs.get("sliding_window"))
        elif not isinstance(attention_mask, MaskRequest):
            raise TypeError(
                f"attention implementation 'transfusion' got an attention_mask of type "
                f"{type(attention_mask).__name__}; pass a 2-D padding mask or a 4-D mask"
            )
        mask = attention_mask.hybrid(Sq, Sk, explicit, kwargs.get("position_ids"), image_ids, query.device)
    # [B, H, S, D] -> [B * S, H, D]: a view when B == 1 (the packed case), one copy otherwise.
    q = query.transpose(1, 2).reshape(B * Sq, Hq, D)
    k = key.transpose(1, 2).reshape(B * Sk, Hkv, D)
    v = value.transpose(1, 2).reshape(B * Sk, Hkv, value.shape[-1])
    # softcap: Gemma-2's attn_logit_softcapping, applied to the scaled scores as its eager attention does
    out = hybrid_attention(
        q, k, v, mask, softmax_scale=scaling, backend=opts.get("transfusion_backend"), softcap=kwargs.get("softcap")
    )
    return out.view(B, Sq, Hq, out.shape[-1]), None


_MISSING = object()
_PREVIOUS: dict[str, list] = {}  # name -> what register() replaced in each registry, for unregister()


def _registries(name: str) -> list[tuple[dict, object]]:
    """(transformers' registry, the function of this module that ``register`` puts there)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"the '{name}' attention needs transformers ({e}): pip install 'transfusion-kernels[transformers]'"
        ) from None
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        except ImportError:
            raise RuntimeError(
                f"transformers {transformers.__version__} has no pluggable attention functions; the "
                f"'{name}' attention needs transformers >= 4.48 (mask building: >= 5.0)"
            ) from None
        return [(ALL_ATTENTION_FUNCTIONS, transfusion_attention_forward)]
    return [
        (AttentionInterface._global_mapping, transfusion_attention_forward),
        (AttentionMaskInterface._global_mapping, transfusion_mask_interface),
    ]


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention function and the mask builder with transformers under ``name`` and
    return it, for ``model.set_attn_implementation(register())``. Idempotent; undone by
    :func:`unregister`."""
    registries = _registries(name)
    if name not in _PREVIOUS:
        _PREVIOUS[name] = [registry.get(name, _MISSING) for registry, _ in registries]
    for registry, fn in registries:
        registry[name] = fn
    return name


def unregister(name: str = ATTN_IMPLEMENTATION) -> None:
    """Undo :func:`register`: transformers' registries hold what they held before it (nothing, for a
    new name). Models still set to ``name`` fail at their next forward, as for any unknown name."""
    previous = _PREVIOUS.pop(name, None)
    if previous is None:
        return
    for (registry, _), old in zip(_registries(name), previous):
        if old is _MISSING:
            registry.pop(name, None)
        else:
            registry[name] = old


__all__ = [
    "ATTN_IMPLEMENTATION",
    "MaskRequest",
    "packed_position_ids",
    "register",
    "transfusion_attention_forward",
    "transfusion_mask_interface",
    "unregister",
    "use_mask",
]
