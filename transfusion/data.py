"""Built-in data (handwritten digits, captions, a small arithmetic corpus) and the packed
mixed-modality batch builder.

A document is a list of segments: text (token ids) or images (latent tensors ``[C, H, W]``). The
builder packs documents into one token stream as the kernels expect (FlashAttention varlen
layout): ``[BOS] text [BOI] patches [EOI] text ... [EOS]`` per document, positions restarting at
each document, ``cu_seqlens`` and absolute ``image_spans`` over the patch tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

CAPTION_TEMPLATES = [
    "a handwritten {word}",
    "the digit {num}, written by hand",
    "a picture of the number {word}",
    "handwritten digit {word}",
    "an image of the digit {num}",
    "{word}",
    "the number {num}",
    "a drawing of a {word}",
    "a {num} written by hand",
    "a small picture of a handwritten {word}",
]


def number_word(n: int) -> str:
    if not 0 <= n < 100:
        raise ValueError(f"number_word covers 0..99, got {n}")
    if n < 10:
        return WORDS[n]
    if n < 20:
        return TEENS[n - 10]
    t, u = divmod(n, 10)
    return TENS[t] if u == 0 else f"{TENS[t]} {WORDS[u]}"


def caption_for(digit: int, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(word=WORDS[digit], num=digit)


def parse_digit(text: str) -> int | None:
    """The first digit a caption names (as a word or a numeral), or None."""
    for tok in text.lower().replace(",", " ").replace(".", " ").split():
        if tok in WORDS:
            return WORDS.index(tok)
        if len(tok) == 1 and tok.isdigit():
            return int(tok)
    return None


def text_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Generated sentences about numbers: counting, arithmetic, successor facts."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        kind = rng.randrange(6)
        a, b = rng.randrange(10), rng.randrange(10)
        if kind == 0:
            lines.append(f"{number_word(a)} plus {number_word(b)} is {number_word(a + b)}")
        elif kind == 1:
            lines.append(f"{a} + {b} = {a + b}")
        elif kind == 2:
            lines.append(f"{number_word(a)} times {number_word(b)} is {number_word(a * b)}")
        elif kind == 3:
            hi, lo = max(a, b), min(a, b)
            lines.append(f"{number_word(hi)} minus {number_word(lo)} is {number_word(hi - lo)}")
        elif kind == 4:
            start = rng.randrange(8)
            k = rng.randrange(3, 10 - start + 1) if start <= 7 else 2
            lines.append(" ".join(WORDS[start : start + k]))
        else:
            lines.append(f"the number after {number_word(a)} is {number_word(a + 1)}")
    return lines


def tokenizer_training_text(seed: int = 0, n: int = 4000) -> list[str]:
    """Everything the built-in tokenizer must cover: the corpus and every caption form."""
    lines = text_corpus(seed, n)
    for d in range(10):
        for t in CAPTION_TEMPLATES:
            lines.append(t.format(word=WORDS[d], num=d))
    return lines


# -- digits ----------------------------------------------------------------------------------


@dataclass
class DigitsData:
    train_images: torch.Tensor  # [n, 1, S, S] in [-1, 1]
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits_split(holdout_fraction: float = 0.2, seed: int = 0, image_size: int = 8) -> DigitsData:
    """scikit-learn's 8x8 handwritten digits, scaled to [-1, 1], split into train and held-out
    parts (stratified, fixed by ``seed``); ``image_size`` != 8 resizes bilinearly."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=holdout_fraction, random_state=seed, stratify=d.target)
    tr, te = torch.as_tensor(np.sort(tr)), torch.as_tensor(np.sort(te))
    return DigitsData(x[tr], y[tr], x[te], y[te])


def to_pixels8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] ``[n, 1, S, S]`` -> the 0..16 8x8 scale of the digits data (flattened),
    for a classifier fitted on the original digits."""
    x = images.float()
    if x.shape[-1] != 8 or x.shape[-2] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return ((x.clamp(-1, 1) + 1.0) * 8.0).reshape(len(x), -1).numpy()


# -- packing ---------------------------------------------------------------------------------


@dataclass
class Image:
    latent: torch.Tensor  # [C, H, W]
    max_timestep: int | None = None  # cap on the training timestep (image-first pairs: 500)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # long [N]; PAD at patch positions
    labels: torch.Tensor  # long [N]; next text token, IGNORE elsewhere
    positions: torch.Tensor  # long [N]; restart at 0 in each document
    image_index: torch.Tensor  # int32 [N]; image number of a patch token, -1 for text
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    image_spans: torch.Tensor  # int32 [M, 2]
    images: list = field(default_factory=list)  # M clean latents [C, H, W]
    timesteps: torch.Tensor | None = None  # long [M]
    noise_seed: int = 0

    def to(self, device) -> "PackedBatch":
        mv = lambda t: None if t is None else t.to(device)
        return PackedBatch(
            mv(self.input_ids),
            mv(self.labels),
            mv(self.positions),
            mv(self.image_index),
            mv(self.cu_seqlens),
            mv(self.image_spans),
            [mv(x) for x in self.images],
            mv(self.timesteps),
            self.noise_seed,
        )

    def mask(self, bidirectional_images: bool = True):
        """The attention mask: causal per document, plus (by default) bidirectional inside each image."""
        import transfusion_kernels as tk

        spans = self.image_spans if bidirectional_images else self.image_spans[:0]
        return tk.HybridMask.from_spans(self.cu_seqlens, spans)


def pack_documents(
    docs, tokenizer, patch_size: int, num_train_timesteps: int = 1000, generator: torch.Generator | None = None
) -> PackedBatch:
    """Pack documents (lists of ``list[int]`` text segments and ``Image`` segments) into one
    batch. Each image gets a training timestep drawn uniformly from [0, cap] (cap = its
    ``max_timestep`` or ``num_train_timesteps - 1``)."""
    if not docs:
        raise ValueError("pack_documents needs at least one document")
    ids, is_text, img_idx, pos, cu, spans, images, caps = [], [], [], [], [0], [], [], []
    for d, doc in enumerate(docs):
        start = len(ids)
        seq = [("t", tokenizer.bos_id)]
        for seg in doc:
            if isinstance(seg, Image):
                c, h, w = seg.latent.shape
                if h % patch_size or w % patch_size:
                    raise ValueError(
                        f"image of size {h}x{w} in document {d} is not divisible by patch_size={patch_size}"
                    )
                seq.append(("t", tokenizer.boi_id))
                seq.append(("i", (seg, (h // patch_size) * (w // patch_size))))
                seq.append(("t", tokenizer.eoi_id))
            elif isinstance(seg, (list, tuple)):
                seq.extend(("t", int(t)) for t in seg)
            else:
                raise TypeError(f"document {d}: segments must be token lists or Image, got {type(seg)}")
        seq.append(("t", tokenizer.eos_id))
        for kind, val in seq:
            if kind == "t":
                ids.append(val)
                is_text.append(True)
                img_idx.append(-1)
            else:
                seg, n = val
                m = len(images)
                spans.append((len(ids), len(ids) + n))
                images.append(seg.latent)
                cap = (
                    num_train_timesteps - 1
                    if seg.max_timestep is None
                    else min(seg.max_timestep, num_train_timesteps - 1)
                )
                caps.append(cap)
                ids.extend([tokenizer.pad_id] * n)
                is_text.extend([False] * n)
                img_idx.extend([m] * n)
        pos.extend(range(len(ids) - start))
        cu.append(len(ids))

    input_ids = torch.tensor(ids, dtype=torch.long)
    text = torch.tensor(is_text)
    labels = torch.full_like(input_ids, IGNORE)
    # position i predicts token i+1 when both are text in the same document
    same_doc = torch.ones(len(ids), dtype=torch.bool)
    same_doc[torch.tensor(cu[1:]) - 1] = False
    nxt = torch.zeros_like(text)
    nxt[:-1] = text[1:]
    ok = text & nxt & same_doc
    labels[:-1][ok[:-1]] = input_ids[1:][ok[:-1]]

    caps_t = torch.tensor(caps, dtype=torch.long)
    if len(caps):
        u = torch.rand(len(caps), generator=generator)
        timesteps = torch.minimum((u * (caps_t + 1)).long(), caps_t)
    else:
        timesteps = torch.zeros(0, dtype=torch.long)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        positions=torch.tensor(pos, dtype=torch.long),
        image_index=torch.tensor(img_idx, dtype=torch.int32),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        image_spans=torch.tensor(spans, dtype=torch.int32).reshape(-1, 2),
        images=images,
        timesteps=timesteps,
        noise_seed=seed,
    )


class MixedBatches:
    """Deterministic stream of packed mixed-modality batches.

    Batch ``step`` depends only on ``(seed, step)``, so the iterator state is a single integer and
    a resumed run sees exactly the batches it would have seen.
    Document mix: ``text_fraction`` text-only documents; the rest image-caption pairs, of which
    ``image_first_fraction`` put the image first (timestep capped at ``image_first_max_timestep``)
    and the others put the caption first, dropping it with probability ``caption_dropout``.
    ``image_tokens`` (the discrete image recipe): each image's token ids ``[n_images, n]``; an
    image is then the text segment ``[BOI] tokens [EOI]`` (same documents, same order; no
    timesteps, so the noise cap has no effect).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        corpus: list[str],
        tokenizer,
        data_cfg,
        patch_size: int,
        num_train_timesteps: int = 1000,
        image_tokens: torch.Tensor | None = None,
    ):
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
        if image_tokens is not None and len(image_tokens) != len(images):
            raise ValueError(f"image_tokens ({len(image_tokens)}) and images ({len(images)}) differ in length")
        self.image_tokens = (
            None
            if image_tokens is None
            else [[tokenizer.boi_id, *map(int, t), tokenizer.eoi_id] for t in image_tokens.tolist()]
        )
        self.images, self.labels = images, labels
        self.tokenizer, self.cfg = tokenizer, data_cfg
        self.patch_size, self.T = patch_size, num_train_timesteps
        self.corpus_ids = [tokenizer.encode(t) for t in corpus]
        # every caption pre-tokenised: (digit, template) -> ids
        self.caption_ids = {
            (d, j): tokenizer.encode(t.format(word=WORDS[d], num=d))
            for d in range(10)
            for j, t in enumerate(CAPTION_TEMPLATES)
        }
        self.step = 0

    def documents(self, step: int):
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + step)
        docs = []
        for _ in range(cfg.docs_per_batch):
            if rng.random() < cfg.text_fraction or len(self.images) == 0:
                n = rng.choice((1, 1, 2, 3))
                ids = []
                for k in range(n):
                    ids += self.corpus_ids[rng.randrange(len(self.corpus_ids))]
                docs.append([ids])
                continue
            i = rng.randrange(len(self.images))
            digit = int(self.labels[i])
            cap = self.caption_ids[(digit, rng.randrange(len(CAPTION_TEMPLATES)))]
            if rng.random() < cfg.image_first_fraction:
                docs.append([self._image(i, cfg.image_first_max_timestep), list(cap)])
            elif rng.random() < cfg.caption_dropout:
                docs.append([self._image(i)])
            else:
                docs.append([list(cap), self._image(i)])
        return docs

    def _image(self, i: int, max_timestep: int | None = None):
        if self.image_tokens is not None:
            return list(self.image_tokens[i])
        return Image(self.images[i], max_timestep)

    def batch(self, step: int) -> PackedBatch:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        return pack_documents(self.documents(step), self.tokenizer, self.patch_size, self.T, g)

    def __iter__(self):
        return self

    def __next__(self) -> PackedBatch:
        b = self.batch(self.step)
        self.step += 1
        return b

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
