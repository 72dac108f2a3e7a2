"""Checkpoints: a directory with safetensors weights, a JSON config and the tokenizer.

::

    config.json              Config (model, data, train) + format version
    model.safetensors        model weights
    ema.safetensors          EMA weights (when training keeps an EMA)
    tokenizer.model          SentencePiece model (special tokens are derived from it)
    optimizer.safetensors    optimizer tensors and RNG states      } only in training
    trainer_state.json       step, data-iterator, scheduler state  } checkpoints
    vae/                     the AutoencoderKL (when latents are not pixels)

The whole directory is written under a temporary name and renamed into place, so a reader never
sees a half-written checkpoint (an exception or Ctrl-C removes the temporary directory; a killed
process leaves the previous checkpoint, and a ``*.tmp-*`` directory). ``config.json`` also records
the tokenizer's size, special ids and SHA-256, checked on load: a replaced or damaged
``tokenizer.model`` is refused before the model is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def save_tensors(tensors: dict, path) -> None:
    """``safetensors`` file with the permissions of any other new file (safetensors creates 0600)."""
    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path, *, directory: bool = False):
    """Yield a temporary path to write ``path``'s content to; on success it takes ``path``'s
    place, on any exception (Ctrl-C included) it is removed and ``path`` is left as it was.

    A file, or a directory that does not exist yet, is written beside ``path`` (hidden, same
    folder) and renamed into place atomically. An existing directory (empty, or one the user
    allowed to be overwritten) keeps its own inode, so a shell standing in it stays there: the
    temporary directory is made inside it, and when complete the old entries are removed and the
    new ones renamed in."""
    path = Path(os.path.abspath(path))
    in_place = directory and path.is_dir()
    tmp = path / f".tmp-{os.getpid()}" if in_place else path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if in_place:
            for old in path.iterdir():
                if old != tmp:
                    _remove(old)
            for new in tmp.iterdir():
                os.replace(new, path / new.name)
            tmp.rmdir()
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def tokenizer_record(tokenizer) -> dict:
    """What a checkpoint's config.json records of its tokenizer (checked by ``load_checkpoint``)."""
    return {
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "boi_id": tokenizer.boi_id,
        "eoi_id": tokenizer.eoi_id,
        "sha256": hashlib.sha256(tokenizer.model_proto).hexdigest(),
    }


def check_tokenizer(path, tokenizer, model_vocab_size: int, record: dict | None) -> None:
    """ValueError when ``tokenizer`` is not the one the checkpoint at ``path`` was saved with: its
    size against the model's embedding, then its special ids and bytes against ``record``
    (checkpoints written before the record existed have only the first check)."""
    f = Path(path) / "tokenizer.model"
    fix = "copy back the tokenizer.model this checkpoint was saved with"
    if tokenizer.vocab_size != model_vocab_size:
        raise ValueError(
            f"{f} gives {tokenizer.vocab_size} token ids but the model was trained with "
            f"{model_vocab_size} (config.json model.vocab_size, less its model.image_codes): the file was "
            f"replaced or damaged; {fix}"
        )
    if record is None:
        return
    got = tokenizer_record(tokenizer)
    diff = [f"{k} {got[k]} (file) vs {v} (config.json)" for k, v in record.items() if k != "sha256" and got.get(k) != v]
    if diff:
        raise ValueError(f"{f}: special tokens differ from the checkpoint's ({', '.join(diff)}); {fix}")
    if got["sha256"] != record.get("sha256"):
        raise ValueError(f"{f} is not the tokenizer this checkpoint was saved with (its SHA-256 differs); {fix}")


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def optimizer_to_flat(opt_state: dict):
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON metadata."""
    tensors, meta = {}, {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, st in opt_state["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().cpu()
                meta["state"][str(idx)][k] = "__tensor__"
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def optimizer_from_flat(tensors: dict, meta: dict) -> dict:
    state = {}
    for idx, st in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"state.{idx}.{k}"] if v == "__tensor__" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path, *, model, config, tokenizer, ema: dict | None = None, trainer: dict | None = None, latents=None
) -> Path:
    """Write a checkpoint directory atomically. ``trainer`` (optional) holds
    ``{"optimizer": state_dict, "scheduler": state_dict, "step": int, "data": dict, "rng": dict, ...}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_checkpoint(
            tmp, model=model, config=config, tokenizer=tokenizer, ema=ema, trainer=trainer, latents=latents
        )
    except BaseException:  # an error or Ctrl-C: no half-written directory stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # swap into place: old -> .old, tmp -> path, drop .old
    old = path.parent / f"{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    for stale in path.parent.glob(f"{path.name}.old-*"):  # also those of a save that died midway
        shutil.rmtree(stale)
    return path


def _write_checkpoint(tmp: Path, *, model, config, tokenizer, ema, trainer, latents) -> None:
    cfg = config.to_dict()
    cfg["format_version"] = FORMAT_VERSION
    cfg["tokenizer"] = tokenizer_record(tokenizer)
    _write_json(tmp / "config.json", cfg)
    save_tensors(_contiguous(model.state_dict()), tmp / "model.safetensors")
    if ema is not None:
        save_tensors(_contiguous(ema), tmp / "ema.safetensors")
    tokenizer.save(tmp / "tokenizer.model")
    if latents is not None and getattr(latents, "kind", "pixel") == "vae":
        latents.save(tmp / "vae")
    if trainer is not None:
        tensors, meta = optimizer_to_flat(trainer["optimizer"])
        for name, t in trainer.get("rng", {}).items():
            tensors[f"rng.{name}"] = t.contiguous().cpu()
        save_tensors(tensors, tmp / "optimizer.safetensors")
        state = {k: v for k, v in trainer.items() if k not in ("optimizer", "rng")}
        state["optimizer_meta"] = meta
        _write_json(tmp / "trainer_state.json", state)


def _resolve(path) -> Path:
    """The checkpoint at ``path``; if a save died between its two renames, the previous one
    (still under its ``.old-<pid>`` name)."""
    path = Path(path)
    if not path.exists():
        olds = sorted(path.parent.glob(f"{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            return olds[-1]
    return path


def _load_tensors(f: Path) -> dict:
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{f}: not a safetensors file ({e}); pickled checkpoints are never loaded") from e


def read_config(path, with_tokenizer: bool = False):
    """The checkpoint's Config (and, with ``with_tokenizer``, its tokenizer record or None)."""
    from transfusion.config import Config

    path = _resolve(path)
    d = json.loads((path / "config.json").read_text())
    version = d.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version}, this version reads {FORMAT_VERSION}")
    record = d.pop("tokenizer", None)
    cfg = Config.from_dict(d, strict=True)
    return (cfg, record) if with_tokenizer else cfg


def model_config_differences(path, model_cfg) -> list[str]:
    """The model fields in which checkpoint ``path`` differs from ``model_cfg``, as ``"name: saved
    (checkpoint) vs new"``; empty when the weights fit."""
    saved = read_config(path).model.__dict__
    return [f"{k}: {saved[k]!r} (checkpoint) vs {v!r}" for k, v in model_cfg.__dict__.items() if saved[k] != v]


def load_checkpoint(path, device="cpu", backend: str | None = None, use_ema: bool = True):
    """Model (EMA weights when present and ``use_ema``), config and tokenizer of a checkpoint."""
    from transfusion.model import TransfusionModel
    from transfusion.tokenizer import Tokenizer

    path = _resolve(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    cfg, record = read_config(path, with_tokenizer=True)
    try:
        tok = Tokenizer.load(path / "tokenizer.model")
    except RuntimeError as e:  # sentencepiece's error for a file that is not a model
        raise ValueError(f"{path / 'tokenizer.model'}: not a SentencePiece model ({e})") from e
    check_tokenizer(path, tok, cfg.model.text_vocab_size, record)
    model = TransfusionModel(cfg.model, backend=backend)
    weights = path / ("ema.safetensors" if use_ema and (path / "ema.safetensors").is_file() else "model.safetensors")
    model.load_state_dict(_load_tensors(weights))
    return model.to(device).eval(), cfg, tok


def load_trainer_state(path):
    """``(trainer_state_json, optimizer_state_dict, rng_tensors, ema_or_None)`` of a training checkpoint."""
    path = _resolve(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} has no trainer state (not a training checkpoint)")
    state = json.loads((path / "trainer_state.json").read_text())
    tensors = _load_tensors(path / "optimizer.safetensors")
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    opt = optimizer_from_flat({k: v for k, v in tensors.items() if k.startswith("state.")}, state.pop("optimizer_meta"))
    ema = _load_tensors(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    return state, opt, rng, ema
