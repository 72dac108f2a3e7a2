"""Data-parallel training with ``torch.distributed``: DDP or fully sharded (FSDP2).

::

    torchrun --nproc-per-node 2 -m transfusion train --distributed ddp --data D --out O ...   (or --distributed fsdp)

The arguments after ``train`` are those of ``transfusion train``. Backend: gloo on the CPU,
nccl on CUDA (one GPU per local rank).

Equivalence with one process. Every rank builds the same global batch for a step
(``MixedBatches.batch(step)``, a function of the seed and the step only) and takes a contiguous
share of its documents: rank r of W keeps documents ``[r*B//W, (r+1)*B//W)``. The diffusion
noise of every image is drawn once over the whole global batch (the same ``tk.add_noise`` call
as a single process) and sliced, so each image sees the noise it would see in one process.
The single-process loss is ``L = mean_text CE + lambda * mean_images MSE_i``; rank r backpropagates
``W * (sum_{its labels} CE / N_labels + lambda * sum_{its images} MSE_i / N_images)``, and
DDP / FSDP average gradients over the W ranks, so the averaged gradient is the gradient of
``L`` itself (up to float rounding: different shapes change reduction orders). The reported
losses are the all-reduced sums of the unscaled terms, i.e. ``L`` and its two parts.

Checkpoints are written by rank 0 with full (unsharded) tensors in the ordinary format of
``transfusion.checkpoint``: they load in one process or on another world size.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import transfusion_kernels as tk

from transfusion.data import IGNORE, PackedBatch
from transfusion.objective import training_inputs
from transfusion.train import Trainer, images_to_rows, rows_to_images

STRATEGIES = ("ddp", "fsdp")


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # FSDP2 is public in torch >= 2.6
        raise RuntimeError(
            f"strategy 'fsdp' needs torch.distributed.fsdp.fully_shard (FSDP2), "
            f"which torch {torch.__version__} does not provide; use strategy 'ddp'"
        ) from e
    return fully_shard


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor of ``t`` (gathers a sharded DTensor: collective, call on every rank)."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu()


def doc_range(num_docs: int, rank: int, world: int) -> tuple[int, int]:
    """Documents ``[a, b)`` of a global batch that ``rank`` of ``world`` trains on."""
    if num_docs < world:
        raise ValueError(
            f"a global batch of {num_docs} documents cannot be split over {world} ranks "
            f"(docs_per_batch must be >= the world size)"
        )
    return rank * num_docs // world, (rank + 1) * num_docs // world


def shard_batch(batch: PackedBatch, a: int, b: int, pad_image: bool = False):
    """Documents ``[a, b)`` of a packed batch as a batch of their own.

    Returns ``(local, images, real)``: ``images`` the global indices of the local batch's images
    and ``real`` how many of them count in the loss. With ``pad_image`` and no image in ``[a, b)``
    (while the global batch has some), the first document holding an image is appended with its
    text labels ignored: its image adds exactly zero to the loss, but every image-side parameter
    then takes part in the backward on every rank, as FSDP's reduce-scatter needs."""
    cu = batch.cu_seqlens.tolist()
    spans = batch.image_spans.tolist()
    t0, t1 = cu[a], cu[b]
    imgs = [i for i, (s, _) in enumerate(spans) if t0 <= s < t1]
    docs, real = [(a, b)], len(imgs)
    if pad_image and not imgs and spans:
        d = max(j for j in range(len(cu) - 1) if cu[j] <= spans[0][0])
        docs.append((d, d + 1))
        imgs = [i for i, (s, _) in enumerate(spans) if cu[d] <= s < cu[d + 1]]
    ids, labels, pos, img_index, new_cu, new_spans = [], [], [], [], [0], []
    for k, (da, db) in enumerate(docs):
        s0, s1 = cu[da], cu[db]
        off = new_cu[-1] - s0
        ids.append(batch.input_ids[s0:s1])
        lab = batch.labels[s0:s1]
        labels.append(lab if k == 0 else torch.full_like(lab, IGNORE))
        pos.append(batch.positions[s0:s1])
        new_cu += [c + off for c in cu[da + 1 : db + 1]]
        new_spans += [(s + off, e + off) for s, e in spans if s0 <= s < s1]
    first = imgs[0] if imgs else 0
    for k, (da, db) in enumerate(docs):
        ii = batch.image_index[cu[da] : cu[db]]
        img_index.append(torch.where(ii >= 0, ii - first if k == 0 else ii - imgs[0] + real, ii))
    dev = batch.input_ids.device
    local = PackedBatch(
        input_ids=torch.cat(ids),
        labels=torch.cat(labels),
        positions=torch.cat(pos),
        image_index=torch.cat(img_index),
        cu_seqlens=torch.tensor(new_cu, dtype=torch.int32, device=dev),
        image_spans=torch.tensor(new_spans, dtype=torch.int32, device=dev).reshape(-1, 2),
        images=[batch.images[i] for i in imgs],
        timesteps=batch.timesteps[imgs] if batch.timesteps is not None else None,
        noise_seed=batch.noise_seed,
    )
    return local, imgs, real


class DistributedTrainer(Trainer):
    """``Trainer`` over ``torch.distributed`` ranks (the process group must be initialised).

    ``model`` is the plain module, built identically (same seed) on every rank; with
    ``strategy="fsdp"`` it is sharded in place before the optimizer is built."""

    def __init__(
        self, model, config, tokenizer, batches, *, strategy: str = "ddp", device="cpu", metrics_path=None, latents=None
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not dist.is_initialized():
            raise RuntimeError("DistributedTrainer needs torch.distributed.init_process_group() first")
        self.strategy, self.rank, self.world = strategy, dist.get_rank(), dist.get_world_size()
        device = torch.device(device)
        if strategy == "fsdp":
            _fully_shard()(model)
        super().__init__(
            model,
            config,
            tokenizer,
            batches,
            device=device,
            metrics_path=metrics_path if self.rank == 0 else None,
            latents=latents,
        )
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # unused parameters: a global batch without images leaves the image side idle
            self.forward_module = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
            )
        else:
            self.forward_module = model

    # -- loss ---------------------------------------------------------------------------------
    def shard_loss(self, batch: PackedBatch):
        """``(lm, ddpm, scaled)``: the global batch's two losses (all-reduced, detached) and this
        rank's scaled share to backpropagate (see the module docstring)."""
        model, sched, k = self.model, self.diff_sched, self.model.cfg.patch_size
        a, b = doc_range(len(batch.cu_seqlens) - 1, self.rank, self.world)
        n_labels = int((batch.labels != IGNORE).sum())
        n_images = len(batch.images)
        # the noise of the whole global batch, drawn as one process draws it
        x0 = x_t = target_all = model_t = None
        if n_images:
            x0 = images_to_rows(batch.images, k).float()
            counts = [(x.shape[1] // k) * (x.shape[2] // k) for x in batch.images]
            row_img = torch.repeat_interleave(
                torch.arange(n_images, device=x0.device), torch.tensor(counts, device=x0.device)
            )
            x_t, target_all, model_t = training_inputs(
                model.cfg, x0, batch.timesteps, row_img, batch.noise_seed, sched, model.backend
            )
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c)
        local, imgs, real = shard_batch(batch, a, b, pad_image=self.strategy == "fsdp")
        label_pos = torch.nonzero(local.labels != IGNORE).squeeze(1)
        noisy, target, patch_img = [], None, None
        if imgs:
            rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=x0.device) for i in imgs])
            shapes = [tuple(batch.images[i].shape) for i in imgs]
            noisy = rows_to_images(x_t[rows], shapes, k)
            target = target_all[rows]
            lens = torch.tensor([starts[i + 1] - starts[i] for i in imgs], device=x0.device)
            ids = torch.arange(len(imgs), device=x0.device, dtype=torch.int32)
            patch_img = torch.repeat_interleave(torch.where(ids < real, ids, -1), lens)  # pad image: -1
        with self.autocast():
            mask = local.mask(self.config.model.bidirectional_images)
            logits, pred = self.forward_module(
                local.input_ids,
                local.positions,
                local.image_index,
                mask,
                noisy,
                model_t[imgs] if imgs else local.timesteps,
                label_pos,
            )
        if len(label_pos):
            lm = F.cross_entropy(logits.float(), local.labels[label_pos], reduction="sum") / n_labels
        else:
            lm = logits.sum() * 0
        if imgs:  # diffusion_loss averages over the real images here: times `real` is their sum
            ddpm = tk.diffusion_loss(pred.float(), target.float(), patch_img) * (real / n_images)
        else:
            ddpm = lm * 0
        scaled = self.world * (lm + self.config.train.diffusion_weight * ddpm)
        parts = torch.stack([lm.detach(), ddpm.detach()]).float()
        dist.all_reduce(parts)
        return parts[0], parts[1], scaled

    def train_step(self, batch: PackedBatch) -> dict:
        # the steps of Trainer.train_step, on this rank's share of the global batch
        tc = self.config.train
        self.model.train()
        t0 = time.perf_counter()
        batch = batch.to(self.device)
        with tk.use_backend(tc.backend) if tc.backend else contextlib.nullcontext():
            lm, ddpm, scaled = self.shard_loss(batch)
            self.opt.zero_grad(set_to_none=True)
            scaled.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip) if tc.grad_clip else None
        if gnorm is not None and _is_dtensor(gnorm):
            gnorm = gnorm.full_tensor()
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.step += 1
        if self.ema is not None:
            d = min(tc.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    self.ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
        loss = lm + tc.diffusion_weight * ddpm
        return {
            "step": self.step,
            "loss": loss.item(),
            "lm_loss": lm.item(),
            "ddpm_loss": ddpm.item(),
            "lr": lr,
            "grad_norm": None if gnorm is None else float(gnorm),
            "tokens": int(batch.input_ids.numel()),
            "step_time": time.perf_counter() - t0,
            "world_size": self.world,
        }

    # -- checkpoints: full tensors, written by rank 0 ------------------------------------------
    def full_model_state(self) -> dict:
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def trainer_state(self) -> dict:
        state = super().trainer_state()
        opt = state["optimizer"]
        opt["state"] = {
            i: {k: _full(v) if torch.is_tensor(v) else v for k, v in st.items()} for i, st in opt["state"].items()
        }
        return state

    def save(self, path) -> Path:
        from transfusion.checkpoint import save_checkpoint

        model_sd = self.full_model_state()  # collectives: every rank takes part
        trainer = self.trainer_state()
        ema = {k: _full(v) for k, v in self.ema.items()} if self.ema is not None else None
        if self.rank == 0:
            save_checkpoint(
                path,
                model=_StateDict(model_sd),
                config=self.config,
                tokenizer=self.tokenizer,
                ema=ema,
                trainer=trainer,
                latents=self.latents,
            )
        dist.barrier()
        return Path(path)

    def resume(self, path) -> None:
        if self.strategy == "ddp":  # every rank loads the same full files into the same replica
            return super().resume(path)
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.tensor import distribute_tensor

        from transfusion.checkpoint import load_trainer_state

        state, opt, rng, ema = load_trainer_state(path)
        set_model_state_dict(
            self.model, load_file(str(Path(path) / "model.safetensors")), options=StateDictOptions(full_state_dict=True)
        )
        self.opt.load_state_dict(opt)
        for group in self.opt.param_groups:  # full optimizer tensors -> this rank's shards
            for p in group["params"]:
                st = self.opt.state.get(p, {})
                for k, v in st.items():
                    if torch.is_tensor(v) and _is_dtensor(p) and tuple(v.shape) == tuple(p.shape):
                        st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.batches.load_state_dict(state["data"])
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if self.ema is not None:
            if ema is None:
                raise ValueError(f"{path}: the config asks for EMA but the checkpoint has no ema.safetensors")
            cur = self.model.state_dict()
            self.ema = {
                k: distribute_tensor(v.float().to(self.device), cur[k].device_mesh, cur[k].placements)
                if _is_dtensor(cur[k])
                else v.float().to(self.device)
                for k, v in ema.items()
            }


class _StateDict:
    """What ``save_checkpoint`` needs of a model: its ``state_dict()``."""

    def __init__(self, sd):
        self.sd = sd

    def state_dict(self):
        return self.sd


# -- entry point -------------------------------------------------------------------------------
def setup(device: str | None = None, timeout_s: float = 600.0):
    """Initialise the process group from torchrun's environment; returns this rank's device."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return dev


def train(args, strategy: str) -> int:
    from transfusion.config import UserError
    from transfusion.data import MixedBatches
    from transfusion.latents import make_latents
    from transfusion.model import TransfusionModel
    from transfusion.prepare import load_prepared
    from transfusion.outdir import write_marker, written_by
    from transfusion.runner import build_config, warmup_warning

    out = Path(args.out)
    new_folder = not out.exists()
    device = setup(args.device)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        try:
            prepared = load_prepared(args.data)
        except FileNotFoundError as e:
            raise UserError(str(e)) from e
        cfg = build_config(prepared.info, args)
        warning = warmup_warning(cfg)
        if warning and dist.get_rank() == 0:
            print(f"transfusion train: {warning}", file=sys.stderr)
        latents = None
        if prepared.info["latents"] == "vae":
            latents = make_latents(str(Path(args.data) / "vae"), device=device)
        rank = dist.get_rank()
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if written_by(out) is None:
                write_marker(out, "train")
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = TransfusionModel(cfg.model, backend=cfg.train.backend).to(device)
        batches = MixedBatches(
            prepared.train_latents,
            prepared.train_labels,
            prepared.corpus,
            prepared.tokenizer,
            cfg.data,
            cfg.model.patch_size,
            cfg.model.num_train_timesteps,
        )
        trainer = DistributedTrainer(
            model,
            cfg,
            prepared.tokenizer,
            batches,
            strategy=strategy,
            device=device,
            metrics_path=out / "metrics.jsonl",
            latents=latents,
        )
        ckpt = out / "checkpoint"
        if args.resume and (ckpt / "trainer_state.json").is_file():
            trainer.resume(ckpt)
            if rank == 0:
                print(f"resumed from {ckpt} at step {trainer.step}")
        ctx = tk.use_backend(args.backend) if args.backend else contextlib.nullcontext()
        with ctx:
            hist = trainer.fit(checkpoint_dir=ckpt, progress=rank == 0 and not args.quiet and sys.stderr.isatty())
        if rank == 0:
            if hist:
                last = hist[-1]
                print(
                    f"step {last['step']}: loss {last['loss']:.4f} (lm {last['lm_loss']:.4f}, "
                    f"ddpm {last['ddpm_loss']:.4f}) on {dist.get_world_size()} ranks ({strategy})"
                )
            print(f"checkpoint: {ckpt}")
    except BaseException:  # an error or Ctrl-C before any checkpoint: no run folder stays behind
        if dist.get_rank() == 0 and new_folder and not (out / "checkpoint").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        dist.destroy_process_group()
    return 0
