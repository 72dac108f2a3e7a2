"""Inference, as in the paper: LM mode with a KV cache, and on BOI, diffusion mode.

Diffusion mode appends n noise patches and denoises them over T steps (DDPM, or DDIM with fewer
steps); every step runs only the image queries against the cached prefix (``HybridMask.cached``
with ``bidirectional=True``; the prefix is never recomputed and nothing is written to the cache).
Classifier-free guidance runs an unconditional copy of each image (context ``[BOS] [BOI]``, as
trained by caption dropout) in the same batch. After the last step the clean image (timestep 0)
is written into the cache, EOI is appended and text generation continues.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


from transfusion.image import patchify, unpatchify
from transfusion.model import KVCache
from transfusion.objective import check_sampler, denoise, sampling_steps


@dataclass
class SampleConfig:
    steps: int = 50  # denoising steps
    sampler: str = "ddim"  # "ddim" or "ddpm" (objective "ddpm"), "euler" (objective "flow")
    eta: float = 0.0  # DDIM noise (0: deterministic)
    cfg_scale: float = 3.0  # classifier-free guidance; 1.0 turns it off
    image_size: tuple[int, int] = (8, 8)  # latent height, width of generated images
    max_new_tokens: int = 32
    max_images: int = 1  # per sequence; BOI is masked once reached
    temperature: float = 0.0  # 0: greedy
    # a discrete model's image codes are sampled at this temperature (0: greedy), guided as above
    image_temperature: float = 1.0
    seed: int = 0
    clip_sample: bool = False  # clip the predicted clean image to [-1, 1] (pixel latents)
    bf16: bool | None = None  # bf16 autocast for the transformer (None: on CUDA only)

    def __post_init__(self):
        if self.sampler not in ("ddim", "ddpm", "euler"):
            raise ValueError(f"sampler must be 'ddim', 'ddpm' or 'euler', got {self.sampler!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.image_size = tuple(self.image_size)


def _text_step(model, cache, seq_ids, tokens):
    """Feed one or more tokens per sequence (list of lists); logits at each one's last token."""
    dev = cache.device
    ql = torch.tensor([len(t) for t in tokens], device=dev)
    step = cache.plan(torch.as_tensor(seq_ids, device=dev), ql, bidirectional=False, commit=True)
    x = model.tok_emb(torch.tensor([i for t in tokens for i in t], device=dev))
    h = model.run_layers(x, step["positions"], step["mask"], cache, step)
    cache.advance(step)
    return model.lm_head(h[torch.cumsum(ql, 0) - 1]).float()


def _image_step(model, cache, seq_ids, images, timesteps, commit):
    """Image queries (all of one shape ``[S, C, H, W]``) against each sequence's cache."""
    dev = cache.device
    k = model.cfg.patch_size
    n = (images.shape[2] // k) * (images.shape[3] // k)
    imgs = list(images)
    tok, state, _ = model.embed_images(imgs, timesteps)
    step = cache.plan(
        torch.as_tensor(seq_ids, device=dev),
        torch.full((len(imgs),), n, device=dev),
        bidirectional=model.cfg.bidirectional_images,
        commit=commit,
    )
    h = model.run_layers(tok, step["positions"], step["mask"], cache, step)
    cache.advance(step)
    return model.image.decode(h, imgs, timesteps, state)


@torch.no_grad()
def generate(
    model, tokenizer, prompts, cfg: SampleConfig | None = None, open_image: bool = False, progress: bool = False
):
    """Generate a continuation for each prompt.

    A prompt is a string or a list of segments: strings and clean image latents ``[C, H, W]``.
    ``open_image=True`` ends every prompt with BOI, so generation starts with an image.
    Returns, per prompt, ``{"segments": [("text", str) | ("image", latent)], "text": str,
    "images": [latents], "tokens": [ids]}`` for the generated part only.
    ``progress``: tqdm bars on stderr, one over the generated images (a batch of sequences is
    denoised together) and one over the diffusion steps of each batch.
    """
    cfg = cfg or SampleConfig()
    dev = next(model.parameters()).device
    bf16 = cfg.bf16 if cfg.bf16 is not None else dev.type == "cuda"
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        return _generate(model, tokenizer, prompts, cfg, open_image, dev, progress)


def _generate(model, tokenizer, prompts, cfg, open_image, dev, progress):
    mc = model.cfg
    if (cfg.max_images > 0 or open_image) and not mc.discrete_images:
        check_sampler(mc, cfg.sampler)
    dtype = next(model.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    sched = model.schedule()
    B = len(prompts)
    if B == 0:
        return []
    docs = [[p] if isinstance(p, (str, torch.Tensor)) else list(p) for p in prompts]
    guided = cfg.cfg_scale != 1.0
    cache = KVCache(mc, 2 * B if guided else B, dev, dtype, capacity=64)

    # prefill: segment by segment (sequences are independent, so group by segment kind)
    chunks = []
    for d in docs:
        seq, text = [], [tokenizer.bos_id]
        for seg in d:
            if isinstance(seg, str):
                text += tokenizer.encode(seg)
            elif isinstance(seg, torch.Tensor):
                if seg.dim() != 3 or seg.shape[0] != mc.latent_channels:
                    raise ValueError(
                        f"prompt images must be [C={mc.latent_channels}, H, W] latents, got {tuple(seg.shape)}"
                    )
                if mc.discrete_images:  # the image's codes, read as tokens
                    text += [tokenizer.boi_id, *model.image_tokens(seg[None].to(dev))[0].tolist(), tokenizer.eoi_id]
                    continue
                seq.append(text + [tokenizer.boi_id])
                seq.append(seg)
                text = [tokenizer.eoi_id]
            else:
                raise TypeError(f"prompt segments must be str or tensors, got {type(seg)}")
        if open_image:
            text = text + [tokenizer.boi_id]
        seq.append(text)
        chunks.append(seq)
    logits = torch.zeros(B, mc.vocab_size, device=dev)
    for j in range(max(len(c) for c in chunks)):
        tb = [b for b in range(B) if j < len(chunks[b]) and isinstance(chunks[b][j], list)]
        ib = [b for b in range(B) if j < len(chunks[b]) and isinstance(chunks[b][j], torch.Tensor)]
        if tb:
            out = _text_step(model, cache, tb, [chunks[b][j] for b in tb])
            logits[tb] = out
        for shape in {tuple(chunks[b][j].shape) for b in ib}:
            sb = [b for b in ib if tuple(chunks[b][j].shape) == shape]
            imgs = torch.stack([chunks[b][j] for b in sb]).to(dev, dtype)
            _image_step(model, cache, sb, imgs, torch.zeros(len(sb), dtype=torch.long, device=dev), commit=True)
    uncond = None
    if guided:  # unconditional contexts for guidance: [BOS] [BOI]
        uncond = _text_step(model, cache, list(range(B, 2 * B)), [[tokenizer.bos_id, tokenizer.boi_id]] * B)

    last = [c[-1][-1] for c in chunks]
    done = [False] * B
    n_tok = [0] * B
    n_img = [0] * B
    segs = [[] for _ in range(B)]
    toks = [[] for _ in range(B)]
    # (a discrete model's image codes too: they are written only between BOI and EOI)
    banned = torch.tensor(
        [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eoi_id, *range(mc.text_vocab_size, mc.vocab_size)], device=dev
    )
    bar = tqdm(
        total=B * cfg.max_images,
        desc="images",
        unit="image",
        disable=not progress or cfg.max_images == 0,
        dynamic_ncols=True,
    )
    while not all(done):
        need = [b for b in range(B) if not done[b] and last[b] == tokenizer.boi_id]
        if need:
            if mc.discrete_images:
                imgs, codes = _sample_codes(model, cache, need, uncond, logits[need], cfg, g, dev)
            else:
                imgs = _diffuse(model, cache, need, B if guided else None, cfg, sched, g, dev, dtype, progress)
                codes = [[] for _ in need]
            bar.update(len(need))
            for b, x, c in zip(need, imgs, codes):
                segs[b].append(("image", x.float().cpu()))
                n_img[b] += 1
                toks[b] += c
                toks[b].append(tokenizer.eoi_id)
                last[b] = tokenizer.eoi_id
            out = _text_step(model, cache, need, [[tokenizer.eoi_id]] * len(need))
            logits[need] = out
        act = [b for b in range(B) if not done[b]]
        feed = []
        for b in act:
            if n_tok[b] >= cfg.max_new_tokens:  # checked here so that a final BOI still gets its image
                done[b] = True
                continue
            lg = logits[b].clone()
            lg[banned] = float("-inf")
            if n_img[b] >= cfg.max_images:
                lg[tokenizer.boi_id] = float("-inf")
            if cfg.temperature > 0:
                p = torch.softmax(lg.float().cpu() / cfg.temperature, -1)
                t = int(torch.multinomial(p, 1, generator=g))
            else:
                t = int(lg.argmax())
            n_tok[b] += 1
            toks[b].append(t)
            last[b] = t
            if t == tokenizer.eos_id:
                done[b] = True
                continue
            if t != tokenizer.boi_id:
                if segs[b] and segs[b][-1][0] == "text_ids":
                    segs[b][-1][1].append(t)
                else:
                    segs[b].append(("text_ids", [t]))
            feed.append(b)
        if feed:
            logits[feed] = _text_step(model, cache, feed, [[last[b]] for b in feed])
    bar.close()

    results = []
    for b in range(B):
        out_segs = [("text", tokenizer.decode(v)) if kind == "text_ids" else (kind, v) for kind, v in segs[b]]
        results.append(
            {
                "segments": out_segs,
                "text": " ".join(v for kind, v in out_segs if kind == "text").strip(),
                "images": [v for kind, v in out_segs if kind == "image"],
                "tokens": toks[b],
            }
        )
    return results


def _diffuse(model, cache, seq_ids, uncond_offset, cfg: SampleConfig, sched, g, dev, dtype, progress):
    """Denoise one image per sequence in ``seq_ids`` (whose caches end with BOI); write the clean
    image into their caches and return it (``[S, C, H, W]``)."""
    mc = model.cfg
    k = mc.patch_size
    S = len(seq_ids)
    H, W = cfg.image_size
    if H % k or W % k:
        raise ValueError(f"image_size {cfg.image_size} must be divisible by patch_size={k}")
    x = torch.randn((S, mc.latent_channels, H, W), generator=g).to(dev, dtype)
    ids = list(seq_ids)
    if uncond_offset is not None:
        ids = ids + [uncond_offset + b for b in seq_ids]
    for model_t, t, t_next in tqdm(
        sampling_steps(mc, cfg.steps),
        desc="denoise",
        unit="step",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    ):
        inp = torch.cat([x, x]) if uncond_offset is not None else x
        ts = torch.full((inp.shape[0],), model_t, device=dev)
        pred = _image_step(model, cache, ids, inp, ts, commit=False).float()
        pred, uncond = pred.chunk(2) if uncond_offset is not None else (pred, None)
        rows = denoise(
            mc,
            cfg,
            sched,
            patchify(x.float(), k),
            pred,
            uncond,
            t,
            t_next,
            seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)),
            backend=model.backend,
        )
        x = unpatchify(rows, S, mc.latent_channels, H, W, k).to(dtype)
    _image_step(model, cache, seq_ids, x, torch.zeros(S, dtype=torch.long, device=dev), commit=True)
    return x


def _sample_codes(model, cache, seq_ids, uncond, logits, cfg: SampleConfig, g, dev):
    """A discrete model's images, one per sequence in ``seq_ids`` (whose caches end with BOI):
    the codes of the patch grid one by one, each drawn at ``cfg.image_temperature`` from the
    code logits, guided as the continuous recipe is (``uncond``: the logits after ``[BOS] [BOI]``
    of the unconditional copies, rows ``B..2B``, or None without guidance), and written into the
    caches. Returns the decoded latents ``[S, C, H, W]`` and each image's token ids."""
    mc = model.cfg
    k, base = mc.patch_size, mc.text_vocab_size
    H, W = cfg.image_size
    if H % k or W % k:
        raise ValueError(f"image_size {cfg.image_size} must be divisible by patch_size={k}")
    ids = list(seq_ids)
    if uncond is not None:
        u_ids = [len(uncond) + b for b in seq_ids]
        cache.lens[u_ids] = 2  # each image's unconditional context is [BOS] [BOI] again
        ids += u_ids
        u = uncond[seq_ids]
    picked = []
    for _ in range((H // k) * (W // k)):
        lg = logits[:, base:].float()
        if uncond is not None:
            lg = u[:, base:] + cfg.cfg_scale * (lg - u[:, base:])
        if cfg.image_temperature > 0:
            p = torch.softmax(lg.cpu() / cfg.image_temperature, -1)
            code = torch.multinomial(p, 1, generator=g)[:, 0]
        else:
            code = lg.argmax(-1).cpu()
        picked.append(code)
        toks = (code + base).tolist()
        out = _text_step(model, cache, ids, [[t] for t in toks + (toks if uncond is not None else [])])
        logits, u = out.chunk(2) if uncond is not None else (out, None)
    tokens = torch.stack(picked, 1) + base
    return model.token_images(tokens, (mc.latent_channels, H, W)).to(dev), tokens.tolist()


@torch.no_grad()
def caption(
    model, tokenizer, latents, cfg: SampleConfig | None = None, batch_size: int = 256, progress: bool = False
) -> list[str]:
    """One caption per clean latent image ``[N, C, H, W]`` (greedy unless cfg says otherwise);
    ``progress``: a tqdm bar on stderr over the images, advanced per batch of ``batch_size``."""
    cfg = cfg or SampleConfig(max_images=0)
    out = []
    with tqdm(total=len(latents), desc="caption", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(latents), batch_size):
            res = generate(
                model,
                tokenizer,
                [[x] for x in latents[i : i + batch_size]],
                SampleConfig(**{**cfg.__dict__, "max_images": 0, "cfg_scale": 1.0}),
            )
            out += [r["text"] for r in res]
            bar.update(len(res))
    return out
