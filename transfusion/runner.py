"""Building a run: its Config from prepared data and command-line overrides, and the model,
batch stream and Trainer of a run folder. Used by the command line, the demo and distributed
training."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from transfusion.checkpoint import model_config_differences
from transfusion.config import (
    Config,
    DataConfig,
    ModelConfig,
    SampleDefaults,
    TrainConfig,
    UserError,
    demo_config,
    paper_config,
)
from transfusion.data import MixedBatches
from transfusion.model import TransfusionModel
from transfusion.objective import check_sampler
from transfusion.outdir import write_marker, written_by
from transfusion.train import Trainer


def read_config_file(path) -> Config:
    """The Config in JSON file ``path``; UserError naming the file (and the line, or the field)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read --config {path}: {e.strerror or e}; pass a JSON config file") from e
    try:
        return Config.from_json(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except ValueError as e:
        raise UserError(f"{path}: {e}; fix the config file") from e


DEFAULT_CODEBOOK = 256  # codes of the discrete image recipe when neither --codebook-size nor --config says


def build_config(info: dict, args):
    """The run's Config: the base (``--config`` or preset) with the data's settings and the
    command-line overrides; UserError when a value is out of range or does not fit the data."""
    if args.config:
        base = read_config_file(args.config)
    elif args.preset == "demo":
        base = demo_config(info["vocab_size"])
    elif args.preset == "paper":
        base = paper_config(info["vocab_size"])
    else:
        base = Config()
    m, d, t = base.model.__dict__.copy(), base.data.__dict__.copy(), base.train.__dict__.copy()
    m.update(vocab_size=info["vocab_size"], latent_channels=info["latent_channels"])
    d.update(
        image_size=info["image_size"],
        holdout_fraction=info["holdout_fraction"],
        latents="pixel" if info["latents"] == "pixel" else "vae",
    )
    for key, dest in (
        ("dim", m),
        ("layers", m),
        ("heads", m),
        ("patch_size", m),
        ("image_encoder", m),
        ("docs_per_batch", d),
        ("steps", t),
        ("lr", t),
        ("seed", t),
        ("ema_decay", t),
        ("diffusion_weight", t),
        ("warmup_steps", t),
        ("save_every", t),
        ("objective", m),
    ):
        v = getattr(args, key, None)
        if v is not None:
            dest[{"layers": "n_layers", "heads": "n_heads"}.get(key, key)] = v
    if getattr(args, "image_recipe", None) is not None:
        m["image_recipe"] = args.image_recipe
    if m["image_recipe"] == "discrete":
        m["image_codes"] = getattr(args, "codebook_size", None) or m["image_codes"] or DEFAULT_CODEBOOK
        m["vocab_size"] += m["image_codes"]  # the codes follow the text vocabulary
    else:
        m["image_codes"] = 0
    if getattr(args, "heads", None) is not None and base.model.n_kv_heads == base.model.n_heads:
        m["n_kv_heads"] = None  # no GQA in the base config: follow the new head count
    if args.backend:
        t["backend"] = args.backend
    try:
        sample = base.sample
        if m["objective"] != base.model.objective:  # --objective: the base's sampler was for the other one
            sample = SampleDefaults(sampler=None, steps=sample.steps)
        cfg = Config(model=ModelConfig(**m), data=DataConfig(**d), train=TrainConfig(**t), sample=sample)
    except ValueError as e:
        raise UserError(f"{e}; change the option or the config") from e
    if cfg.sample.sampler is not None:
        try:
            check_sampler(cfg.model, cfg.sample.sampler, "sample.sampler")
        except ValueError as e:
            raise UserError(f"{e} (or null: the objective's own)") from e
    k = cfg.model.patch_size
    if any(s % k for s in info["latent_size"]):
        raise UserError(
            f"patch size {k} does not divide the {'x'.join(map(str, info['latent_size']))} latent images; "
            f"choose a --patch-size that divides {info['latent_size'][0]}"
        )
    return cfg


def warmup_warning(cfg, fix: str | None = None) -> str | None:
    """The warning for a run shorter than its learning-rate warmup (it never reaches the peak)."""
    t = cfg.train
    if t.steps >= t.warmup_steps:
        return None
    fix = fix or f"pass --warmup-steps {max(1, t.steps // 10)} or more --steps"
    return (
        f"warning: {t.steps} step{'s' * (t.steps != 1)} is less than the {t.warmup_steps} warmup steps, so the learning rate never "
        f"reaches its peak {t.lr:g} (it ends at {t.lr * t.steps / t.warmup_steps:.3g}); {fix}"
    )


def build_trainer(prepared, cfg, out, *, device, resume: bool = False, latents=None):
    """Model, batch stream and Trainer for a run folder ``out`` (``metrics.jsonl``, ``checkpoint/``);
    resumes from ``out/checkpoint`` when asked and present (UserError, before anything is built,
    when its model config differs from ``cfg``'s)."""
    out = Path(out)
    ckpt = out / "checkpoint"
    if resume and (ckpt / "trainer_state.json").is_file():
        try:
            diff = model_config_differences(ckpt, cfg.model)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot resume {ckpt}: {e}; pass a new --out, or leave --resume out") from e
        if diff:
            raise UserError(
                f"cannot resume {ckpt}: its model differs ({'; '.join(diff)}); "
                "pass the options it was trained with, or a new --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    if written_by(out) is None:
        write_marker(out, "train")
    torch.manual_seed(cfg.train.seed)
    model = TransfusionModel(cfg.model, backend=cfg.train.backend).to(device)
    image_tokens = None
    if cfg.model.discrete_images:  # the codebook of the training images (a resumed run reloads the same)
        from transfusion.codebook import fit_codebook

        m = cfg.model
        try:
            model.codebook.copy_(fit_codebook(prepared.train_latents, m.image_codes, m.patch_size, m.codebook_seed))
        except ValueError as e:
            raise UserError(f"{e}; pass a smaller --codebook-size") from e
        image_tokens = model.image_tokens(prepared.train_latents.to(device)).cpu()
    batches = MixedBatches(
        prepared.train_latents,
        prepared.train_labels,
        prepared.corpus,
        prepared.tokenizer,
        cfg.data,
        cfg.model.patch_size,
        cfg.model.num_train_timesteps,
        image_tokens=image_tokens,
    )
    trainer = Trainer(
        model, cfg, prepared.tokenizer, batches, device=device, metrics_path=out / "metrics.jsonl", latents=latents
    )
    if resume and (ckpt / "trainer_state.json").is_file():
        trainer.resume(ckpt)
        print(f"resumed from {ckpt} at step {trainer.step}")
    return trainer


def run_training(
    prepared,
    cfg,
    out,
    *,
    device,
    resume: bool = False,
    progress: bool = True,
    time_limit=None,
    latents=None,
    on_log=None,
):
    trainer = build_trainer(prepared, cfg, out, device=device, resume=resume, latents=latents)
    hist = trainer.fit(checkpoint_dir=Path(out) / "checkpoint", progress=progress, time_limit=time_limit, on_log=on_log)
    return trainer, hist
