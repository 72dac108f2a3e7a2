"""A Llama-style Transfusion transformer on the transfusion_kernels ops.

RMSNorm, SwiGLU, rotary positions over packed documents (positions restart at each document),
grouped-query attention through ``tk.hybrid_attention`` with the Transfusion mask (causal
everywhere, bidirectional inside each image). Text goes through an embedding table and an LM
head; images through ``LinearPatches`` or ``UNetPatches``, with the diffusion timestep added to
each patch vector by ``tk.patch_timestep_embedding``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import transfusion_kernels as tk
from transfusion_kernels.attention import ATTENTION

from transfusion.config import ModelConfig
from transfusion.image import LinearPatches, UNetPatches


def _attention_backend(backend, device) -> str:
    """The backend attention resolves to on ``device``: the named one, or under "auto" the first
    kernel backend that runs there (the reference on a CPU)."""
    from transfusion_kernels.backends import AUTO_ORDER, backend_info, requested_backend

    name = requested_backend(backend)
    if name != "auto":
        return name
    return next(
        (c for c in AUTO_ORDER if device.type == "cuda" and ATTENTION.has(c) and backend_info(c, device).available),
        "reference",
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[:, None] * inv[None]
    return ang.cos(), ang.sin()  # [N, head_dim / 2]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama (rotate-half) rotary embedding of ``x [N, H, D]``."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)


def split_attention_blocks(mask, max_tokens: int):
    """Cut an interval mask into independent blocks: ``[(q0, q1, k0, k1, HybridMask)]``, queries
    ``[q0, q1)`` seeing only keys in ``[k0, k1)``, each block about ``max_tokens`` queries or keys.

    A cut before query c is allowed when no earlier query sees a key that c's block starts
    after: ``kv_end[c-1] <= kv_start[c]`` (document boundaries of a packed batch, sequence
    boundaries of a KV-cache step). Exact: attention over the blocks equals attention over the
    whole mask. It pays off for backends whose cost grows with the product of a call's query and
    key ranges (the reference backend on the CPU); the Triton and CUDA kernels skip fully masked
    tiles and need no splitting. Returns ``mask`` itself when there is nothing to split."""
    n = mask.num_queries
    if not mask.monotone or (n <= max_tokens and mask.num_keys <= max_tokens):
        return mask
    s, e = mask.kv_start.long(), mask.kv_end.long()
    cuts = (torch.nonzero(e[:-1] <= s[1:]).squeeze(1) + 1).tolist() + [n]
    s_at, e_before = s.tolist(), e.tolist()  # one host copy; the loop below is per cut, not per token
    bounds, a, prev = [], 0, None
    for c in cuts:
        if prev is not None and max(c - a, e_before[c - 1] - s_at[a]) > max_tokens:
            bounds.append((a, prev))
            a = prev
        prev = c
    bounds.append((a, n))
    if len(bounds) == 1:
        return mask
    out = []
    for q0, q1 in bounds:
        k0, k1 = s_at[q0], e_before[q1 - 1]
        m = tk.HybridMask.from_intervals((s[q0:q1] - k0).int(), (e[q0:q1] - k0).int(), num_keys=k1 - k0)
        out.append((q0, q1, k0, k1, m))
    return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, backend=None, cache=None, layer=0, step=None):
        n = x.shape[0]
        q = apply_rope(self.wq(x).view(n, self.n_heads, self.hd), cos, sin)
        k = apply_rope(self.wk(x).view(n, self.n_kv, self.hd), cos, sin)
        v = self.wv(x).view(n, self.n_kv, self.hd)
        if cache is not None:
            k, v = cache.keys_values(layer, k, v, step)
        if isinstance(mask, list):  # independent blocks (see split_attention_blocks)
            o = torch.cat([tk.hybrid_attention(q[a:b], k[c:d], v[c:d], m, backend=backend) for a, b, c, d, m in mask])
        else:
            o = tk.hybrid_attention(q, k, v, mask, backend=backend)
        return self.wo(o.reshape(n, self.n_heads * self.hd))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.ffn_hidden or 32 * ((int(cfg.dim * 8 / 3) + 31) // 32)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, hidden)

    def forward(self, x, cos, sin, mask, backend=None, cache=None, layer=0, step=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, backend, cache, layer, step)
        return x + self.ffn(self.ffn_norm(x))


class TransfusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.backend = backend  # kernel backend for every tk op (None: tk's own default)
        # split attention into independent blocks of about this many tokens (None: one call;
        # "auto": 128 when the attention backend is the reference); see split_attention_blocks
        self.attention_block_tokens: int | str | None = "auto"
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.discrete_images:  # images are codes in the vocabulary: no image encoder, head or timesteps
            self.register_buffer("codebook", torch.zeros(cfg.image_codes, cfg.patch_dim))
        elif cfg.image_encoder == "linear":
            self.image = LinearPatches(cfg.latent_channels, cfg.patch_size, cfg.dim)
        else:
            self.image = UNetPatches(
                cfg.latent_channels, cfg.patch_size, cfg.dim, cfg.unet_channels, cfg.timestep_freq_dim
            )
        if not cfg.discrete_images:
            self.t_mlp = tk.TimestepMLP(cfg.timestep_freq_dim, cfg.dim, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init)  # (the image head's output layer keeps its zero init)
        for name, p in self.named_parameters():  # scaled init of residual outputs (GPT-2 style)
            if name.endswith(("attn.wo.weight", "ffn.w2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layers) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)) and not getattr(m, "zero_init", False):
            nn.init.normal_(m.weight, std=0.02)

    def schedule(self) -> "tk.DiffusionSchedule":
        c = self.cfg
        return tk.DiffusionSchedule(
            num_train_timesteps=c.num_train_timesteps,
            beta_schedule=c.beta_schedule,
            beta_start=c.beta_start,
            beta_end=c.beta_end,
        )

    # -- discrete images ---------------------------------------------------------------------
    def image_tokens(self, latents):
        """Token ids ``[N, n]`` of latents ``[N, C, H, W]`` (a discrete model): their codebook
        codes, offset past the text vocabulary."""
        from transfusion.codebook import encode_codes

        return encode_codes(self.codebook, latents, self.cfg.patch_size) + self.cfg.text_vocab_size

    def token_images(self, tokens, shape):
        """Latents ``[N, C, H, W]`` of image token ids ``[N, n]`` (the inverse of ``image_tokens``
        up to the codebook's quantisation)."""
        from transfusion.codebook import decode_codes

        return decode_codes(self.codebook, tokens - self.cfg.text_vocab_size, shape, self.cfg.patch_size)

    # -- pieces ------------------------------------------------------------------------------
    def embed_images(self, images, timesteps):
        """Patch vectors of ``images`` (noisy latents at ``timesteps``) with the timestep
        embedding added, and the codec state the output side needs."""
        tok, state = self.image.encode(images, timesteps)
        counts = torch.tensor(
            [(x.shape[1] // self.cfg.patch_size) * (x.shape[2] // self.cfg.patch_size) for x in images],
            device=tok.device,
        )
        img_index = torch.repeat_interleave(torch.arange(len(images), device=tok.device, dtype=torch.int32), counts)
        tok = tk.patch_timestep_embedding(
            tok, timesteps, img_index, mlp=self.t_mlp, freq_dim=self.cfg.timestep_freq_dim, backend=self.backend
        )
        return tok, state, img_index

    def run_layers(self, x, positions, mask, cache=None, step=None):
        block = self.attention_block_tokens
        if block == "auto":
            block = 128 if _attention_backend(self.backend, x.device) == "reference" else None
        if block:
            mask = split_attention_blocks(mask, block)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, self.backend, cache, i, step)
        return self.norm(x)

    def assemble(self, input_ids, image_index, patch_tokens):
        """Token embeddings with the patch vectors written at the image positions."""
        x = self.tok_emb(input_ids)
        if patch_tokens is not None and patch_tokens.shape[0]:
            where = torch.nonzero(image_index >= 0).squeeze(1)
            x = x.index_copy(0, where, patch_tokens.to(x.dtype))
        return x

    # -- training forward --------------------------------------------------------------------
    def forward(self, input_ids, positions, image_index, mask, noisy_images, timesteps, label_positions=None):
        """Full packed forward. Returns ``(logits, pred)``: logits at ``label_positions`` (all
        positions when None) and the image head's per-patch prediction ``[P, C*k*k]`` (noise,
        v or clean latent, per ``cfg.prediction_type``) in sequence order."""
        patch_tok, state, _ = self.embed_images(noisy_images, timesteps) if noisy_images else (None, None, None)
        x = self.assemble(input_ids, image_index, patch_tok)
        h = self.run_layers(x, positions, mask)
        hl = h if label_positions is None else h[label_positions]
        logits = self.lm_head(hl)
        pred = None
        if noisy_images:
            where = torch.nonzero(image_index >= 0).squeeze(1)
            pred = self.image.decode(h[where], noisy_images, timesteps, state)
        return logits, pred


class KVCache:
    """Per-layer keys and values of B sequences, padded ``[B, capacity, Hkv, D]``.

    A step serves any subset of the sequences: their cached keys are gathered and packed as
    ``HybridMask.cached`` expects (per sequence: cached keys, then the new ones), the new tokens'
    rotary positions continue each sequence, and ``commit`` appends the new keys."""

    def __init__(self, cfg: ModelConfig, batch: int, device, dtype=torch.float32, capacity: int = 64):
        self.cfg, self.B, self.device, self.dtype = cfg, batch, torch.device(device), dtype
        self.cap = capacity
        self.lens = torch.zeros(batch, dtype=torch.long, device=self.device)
        shape = (batch, capacity, cfg.n_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(cfg.n_layers)]

    def _grow(self, need: int):
        if need <= self.cap:
            return
        cap = max(need, 2 * self.cap)
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                new = t.new_zeros((self.B, cap) + t.shape[2:])
                new[:, : self.cap] = t
                lst[i] = new
        self.cap = cap

    def plan(self, seq_ids: torch.Tensor, query_lens: torch.Tensor, bidirectional: bool, commit: bool):
        """Index bookkeeping for one step (shared by every layer)."""
        seq_ids = seq_ids.to(self.device, torch.long)
        ql = query_lens.to(self.device, torch.long)
        cl = self.lens[seq_ids]
        if commit:
            self._grow(int((cl + ql).max()) if len(cl) else 0)
        s = torch.arange(len(seq_ids), device=self.device)
        key_off = torch.cumsum(cl + ql, 0) - (cl + ql)
        # cached rows: sequence b's j-th key goes to key_off[b] + j
        cb = torch.repeat_interleave(s, cl)
        cj = torch.arange(len(cb), device=self.device) - (torch.cumsum(cl, 0) - cl)[cb]
        # new rows
        qb = torch.repeat_interleave(s, ql)
        qj = torch.arange(len(qb), device=self.device) - (torch.cumsum(ql, 0) - ql)[qb]
        return {
            "seq_ids": seq_ids,
            "query_lens": ql,
            "n_keys": int((cl + ql).sum()),
            "commit": commit,
            "cache_src": (seq_ids[cb], cj),
            "cache_dst": key_off[cb] + cj,
            "new_dst": key_off[qb] + cl[qb] + qj,
            "new_slot": (seq_ids[qb], cl[qb] + qj),
            "positions": cl[qb] + qj,
            "mask": tk.HybridMask.cached(cl.to(torch.int32), ql.to(torch.int32), bidirectional),
        }

    def keys_values(self, layer: int, k_new, v_new, step):
        out = []
        for store, new in ((self.k[layer], k_new), (self.v[layer], v_new)):
            packed = new.new_empty((step["n_keys"],) + new.shape[1:])
            packed[step["cache_dst"]] = store[step["cache_src"]].to(new.dtype)
            packed[step["new_dst"]] = new
            if step["commit"]:
                store[step["new_slot"]] = new.detach().to(store.dtype)
            out.append(packed)
        return out[0], out[1]

    def advance(self, step) -> None:
        if step["commit"]:
            self.lens.index_add_(0, step["seq_ids"], step["query_lens"])
