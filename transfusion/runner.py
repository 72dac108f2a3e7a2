"""Building a run: its Config from prepared data and command-line overrides, and the model,
batch stream and Trainer of a run folder. Used by the command line, the demo and distributed
training."""
from __future__ import annotations

from pathlib import Path

import torch

from transfusion.config import Config, DataConfig, ModelConfig, TrainConfig, demo_config
from transfusion.data import MixedBatches
from transfusion.model import TransfusionModel
from transfusion.train import Trainer


def build_config(info: dict, args):
    if args.config:
        base = Config.from_json(Path(args.config).read_text())
    elif args.preset == "demo":
        base = demo_config(info["vocab_size"])
    else:
        base = Config()
    m, d, t = base.model.__dict__.copy(), base.data.__dict__.copy(), base.train.__dict__.copy()
    m.update(vocab_size=info["vocab_size"], latent_channels=info["latent_channels"])
    d.update(image_size=info["image_size"], holdout_fraction=info["holdout_fraction"],
             latents="pixel" if info["latents"] == "pixel" else "vae")
    for key, dest in (("dim", m), ("layers", m), ("heads", m), ("patch_size", m), ("image_encoder", m),
                      ("docs_per_batch", d), ("steps", t), ("lr", t), ("seed", t), ("ema_decay", t),
                      ("diffusion_weight", t), ("warmup_steps", t), ("save_every", t)):
        v = getattr(args, key, None)
        if v is not None:
            dest[{"layers": "n_layers", "heads": "n_heads"}.get(key, key)] = v
    if getattr(args, "heads", None) is not None and base.model.n_kv_heads == base.model.n_heads:
        m["n_kv_heads"] = None  # no GQA in the base config: follow the new head count
    if args.backend:
        t["backend"] = args.backend
    return Config(model=ModelConfig(**m), data=DataConfig(**d), train=TrainConfig(**t))


def build_trainer(prepared, cfg, out, *, device, resume: bool = False, latents=None):
    """Model, batch stream and Trainer for a run folder ``out`` (``metrics.jsonl``, ``checkpoint/``);
    resumes from ``out/checkpoint`` when asked and present."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    model = TransfusionModel(cfg.model, backend=cfg.train.backend).to(device)
    batches = MixedBatches(prepared.train_latents, prepared.train_labels, prepared.corpus, prepared.tokenizer,
                           cfg.data, cfg.model.patch_size, cfg.model.num_train_timesteps)
    trainer = Trainer(model, cfg, prepared.tokenizer, batches, device=device, metrics_path=out / "metrics.jsonl",
                      latents=latents)
    ckpt = out / "checkpoint"
    if resume and (ckpt / "trainer_state.json").is_file():
        trainer.resume(ckpt)
        print(f"resumed from {ckpt} at step {trainer.step}")
    return trainer


def run_training(prepared, cfg, out, *, device, resume: bool = False, progress: bool = True, time_limit=None,
                 latents=None, on_log=None):
    trainer = build_trainer(prepared, cfg, out, device=device, resume=resume, latents=latents)
    hist = trainer.fit(checkpoint_dir=Path(out) / "checkpoint", progress=progress, time_limit=time_limit,
                       on_log=on_log)
    return trainer, hist
