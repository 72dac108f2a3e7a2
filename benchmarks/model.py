"""End to end: training tokens per second and sampling images per second, per backend.

Training: one optimizer step (forward, L_LM + L_DDPM, backward, AdamW) on a packed Transfusion
batch. Methods:
  tk:<backend>  every tk op on that kernel backend
  flex          the baseline: attention by torch.compile(flex_attention) with a BlockMask built
                once per batch (torch.compile(create_block_mask)) and shared by all layers;
                the other ops on the reference backend
  sdpa-dense    the naive baseline: SDPA with the dense N x N mask as an additive float mask,
                built once per batch and shared by all layers, K/V not expanded (enable_gqa)
Attention runs as one call per layer over the whole batch for every method. Before timing, each
method's losses on the first batch are checked against the fp32 reference backend from the same
weights (``err_lm_loss``, ``err_ddpm_loss``). Sampling: one image of ``n`` patches denoised over
T DDPM steps after a text prefix, with the prefix in the KV cache (each step runs only the image
queries) and without it (each step recomputes prefix + image).

    python -m benchmarks.model            # GPU: 12 layers, 768 wide, 8k-token batches, 250 steps
    python -m benchmarks.model --smoke    # CPU: tiny model, checks the harness (a backend that cannot
                                          # run here has the reference standing in)
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
from .attention import additive_mask, sdpa_supports_gqa  # noqa: E402
from .common import compile_backend, compile_fn, flex_block_mask, write_json  # noqa: E402
from transfusion import model as model_mod  # noqa: E402
from transfusion.config import ModelConfig  # noqa: E402
from transfusion.data import Image, pack_documents  # noqa: E402
from transfusion.image import patchify, unpatchify  # noqa: E402
from transfusion.model import KVCache, TransfusionModel  # noqa: E402
from transfusion.sample import _image_step, _text_step  # noqa: E402
from transfusion.train import loss_terms  # noqa: E402

_hybrid_attention = tk.hybrid_attention  # the op itself, while a baseline stands in for it in the model
SPECIAL = SimpleNamespace(bos_id=1, eos_id=2, boi_id=3, eoi_id=4, pad_id=0)
GPU = dict(
    cfg=dict(
        vocab_size=32000,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        latent_channels=4,
        patch_size=2,
        timestep_freq_dim=256,
    ),
    tokens=8192,
    doc=2048,
    images=((32, 32), (64, 64)),
    prefix=512,
    sample_image=(32, 32),
    steps=250,
)
SMOKE = dict(
    cfg=dict(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        latent_channels=1,
        patch_size=2,
        timestep_freq_dim=32,
    ),
    tokens=256,
    doc=128,
    images=((8, 8),),
    prefix=16,
    sample_image=(8, 8),
    steps=3,
)


class _PerBatch:
    """One attention input built from the mask, rebuilt only when the mask (or dtype) changes:
    every layer of one forward gets the same mask object. Holding the mask keeps its id from
    being reused."""

    def __init__(self, build):
        self.build, self.key, self.value = build, (None, None), None

    def __call__(self, mask, dtype=None):
        if mask is not self.key[0] or dtype != self.key[1]:
            self.key, self.value = (mask, dtype), self.build(mask, dtype)
        return self.value


def _heads_first(*tensors):
    """[N, H, D] -> [1, H, N, D] views (no copies)."""
    return [t.transpose(0, 1)[None] for t in tensors]


def flex_attention_fn():
    """hybrid_attention's signature on compiled FlexAttention with a per-batch BlockMask."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = compile_fn(flex_attention, dynamic=False)
    block_masks = _PerBatch(lambda mask, dtype: flex_block_mask(mask)[0])

    def attention(q, k, v, mask, softmax_scale=None, return_lse=False, backend=None):
        if return_lse:
            raise ValueError("the flex baseline does not return the log-sum-exp")
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            # FlexAttention has no CPU backward: the reference stands in (dry runs only)
            return _hybrid_attention(q, k, v, mask, softmax_scale=softmax_scale, backend="reference")
        out = compiled(
            *_heads_first(q, k, v),
            block_mask=block_masks(mask),
            scale=softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out[0].transpose(0, 1)

    return attention


def sdpa_dense_fn():
    """The naive baseline: SDPA with the dense mask as an additive float mask (built once per
    batch), K/V not expanded where SDPA takes enable_gqa."""
    masks = _PerBatch(additive_mask)

    def attention(q, k, v, mask, softmax_scale=None, return_lse=False, backend=None):
        if return_lse:
            raise ValueError("the sdpa-dense baseline does not return the log-sum-exp")
        g = q.shape[1] // k.shape[1]
        extra = {}
        if g > 1 and sdpa_supports_gqa():
            extra["enable_gqa"] = True
        elif g > 1:
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        out = F.scaled_dot_product_attention(
            *_heads_first(q, k, v), attn_mask=masks(mask, q.dtype), scale=softmax_scale, **extra
        )
        return out[0].transpose(0, 1)

    return attention


BASELINES = {"flex": flex_attention_fn, "sdpa-dense": sdpa_dense_fn}


def method_backend(method: str, device, stand_in: bool) -> tuple[str, str]:
    """(kernel backend for the tk ops, note). A baseline runs the other ops on the reference."""
    if method in BASELINES:
        return "reference", ""
    if not method.startswith("tk:"):
        raise ValueError(f"unknown method {method!r}: use tk:<backend>, {' or '.join(BASELINES)}")
    backend = method.split(":", 1)[1]
    info = tk.available_backends(device)[backend]
    if info.available:
        return backend, ""
    if not stand_in:
        raise tk.BackendUnavailableError(info.reason)
    return "reference", f"reference standing in: {info.reason}"


@contextlib.contextmanager
def attention_impl(method: str):
    """A baseline swaps the model's attention for the duration."""
    if method not in BASELINES:
        yield
        return
    original = model_mod.tk.hybrid_attention
    model_mod.tk.hybrid_attention = BASELINES[method]()
    try:
        yield
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
    prefix = (
        [SPECIAL.bos_id]
        + torch.randint(5, cfg.vocab_size, (spec["prefix"] - 2,), generator=gen).tolist()
        + [SPECIAL.boi_id]
    )
    h, w = spec["sample_image"]
    k = cfg.patch_size
    n = (h // k) * (w // k)
    steps = [(t, t - 1 if t > 0 else -1) for t in range(spec["steps"] - 1, -1, -1)]  # DDPM, T steps
    full_mask = tk.HybridMask.from_spans(
        torch.tensor([0, len(prefix) + n], dtype=torch.int32, device=device),
        torch.tensor([[len(prefix), len(prefix) + n]], dtype=torch.int32, device=device),
    )
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
            rows = tk.ddpm_step(
                eps.float(), t, patchify(x.float(), k), sched, prev_timestep=tp, seed=t, backend=model.backend
            )
            x = unpatchify(rows, 1, cfg.latent_channels, h, w, k).to(dtype)
        return x

    return timed(one_image, device, reps)


def check_losses(model, batch, sched, autocast, reference) -> dict:
    """|loss - reference loss| for both terms, from the same weights and batch."""
    with torch.no_grad():
        lm, ddpm = loss_terms(model, batch, sched, autocast)
    return {
        "lm_loss": float(lm),
        "err_lm_loss": abs(float(lm) - reference[0]),
        "err_ddpm_loss": abs(float(ddpm) - reference[1]),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU model: checks the harness, no speed claims")
    ap.add_argument(
        "--methods",
        default=None,
        help="comma list of tk:<backend>, flex and sdpa-dense (default: every backend that runs here "
        "and both baselines)",
    )
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps per sampled image")
    ap.add_argument("--no-sampling", action="store_true", help="time training only")
    ap.add_argument(
        "--root", default=None, help="results folder (default benchmarks/results; a temporary folder for --smoke)"
    )
    args = ap.parse_args(argv)
    if args.smoke:
        spec, device, dtype, reps = SMOKE, torch.device("cpu"), torch.float32, args.reps or 2
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --smoke on a CPU")
        spec, device, dtype, reps = GPU, torch.device("cuda"), torch.bfloat16, args.reps or 5
    spec = dict(spec, steps=args.steps or spec["steps"])
    if args.methods:
        methods = args.methods.split(",")
    elif args.smoke:
        methods = ["tk:reference", "flex", "sdpa-dense"]
    else:
        methods = [f"tk:{b}" for b, i in tk.available_backends(device).items() if i.available] + list(BASELINES)
    torch.manual_seed(0)
    cfg = ModelConfig(**spec["cfg"])
    model = TransfusionModel(cfg).to(device)
    model.attention_block_tokens = None  # one attention call per layer over the batch, for every method
    with torch.no_grad():  # zero-initialised output layers would hide attention from the loss check
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batch = training_batch(spec, cfg, torch.Generator().manual_seed(0)).to(device)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    )
    sched = model.schedule()
    model.backend = "reference"
    with torch.no_grad():
        reference = tuple(float(x) for x in loss_terms(model, batch, sched))  # fp32, no autocast
    tokens = int(batch.input_ids.numel())
    rows = []
    for method in methods:
        row = {"method": method, "tokens": tokens, "images": len(batch.images), "layers": cfg.n_layers, "dim": cfg.dim}
        try:
            backend, note = method_backend(method, device, stand_in=args.smoke)
            if note:
                row["note"] = note
            with attention_impl(method):
                model.load_state_dict(initial)  # every method checks and trains from the same weights
                model.backend = backend
                model.train()
                row.update(check_losses(model, batch, sched, autocast, reference))
                s = bench_training(model, batch, device, autocast, reps)
                row.update(train_step_s=s, train_tokens_per_s=tokens / s)
                if not args.no_sampling:
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
        root = args.root or (tempfile.gettempdir() if args.smoke else None)
        config = {k: v for k, v in spec.items() if k != "cfg"} | {
            "model": spec["cfg"],
            "dtype": str(dtype),
            "reps": reps,
            "reference_losses": reference,
            "compile_backend": compile_backend(),
            "timing": "median wall time, synchronised",
        }
        out = write_json("model", rows, config, device=device, root=root)  # a cut-off run keeps its rows
    model.backend = None
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
