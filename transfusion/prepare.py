"""``transfusion prepare``: the built-in data set on disk.

Writes ``tokenizer.model`` (SentencePiece trained on the corpus and captions, or a copy of a given
``.model``), ``corpus.txt``, ``digits.safetensors`` (train / held-out images, their latents and
labels) and ``prepare.json`` (the settings, so ``train`` can rebuild the configuration). The folder
is written under a temporary name beside ``out`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from transfusion.checkpoint import atomic_path, save_tensors
from transfusion.config import UserError
from transfusion.data import load_digits_split, text_corpus, tokenizer_training_text
from transfusion.latents import PixelLatents, VAELatents
from transfusion.outdir import check_out, contents, subfolder_with, write_marker
from transfusion.tokenizer import Tokenizer


@dataclass
class Prepared:
    tokenizer: Tokenizer
    corpus: list
    train_latents: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_latents: torch.Tensor
    test_labels: torch.Tensor
    train_images: torch.Tensor
    info: dict


def _encode(latents, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    if isinstance(latents, PixelLatents):
        return images.clone()
    x = images
    if x.shape[1] != latents.in_channels:  # grayscale digits into an RGB autoencoder
        x = x.expand(-1, latents.in_channels, -1, -1)
    return torch.cat([latents.encode(x[i : i + batch]) for i in range(0, len(x), batch)])


def prepare(
    out,
    *,
    image_size: int = 8,
    vocab_size: int = 256,
    tokenizer: str | None = None,
    vae: str | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    made_by: str = "prepare",
) -> Prepared:
    """Write the data set to ``out`` (replacing a non-empty one only with ``overwrite``); the
    arguments are checked (UserError) before anything is written. ``made_by``: the command its
    marker names (``demo`` and ``ablate`` keep their data inside their own output)."""
    out = Path(out)
    if image_size < 1:
        raise UserError(f"--image-size must be >= 1, got {image_size}")
    if not 0.0 < holdout_fraction < 1.0:
        raise UserError(f"--holdout is the fraction of digits held out, in (0, 1); got {holdout_fraction}")
    if vae and not Path(vae).is_dir():
        raise UserError(f"--vae {vae} is not a folder; pass a local folder with a diffusers AutoencoderKL")
    check_out(out, "prepare", overwrite, legacy=lambda d: (d / "prepare.json").is_file() and _only_prepare_files(d))
    if tokenizer:
        tok = _load_tokenizer(tokenizer, "--tokenizer")
    else:
        tok = Tokenizer.train(tokenizer_training_text(seed), vocab_size=vocab_size)
    corpus = text_corpus(seed)
    with atomic_path(out, directory=True) as tmp:
        _write(tmp, tok, corpus, image_size, vae, holdout_fraction, seed, tokenizer)
        write_marker(tmp, made_by)
    return load_prepared(out)


def _write(out: Path, tok, corpus, image_size, vae, holdout_fraction, seed, tokenizer) -> None:
    tok.save(out / "tokenizer.model")
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n")
    data = load_digits_split(holdout_fraction, seed, image_size)
    lat = VAELatents.from_folder(vae) if vae else PixelLatents(1)
    if vae:
        shutil.copytree(vae, out / "vae", dirs_exist_ok=True)
    tensors = {
        "train_images": data.train_images,
        "train_labels": data.train_labels,
        "test_images": data.test_images,
        "test_labels": data.test_labels,
        "train_latents": _encode(lat, data.train_images),
        "test_latents": _encode(lat, data.test_images),
    }
    save_tensors({k: v.contiguous() for k, v in tensors.items()}, out / "digits.safetensors")
    info = {
        "image_size": image_size,
        "latents": "vae" if vae else "pixel",
        "latent_channels": int(tensors["train_latents"].shape[1]),
        "latent_size": list(tensors["train_latents"].shape[2:]),
        "vocab_size": tok.vocab_size,
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "n_train": len(data.train_labels),
        "n_test": len(data.test_labels),
        "corpus_lines": len(corpus),
        "tokenizer": tokenizer or "trained (sentencepiece bpe)",
    }
    (out / "prepare.json").write_text(json.dumps(info, indent=2))


PREPARE_FILES = {"tokenizer.model", "corpus.txt", "digits.safetensors", "prepare.json", "vae"}


def _only_prepare_files(folder: Path) -> bool:
    """A data folder written before the marker existed: nothing but prepare's own files."""
    return {p.name for p in folder.iterdir()} <= PREPARE_FILES


def _load_tokenizer(path, what: str) -> Tokenizer:
    """The SentencePiece model at ``path``; UserError when it is missing or not a model."""
    try:
        return Tokenizer.load(path)
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror or e}; pass a SentencePiece .model file") from e
    except RuntimeError as e:  # sentencepiece reports a bad model file as RuntimeError
        raise UserError(
            f"{what} {path} is not a SentencePiece model; pass a .model file written by "
            "SentencePiece, or leave the option out to train one"
        ) from e


def load_prepared(path) -> Prepared:
    path = Path(path)
    if not (path / "prepare.json").is_file():
        inner = subfolder_with(path, "prepare.json")
        if inner is not None:
            raise FileNotFoundError(f"--data {path} has no prepare.json but {inner} does: pass --data {inner}")
        if path.is_dir() and any(path.iterdir()):  # never suggest writing into another command's folder
            raise FileNotFoundError(
                f"--data {path} has no prepare.json (it holds {contents(path)}): run "
                "`transfusion prepare --out DIR` with a new DIR, then pass --data DIR"
            )
        raise FileNotFoundError(f"--data {path}: no prepare.json; run `transfusion prepare --out {path}` first")
    t = load_file(str(path / "digits.safetensors"))
    info = json.loads((path / "prepare.json").read_text())
    f = path / "tokenizer.model"
    try:
        tok = Tokenizer.load(f)
    except (OSError, RuntimeError) as e:  # missing, or not a SentencePiece model
        raise UserError(f"{f}: not a readable SentencePiece model ({e}); run `transfusion prepare` again") from e
    if tok.vocab_size != info["vocab_size"]:
        raise UserError(
            f"{f} gives {tok.vocab_size} token ids, prepare.json says {info['vocab_size']}: "
            "the file was replaced or damaged; run `transfusion prepare` again"
        )
    return Prepared(
        tokenizer=tok,
        corpus=(path / "corpus.txt").read_text().splitlines(),
        train_latents=t["train_latents"],
        train_labels=t["train_labels"],
        train_images=t["train_images"],
        test_images=t["test_images"],
        test_latents=t["test_latents"],
        test_labels=t["test_labels"],
        info=info,
    )


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` to ``size x size``: area averaging when shrinking (exactly undoes
    a nearest-neighbour upscale by an integer factor), bilinear when growing."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
