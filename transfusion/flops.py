"""Training FLOPs of a batch, counted the same way for both image recipes.

Per training step (forward + backward = 3 x the forward's 2 FLOPs per multiply-add)::

    6 * (P_layers * tokens + d * V * logits + 2 * p * d * image_tokens + (f * d + d * d) * images)
      + 12 * L * d_attn * pairs

- ``P_layers``: the transformer's matmul weights a token passes through, ``L * (d * d_attn +
  2 * d * d_kv + d_attn * d + 3 * d * h)`` (Q, K, V, O projections and the SwiGLU's three;
  norms, biases, rotary and the embedding lookup are not counted);
- ``tokens``: every position fed, text, BOI/EOI and image tokens alike (a discrete image is its
  codes; a continuous one its patches);
- ``logits``: the positions the LM head is applied to (those with a next-token target: text only
  in the continuous recipe, text and image codes in the discrete one); ``V``: the vocabulary,
  image codes included;
- ``image_tokens``, ``images``: the continuous recipe's patch vectors through the linear patch
  encoder and decoder (``p = C * k * k`` each way) and its images' timestep MLPs (``f``: the
  frequency width); 0 for the discrete recipe;
- ``pairs``: the query-key pairs the mask lets attend (per document ``n (n + 1) / 2`` causal
  pairs, plus ``m (m - 1) / 2`` for each bidirectional image of ``m`` patches), each costing
  2 * d_attn multiply-adds forward (scores and the weighted sum of values).

The U-Net image encoder is not counted (``training_flops`` returns None for it).
"""

from __future__ import annotations

from transfusion.data import IGNORE


def ffn_hidden(cfg) -> int:
    """The SwiGLU hidden width ``Block`` builds."""
    return cfg.ffn_hidden or 32 * ((int(cfg.dim * 8 / 3) + 31) // 32)


def layer_matmul_params(cfg) -> int:
    """The matmul weights a token passes through in the transformer's layers (``P_layers``)."""
    d, attn, kv = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return cfg.n_layers * (d * attn + 2 * d * kv + attn * d + 3 * d * ffn_hidden(cfg))


def batch_counts(batch, bidirectional_images: bool) -> dict:
    """What ``training_flops`` counts in a packed batch."""
    cu = batch.cu_seqlens.tolist()
    pairs = sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu, cu[1:]))
    if bidirectional_images:
        pairs += sum((e - s) * (e - s - 1) // 2 for s, e in batch.image_spans.tolist())
    return {
        "tokens": int(batch.input_ids.numel()),
        "logits": int((batch.labels != IGNORE).sum()),
        "image_tokens": int((batch.image_index >= 0).sum()),
        "images": len(batch.images),
        "attention_pairs": int(pairs),
    }


def training_flops(cfg, counts: dict) -> float | None:
    """Training FLOPs of one step over a batch with ``counts`` (see the module docstring)."""
    if not cfg.discrete_images and cfg.image_encoder != "linear":
        return None
    d = cfg.dim
    weights = (
        layer_matmul_params(cfg) * counts["tokens"]
        + d * cfg.vocab_size * counts["logits"]
        + 2 * cfg.patch_dim * d * counts["image_tokens"]
        + (cfg.timestep_freq_dim * d + d * d) * counts["images"]
    )
    return float(6 * weights + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * counts["attention_pairs"])
