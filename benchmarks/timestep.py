"""Benchmark: patch timestep embedding (sinusoid + MLP once per image, added to every patch).

Compared, forward and backward (gradients in x and the MLP weights):
  eager      what a diffusers-based model does: Timesteps + TimestepEmbedding + a gather-add
             (diffusers' own modules when importable, else the same ops from tk.timestep_embedding
             and tk.TimestepMLP, which match them exactly; the JSON says which)
  compiled   torch.compile of the reference math written as plain PyTorch
  tk:<name>  tk.patch_timestep_embedding on each backend that can run here

Eager and compiled run under torch.autocast(x.dtype) with fp32 weights, as in mixed-precision
training; tk gets the same fp32 weights (it computes the embedding in fp32).

The op is memory-bound: the forward must read x and write y (2 * P * D * itemsize bytes), the
backward must read dy (P * D * itemsize; dx = dy is free). Achieved bandwidth is reported on that
minimum traffic, next to a measured device copy of x (read + write) as the ceiling.

    python -m benchmarks.timestep              # GPU: Transfusion sizes, JSON in benchmarks/results/
    python -m benchmarks.timestep --smoke      # CPU: tiny shapes, reference backend, checks the harness
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import transfusion_kernels as tk  # noqa: E402
from .common import compile_backend, compile_fn, do_bench, max_error, stand_ins, write_json  # noqa: E402
from transfusion_kernels.backends import BACKENDS  # noqa: E402
from transfusion_kernels.timestep import reference  # noqa: E402

# (P patches, D model width, M images); hidden = D, freq_dim = 256, as DiT / Transfusion.
GPU_SIZES = [
    (4096, 1024, 16),
    (16384, 2048, 64),
    (65536, 1024, 256),
    (65536, 2048, 64),
    (65536, 4096, 64),
    (32768, 4096, 256),
]
SMOKE_SIZES = [(96, 32, 3), (200, 64, 5)]
FREQ_DIM = 256
SMOKE_FREQ_DIM = 16


# ----------------------------------------------------------------------------- implementations


def eager_modules(freq_dim, D, device):
    """(time_proj, time_embedding, source): diffusers' modules, or exact stand-ins."""
    try:
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        return (
            Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0.0),
            TimestepEmbedding(freq_dim, D, out_dim=D).to(device),
            "diffusers",
        )
    except ImportError:
        proj = lambda t: tk.timestep_embedding(t, freq_dim, True, 0.0)  # noqa: E731
        return proj, tk.TimestepMLP(freq_dim, D, D, device=device), "tk.timestep_embedding + tk.TimestepMLP"


def gather_add(x, e, idx):
    return x + torch.where((idx >= 0)[:, None], e.to(x.dtype)[idx.clamp(min=0).long()], 0)


def reference_math(x, t, idx, w1, b1, w2, b2):
    """The op in plain PyTorch (fp32 embedding, one rounding), for torch.compile."""
    e = reference.embed(
        t,
        w1,
        b1,
        w2,
        b2,
        freq_dim=w1.shape[1],
        flip_sin_to_cos=True,
        downscale_freq_shift=0.0,
        scale=1.0,
        max_period=10000.0,
    )
    return (x.float() + reference.gather_rows(e, idx)).to(x.dtype)


def make_case(P, D, M, freq_dim, dtype, device, gen):
    """Inputs in a Transfusion-like layout: text runs between images of varying sizes."""
    sizes = torch.rand(M, generator=gen) + 0.5
    n_img = int(P * 0.9)
    sizes = (sizes / sizes.sum() * n_img).long().clamp(min=1)
    idx = torch.full((P,), -1, dtype=torch.int32)
    gap = max(1, (P - int(sizes.sum())) // (M + 1))
    pos = gap
    for m, n in enumerate(sizes.tolist()):
        n = min(n, P - pos)
        idx[pos : pos + n] = m
        pos += n + gap
    x = torch.randn(P, D, generator=gen).to(device, dtype)
    t = torch.randint(0, 1000, (M,), generator=gen).to(device)
    return x, t, idx.to(device)


def run_case(P, D, M, freq_dim, dtype, device, backends, compile_, warmup, reps, gen):
    """``backends``: {label: backend that runs it} (the reference stands in for one that cannot run
    here in a smoke run)."""
    x, t, idx = make_case(P, D, M, freq_dim, dtype, device, gen)
    dy = torch.randn(P, D, generator=gen).to(device, dtype)
    time_proj, te, eager_source = eager_modules(freq_dim, D, device)
    mlp = tk.TimestepMLP.from_diffusers(te, copy=False) if not isinstance(te, tk.TimestepMLP) else te
    weights = list(mlp.parameters())
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    xb = x.element_size()

    def eager(xr):
        with autocast:
            return gather_add(xr, te(time_proj(t)), idx)

    compiled_fn = compile_fn(reference_math, dynamic=False) if compile_ else None
    impls = {"eager": eager}
    if compiled_fn is not None:
        impls["compiled"] = lambda xr: compiled_fn(xr, t, idx, *mlp.weights())
    for label, b in backends.items():
        impls[f"tk:{label}"] = lambda xr, b=b: tk.patch_timestep_embedding(
            xr, t, idx, mlp, freq_dim=freq_dim, backend=b
        )

    # fp32 oracle on the same inputs: output and gradients (x and the MLP weights)
    x32 = x.detach().float().requires_grad_()
    w32 = [w.detach().float().requires_grad_() for w in mlp.weights()]
    y_ref = reference_math(x32, t, idx, *w32)
    grads_ref = torch.autograd.grad(y_ref, [x32, *w32], dy.float())
    y_ref = y_ref.detach()
    copy_ms = do_bench(lambda: torch.empty_like(x).copy_(x), warmup, reps, device)
    row = {
        "P": P,
        "D": D,
        "M": M,
        "H": D,
        "freq_dim": freq_dim,
        "dtype": str(dtype).replace("torch.", ""),
        "image_patches": int((idx >= 0).sum()),
        "eager_source": eager_source,
        "copy_ms": copy_ms,
        "copy_GBps": 2 * x.numel() * xb / copy_ms / 1e6,
        "impls": {},
    }
    for name, fn in impls.items():
        xr = x.detach().clone().requires_grad_()
        inputs = [xr, *weights]
        y = fn(xr)  # checked before it is timed
        grads = torch.autograd.grad(y, inputs, dy, retain_graph=True)
        check = {
            "max_abs_diff_vs_reference": max_error(y, y_ref),
            "max_abs_diff_grads_vs_reference": max(max_error(g, r) for g, r in zip(grads, grads_ref)),
        }
        if name.startswith("tk:") and backends[name[3:]] != name[3:]:
            check["note"] = "reference standing in"
        fwd = do_bench(lambda: fn(xr), warmup, reps, device)  # builds the autograd graph, as in training
        with torch.no_grad():
            fwd_nograd = do_bench(lambda: fn(xr), warmup, reps, device)
        bwd = do_bench(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), warmup, reps, device)
        fwd_bytes, bwd_bytes = 2 * x.numel() * xb, x.numel() * xb
        row["impls"][name] = {
            "fwd_ms": fwd,
            "fwd_nograd_ms": fwd_nograd,
            "bwd_ms": bwd,
            "fwd_GBps": fwd_bytes / fwd_nograd / 1e6,
            "bwd_GBps": bwd_bytes / bwd / 1e6,
            "fwd_frac_of_copy": (fwd_bytes / fwd_nograd / 1e6) / row["copy_GBps"],
            **check,
        }
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU shapes with the reference backend")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--backends", default=None, help="comma list (default: every backend that can run here)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--sizes", default=None, help="comma list of PxDxM (patches x width x images)")
    ap.add_argument(
        "--root", default=None, help="results folder (default benchmarks/results; a temporary folder for --smoke)"
    )
    args = ap.parse_args(argv)

    if args.smoke:
        device, sizes, freq_dim = torch.device("cpu"), SMOKE_SIZES, SMOKE_FREQ_DIM
        warmup, reps = 1, args.reps or 2
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --smoke on a CPU")
        device, sizes, freq_dim = torch.device("cuda"), GPU_SIZES, FREQ_DIM
        warmup, reps = 5, args.reps or 50
    if args.sizes:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    dtype = getattr(torch, args.dtype)
    wanted = args.backends.split(",") if args.backends else list(BACKENDS)
    backends = stand_ins(wanted, device, stand_in=args.smoke)

    gen = torch.Generator().manual_seed(0)
    root = args.root or (tempfile.gettempdir() if args.smoke else None)
    config = {
        "warmup": warmup,
        "reps": reps,
        "dtype": args.dtype,
        "backends": backends,
        "freq_dim": freq_dim,
        "compile_backend": compile_backend(),
        "oracle": "fp32 reference math on the same inputs",
        "timing": "median; triton.testing.do_bench on a GPU, perf_counter on a CPU",
    }
    rows = []
    for P, D, M in sizes:
        row = run_case(P, D, M, freq_dim, dtype, device, backends, not args.no_compile, warmup, reps, gen)
        rows.append(row)
        out = write_json("timestep", rows, config, device=device, root=root)  # a cut-off run keeps its rows
        for name, r in row["impls"].items():
            print(
                f"P={P:6d} D={D:5d} M={M:4d} {name:14s} fwd {r['fwd_nograd_ms']:8.4f} ms "
                f"({r['fwd_GBps']:7.1f} GB/s, {100 * r['fwd_frac_of_copy']:5.1f}% of copy)  "
                f"fwd+graph {r['fwd_ms']:8.4f} ms  bwd {r['bwd_ms']:8.4f} ms  "
                f"max|diff| {r['max_abs_diff_vs_reference']:.2e}",
                flush=True,
            )

    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
