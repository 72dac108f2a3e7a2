"""Training: L = L_LM + lambda * L_DDPM on packed mixed-modality batches.

AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast on CUDA, optional EMA,
resumable checkpoints (optimizer, scheduler, RNG and data-iterator state), a tqdm bar with both
losses and metrics appended to a JSONL file.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import transfusion_kernels as tk

from transfusion.checkpoint import load_trainer_state, save_checkpoint
from transfusion.data import IGNORE, PackedBatch
from transfusion.flops import batch_counts, training_flops
from transfusion.image import patchify, unpatchify
from transfusion.objective import training_inputs


def images_to_rows(images, k: int) -> torch.Tensor:
    """Concatenated patch rows ``[P, C*k*k]`` of a list of ``[C, H, W]`` latents (sequence order)."""
    return torch.cat([patchify(x[None], k) for x in images]) if images else torch.zeros(0)


def rows_to_images(rows: torch.Tensor, shapes, k: int):
    out, o = [], 0
    for c, h, w in shapes:
        n = (h // k) * (w // k)
        out.append(unpatchify(rows[o : o + n], 1, c, h, w, k)[0])
        o += n
    return out


def loss_terms(model, batch: PackedBatch, sched, autocast=contextlib.nullcontext):
    """``(lm_loss, ddpm_loss)`` of a batch: mean next-token cross-entropy over text targets, and
    the per-image MSE of the image head's prediction (``cfg.prediction_type``) averaged over
    images. Noise comes from tk's seeded Philox generator (``batch.noise_seed``): the same batch
    gives the same loss on every backend and run."""
    k = model.cfg.patch_size
    mask = batch.mask(model.cfg.bidirectional_images)
    label_pos = torch.nonzero(batch.labels != IGNORE).squeeze(1)
    noisy, target, patch_img, t = [], None, None, batch.timesteps
    if batch.images:
        x0 = images_to_rows(batch.images, k).float()
        counts = torch.tensor([(x.shape[1] // k) * (x.shape[2] // k) for x in batch.images], device=x0.device)
        patch_img = torch.repeat_interleave(
            torch.arange(len(batch.images), device=x0.device, dtype=torch.int32), counts
        )
        x_t, target, t = training_inputs(model.cfg, x0, t, patch_img, batch.noise_seed, sched, model.backend)
        noisy = rows_to_images(x_t, [tuple(x.shape) for x in batch.images], k)
    with autocast():
        logits, pred = model(batch.input_ids, batch.positions, batch.image_index, mask, noisy, t, label_pos)
    lm = F.cross_entropy(logits.float(), batch.labels[label_pos]) if len(label_pos) else logits.sum() * 0
    ddpm = tk.diffusion_loss(pred.float(), target.float(), patch_img) if batch.images else lm * 0
    return lm, ddpm


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


class Trainer:
    def __init__(self, model, config, tokenizer, batches, device="cpu", metrics_path=None, latents=None):
        self.model, self.config, self.tokenizer, self.batches = model, config, tokenizer, batches
        self.latents = latents
        self.device = torch.device(device)
        tc = config.train
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr,
            betas=tc.betas,
            foreach=False,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(tc.warmup_steps, tc.steps, tc.min_lr_ratio))
        self.diff_sched = model.schedule()
        self.step = 0
        self.ema = (
            {k: v.detach().clone().float() for k, v in model.state_dict().items()} if tc.ema_decay is not None else None
        )
        bf16 = tc.bf16 if tc.bf16 is not None else self.device.type == "cuda"
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        )
        self.metrics_path = Path(metrics_path) if metrics_path else None

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, batch: PackedBatch) -> dict:
        tc = self.config.train
        self.model.train()
        t0 = time.perf_counter()
        batch = batch.to(self.device)
        with tk.use_backend(tc.backend) if tc.backend else contextlib.nullcontext():
            lm, ddpm = loss_terms(self.model, batch, self.diff_sched, self.autocast)
            loss = lm + tc.diffusion_weight * ddpm
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip) if tc.grad_clip else None
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.step += 1
        if self.ema is not None:
            # warm-started decay so early steps do not freeze the average near the random init
            d = min(tc.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    self.ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
        return {
            "step": self.step,
            "loss": loss.item(),
            "lm_loss": lm.item(),
            "ddpm_loss": ddpm.item(),
            "lr": lr,
            "grad_norm": None if gnorm is None else float(gnorm),
            "tokens": int(batch.input_ids.numel()),
            "flops": training_flops(self.model.cfg, batch_counts(batch, self.model.cfg.bidirectional_images)),
            "step_time": time.perf_counter() - t0,
        }

    def set_total_steps(self, total: int) -> None:
        """Change the run's length, and the cosine schedule with it (meant for the warmup phase,
        e.g. after timing a few steps)."""
        tc = self.config.train
        if total < self.step:
            raise ValueError(f"total steps ({total}) must be >= the steps already taken ({self.step})")
        tc.steps = int(total)
        self.sched.lr_lambdas = [lr_lambda(tc.warmup_steps, tc.steps, tc.min_lr_ratio) for _ in self.opt.param_groups]

    # -- loop --------------------------------------------------------------------------------
    def fit(
        self,
        steps: int | None = None,
        checkpoint_dir=None,
        progress: bool = True,
        time_limit: float | None = None,
        on_log=None,
    ) -> list[dict]:
        """Train until ``steps`` (default: the config's) or ``time_limit`` seconds."""
        from tqdm.auto import tqdm

        tc = self.config.train
        total = tc.steps if steps is None else steps
        bar = tqdm(total=total, initial=self.step, disable=not progress, dynamic_ncols=True, desc="train")
        history, start = [], time.perf_counter()
        while self.step < total:
            m = self.train_step(next(self.batches))
            history.append(m)
            bar.update(1)
            bar.set_postfix(lm=f"{m['lm_loss']:.3f}", ddpm=f"{m['ddpm_loss']:.3f}", lr=f"{m['lr']:.2e}")
            if self.metrics_path and (self.step % tc.log_every == 0 or self.step == total):
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
            if on_log is not None:
                on_log(m)
            if checkpoint_dir and tc.save_every and self.step % tc.save_every == 0:
                self.save(checkpoint_dir)
            if time_limit is not None and time.perf_counter() - start > time_limit:
                break
        bar.close()
        if checkpoint_dir:
            self.save(checkpoint_dir)
        return history

    # -- checkpoints -------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        sched = self.sched.state_dict()  # JSON-able: the lambdas are closures (stored as None)
        return {
            "optimizer": self.opt.state_dict(),
            "scheduler": sched,
            "step": self.step,
            "data": self.batches.state_dict(),
            "rng": rng,
        }

    def save(self, path) -> Path:
        return save_checkpoint(
            path,
            model=self.model,
            config=self.config,
            tokenizer=self.tokenizer,
            ema=self.ema,
            trainer=self.trainer_state(),
            latents=self.latents,
        )

    def _cut_metrics(self) -> None:
        """Drop the metrics lines past the resumed step: a run stopped after its last checkpoint
        logged steps it will now train again, and each step must appear once."""
        import os

        if self.metrics_path is None or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= self.step]
        if len(kept) != len(lines):
            tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.metrics_path)

    def resume(self, path) -> None:
        state, opt, rng, ema = load_trainer_state(path)
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        self.opt.load_state_dict(opt)
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self._cut_metrics()
        self.batches.load_state_dict(state["data"])
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        for name, s in rng.items():
            if name.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state(s, int(name[4:]))
        if self.ema is not None:
            if ema is None:
                raise ValueError(f"{path}: the config asks for EMA but the checkpoint has no ema.safetensors")
            self.ema = {k: v.to(self.device).float() for k, v in ema.items()}
