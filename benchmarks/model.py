"""End to end: training tokens per second and sampling images per second, per backend.

Training: one optimizer step (forward, L_LM + L_DDPM, backward, AdamW) on a packed Transfusion
batch, for each kernel backend that can run here and for a baseline whose attention is SDPA
with the dense N x N mask (the other ops on the reference backend). Sampling: one image of
``n`` patches denoised over T DDPM steps after a text prefix, with the prefix in the KV cache
(each step runs only the image queries) and without it (each step recomputes prefix + image).

    python benchmarks/model.py            # GPU: 12 layers, 768 wide, 8k-token batches, 250 steps
    python benchmarks/model.py --smoke    # CPU: tiny model, checks the harness
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import transfusion_kernels as tk  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from transfusion import model as model_mod  # noqa: E402
from transfusion.config import ModelConfig  # noqa: E402
from transfusion.data import Image, pack_documents  # noqa: E402
from transfusion.image import patchify, unpatchify  # noqa: E402
from transfusion.model import KVCache, TransfusionModel  # noqa: E402
from transfusion.sample import _image_step, _text_step  # noqa: E402
from transfusion.train import loss_terms  # noqa: E402

SPECIAL = SimpleNamespace(bos_id=1, eos_id=2, boi_id=3, eoi_id=4, pad_id=0)
GPU = dict(cfg=dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, latent_channels=4, patch_size=2,
                    timestep_freq_dim=256),
           tokens=8192, doc=2048, images=((32, 32), (64, 64)), prefix=512, sample_image=(32, 32), steps=250)
SMOKE = dict(cfg=dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, latent_channels=1, patch_size=2,
                      timestep_freq_dim=32),
             tokens=256, doc=128, images=((8, 8),), prefix=16, sample_image=(8, 8), steps=3)


def sdpa_dense(q, k, v, mask, softmax_scale=None, return_lse=False, backend=None):
    """Baseline attention: SDPA with the dense boolean mask (what a model without interval
    attention does)."""
    g = q.shape[1] // k.shape[1]
    qh, kh, vh = (t.transpose(0, 1) for t in (q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.to_dense(), scale=softmax_scale)
    return out.transpose(0, 1)


@contextlib.contextmanager
def attention_impl(method: str):
    """``tk:<backend>`` runs every op on that backend; ``sdpa-dense`` swaps the model's attention."""
    if method != "sdpa-dense":
        yield method.split(":", 1)[1]
        return
    original = model_mod.tk.hybrid_attention
    model_mod.tk.hybrid_attention = sdpa_dense
    try:
        yield "reference"
    finally:
        model_mod.tk.hybrid_attention = original


def training_batch(spec, cfg: ModelConfig, gen: torch.Generator):
    docs = []
    for _ in range(spec["tokens"] // spec["doc"]):
        doc, used = [], 2  # BOS, EOS
        for h, w in spec["images"]:
            text = torch.randint(5, cfg.vocab_size, (24,), generator=gen).tolist()
            doc += [text, Image(torch.randn(cfg.latent_channels, h, w, generator=gen))]
            used += len(text) + 2 + (h // cfg.patch_size) * (w // cfg.patch_size)
        doc.append(torch.randint(5, cfg.vocab_size, (spec["doc"] - used,), generator=gen).tolist())
        docs.append(doc)
    return pack_documents(docs, SPECIAL, cfg.patch_size, cfg.num_train_timesteps, generator=gen)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    """Median seconds of fn() over ``reps`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_training(model, batch, device, autocast, reps):
    sched = model.schedule()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        lm, ddpm = loss_terms(model, batch, sched, autocast)
        (lm + ddpm).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, device, reps)


@torch.no_grad()
def bench_sampling(model, spec, device, dtype, cached: bool, reps: int):
    cfg = model.cfg
    sched = model.schedule()
    gen = torch.Generator().manual_seed(0)
    prefix = [SPECIAL.bos_id] + torch.randint(5, cfg.vocab_size, (spec["prefix"] - 2,), generator=gen).tolist() + [SPECIAL.boi_id]
    h, w = spec["sample_image"]
    k = cfg.patch_size
    n = (h // k) * (w // k)
    steps = [(t, t - 1 if t > 0 else -1) for t in range(spec["steps"] - 1, -1, -1)]  # DDPM, T steps
    full_mask = tk.HybridMask.from_spans(torch.tensor([0, len(prefix) + n], dtype=torch.int32, device=device),
                                         torch.tensor([[len(prefix), len(prefix) + n]], dtype=torch.int32, device=device))
    ids = torch.tensor(prefix + [SPECIAL.pad_id] * n, device=device)
    positions = torch.arange(len(prefix) + n, device=device)
    image_index = torch.tensor([-1] * len(prefix) + [0] * n, dtype=torch.int32, device=device)

    def one_image():
        x = torch.randn(1, cfg.latent_channels, h, w, device=device, dtype=dtype)
        if cached:
            cache = KVCache(cfg, 1, device, dtype, capacity=len(prefix) + n)
            _text_step(model, cache, [0], [prefix])  # the prefix, once
        for t, tp in steps:
            ts = torch.full((1,), t, dtype=torch.long, device=device)
            if cached:
                eps = _image_step(model, cache, [0], x, ts, commit=False)
            else:
                _, eps = model(ids, positions, image_index, full_mask, [x[0]], ts, label_positions=positions[:1])
            rows = tk.ddpm_step(eps.float(), t, patchify(x.float(), k), sched, prev_timestep=tp, seed=t,
                                backend=model.backend)
            x = unpatchify(rows, 1, cfg.latent_channels, h, w, k).to(dtype)
        return x

    return timed(one_image, device, reps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU model: checks the harness, no speed claims")
    ap.add_argument("--methods", default=None, help="comma list of tk:<backend> and sdpa-dense (default: all that run here)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--root", default=None, help="results folder (default benchmarks/results; a temporary folder for --smoke)")
    args = ap.parse_args(argv)
    if args.smoke:
        spec, device, dtype, reps = SMOKE, torch.device("cpu"), torch.float32, args.reps or 2
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --smoke on a CPU")
        spec, device, dtype, reps = GPU, torch.device("cuda"), torch.bfloat16, args.reps or 5
    if args.methods:
        methods = args.methods.split(",")
    elif args.smoke:
        methods = ["tk:reference", "sdpa-dense"]
    else:
        methods = [f"tk:{b}" for b, i in tk.available_backends(device).items() if i.available] + ["sdpa-dense"]
    torch.manual_seed(0)
    cfg = ModelConfig(**spec["cfg"])
    model = TransfusionModel(cfg).to(device)
    batch = training_batch(spec, cfg, torch.Generator().manual_seed(0)).to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    tokens = int(batch.input_ids.numel())
    rows = []
    for method in methods:
        row = {"method": method, "tokens": tokens, "images": len(batch.images), "layers": cfg.n_layers, "dim": cfg.dim}
        try:
            with attention_impl(method) as backend:
                model.backend = backend
                model.train()
                s = bench_training(model, batch, device, autocast, reps)
                row.update(train_step_s=s, train_tokens_per_s=tokens / s)
                model.eval()
                if device.type == "cuda":
                    model.to(dtype)
                for cached in (True, False):
                    s = bench_sampling(model, spec, device, dtype, cached, max(1, reps // 2))
                    key = "cache" if cached else "no_cache"
                    row[f"sample_{key}_s"], row[f"images_per_s_{key}"] = s, 1.0 / s
                row["cache_speedup"] = row["sample_no_cache_s"] / row["sample_cache_s"]
                model.float()
        except Exception as e:  # noqa: BLE001 - record it and go on with the other methods
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            model.float()
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    model.backend = None
    root = args.root or (tempfile.gettempdir() if args.smoke else None)
    config = {k: v for k, v in spec.items() if k != "cfg"} | {"model": spec["cfg"], "dtype": str(dtype), "reps": reps,
                                                              "timing": "median wall time, synchronised"}
    out = write_json("model", rows, config, device=device, root=root)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
