"""Benchmark: the fused diffusion ops (add_noise, DDPM step, DDIM step).

Compared on each case:
  diffusers   diffusers' eager DDPMScheduler / DDIMScheduler (.step with its own torch.randn
              noise; add_noise after torch.randn_like), where diffusers is importable and the
              case has one timestep per batch element (it has no per-patch timesteps)
  compiled    torch.compile of the reference affine step with the same coefficients; its noise
              comes from torch.randn_like inside the compiled function (inductor's own fused RNG:
              compiling the reference's int64 Philox did not finish within 10 minutes on a CPU)
  tk:<name>   the public op (tk.add_noise / tk.ddpm_step / tk.ddim_step) on each backend,
              coefficient preparation included
  kernel:<name>  the backend's affine_step alone, coefficients prepared once

Every op is one memory-bound pass: add_noise reads x0 and writes x_t and the drawn noise, a step
reads sample and model_output and writes x_prev (noise is drawn in the kernel). Achieved
bandwidth = those bytes / median time, next to a measured device copy
(``torch.empty_like(x).copy_(x)``: read + write) as the ceiling.

    python -m benchmarks.diffusion            # GPU: latents and 64 MB+ tensors, JSON in benchmarks/results/
    python -m benchmarks.diffusion --smoke    # CPU: tiny shapes on the reference, checks the harness

Timing, environment record and JSON come from ``benchmarks/common.py`` (``do_bench``: medians of
``triton.testing.do_bench`` on a GPU, L2 flushed between runs; wall-clock medians on a CPU).
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
from transfusion_kernels import diffusion as tkd  # noqa: E402
from transfusion_kernels.diffusion import AFFINE_STEP, reference  # noqa: E402

# (name, shape, dtype, per_row): per_row = one timestep per row of a packed batch of patches
GPU_CASES = [
    ("latents 16x4x64x64", (16, 4, 64, 64), torch.float32, False),
    ("latents 16x4x64x64", (16, 4, 64, 64), torch.bfloat16, False),
    ("64 MB", (64, 4, 256, 256), torch.float32, False),
    ("64 MB", (128, 4, 256, 256), torch.bfloat16, False),
    ("256 MB", (256, 4, 256, 256), torch.float32, False),
    ("packed patches 1M x 64 (128 MB)", (1 << 20, 64), torch.bfloat16, True),
]
SMOKE_CASES = [
    ("latents 2x4x8x8", (2, 4, 8, 8), torch.float32, False),
    ("packed patches 64 x 16", (64, 16), torch.bfloat16, True),
]
SEED = 1234


# ----------------------------------------------------------------------------- the cases


def diffusers_baselines(x, m, t_rows, t_scalar, per_row):
    """{op: fn} with diffusers' eager schedulers, or {} where it cannot run the case."""
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
    except ImportError:
        return {}
    ddpm = DDPMScheduler(clip_sample=True)
    ddim = DDIMScheduler(clip_sample=True)
    ddim.set_timesteps(50)
    out = {"add_noise": lambda: ddpm.add_noise(x, torch.randn_like(x), t_rows)}
    if not per_row:
        out["ddpm_step"] = lambda: ddpm.step(m, t_scalar, x).prev_sample
        out["ddim_step"] = lambda: ddim.step(m, t_scalar, x, eta=0.0).prev_sample
    return out


def run_case(name, shape, dtype, per_row, device, backends, compile_, bench, gen):
    sched = tk.DiffusionSchedule()
    x = torch.randn(shape, generator=gen).to(device, dtype)
    m = torch.randn(shape, generator=gen).to(device, dtype)
    R = shape[0]
    t_rows = torch.randint(1, 1000, (R,), generator=gen).to(device)
    t_scalar = 500  # DDIM with 50 steps visits it; DDPM: prev = 499
    t_step = t_rows if per_row else t_scalar
    prev_ddim = (t_rows - 20) if per_row else t_scalar - 20

    # op: (public call on backend b, model_output of the kernel call, whether noise is returned);
    # every op reads two tensors and writes one, or reads one and writes two (add_noise)
    ops = {
        "add_noise": (lambda b: tk.add_noise(x, t_rows, sched, seed=SEED, backend=b), None, True),
        "ddpm_step": (lambda b: tk.ddpm_step(m, t_step, x, sched, clip_sample=True, seed=SEED, backend=b), m, False),
        "ddim_step": (
            lambda b: tk.ddim_step(m, t_step, x, sched, prev_timestep=prev_ddim, clip_sample=True, backend=b),
            m,
            False,
        ),
    }
    nbytes = 3 * x.numel() * x.element_size()
    coefs = coefficients(sched, t_rows, t_step, prev_ddim, R, device)
    baselines = diffusers_baselines(x, m, t_rows, t_scalar, per_row)
    compiled = compile_fn(compiled_step, dynamic=False) if compile_ else None

    row = case_row(name, x, bench, per_row_timesteps=per_row)
    with torch.no_grad():
        for op, (public, mo, ret_noise) in ops.items():
            coef, clip, has_noise = coefs[op]
            impls = {}
            if op in baselines:
                impls["diffusers"] = baselines[op]
            if compiled is not None:
                impls["compiled"] = lambda: compiled(x, mo, coef, clip, has_noise, ret_noise)
            for label, b in backends.items():
                impls[f"tk:{label}"] = lambda b=b: public(b)
                mod = AFFINE_STEP.module(b)
                impls[f"kernel:{label}"] = lambda mod=mod: mod.affine_step(
                    x, mo, coef, None, SEED, clip, ret_noise, has_noise=has_noise
                )
            # the kernels draw the reference's noise (same seed); the baselines draw torch's
            # own, so only the noise-free DDIM step compares
            time_impls(
                row,
                op,
                impls,
                first(public("reference")),
                nbytes,
                backends,
                bench,
                comparable=lambda impl: ":" in impl or op == "ddim_step",
            )
    return row


def case_row(name, x, bench, **extra) -> dict:
    """A case's result row, with the device copy of ``x``: the bandwidth every op is held to."""
    n, item = x.numel(), x.element_size()
    copy_ms = bench(lambda: torch.empty_like(x).copy_(x))
    return {
        "case": name,
        "shape": list(x.shape),
        "dtype": str(x.dtype).replace("torch.", ""),
        **extra,
        "copy_ms": copy_ms,
        "copy_GBps": 2 * n * item / copy_ms / 1e6,
        "ops": {},
    }


def time_impls(row, op, impls, expected, nbytes, backends, bench, comparable) -> None:
    """Check each implementation of ``op`` against the reference output ``expected`` (those
    ``comparable(impl)`` draws the same noise), then time it; record it in ``row`` and print a line."""
    results = {}
    for impl, fn in impls.items():
        check = {}
        if comparable(impl):
            check["max_abs_diff_vs_reference"] = max_error(first(fn()), expected)
        else:
            check["check"] = "own RNG: not comparable"
        label = impl.split(":", 1)[-1]
        if ":" in impl and backends[label] != label:
            check["note"] = "reference standing in"
        ms = bench(fn)
        gbps = nbytes / ms / 1e6
        results[impl] = {"median_ms": ms, "GBps": gbps, "frac_of_copy": gbps / row["copy_GBps"], **check}
        print(
            f"{row['case']:32s} {row['dtype']:8s} {op:10s} {impl:18s} {ms:9.4f} ms {gbps:8.1f} GB/s "
            f"({100 * gbps / row['copy_GBps']:5.1f}% of copy)",
            flush=True,
        )
    row["ops"][op] = {"bytes": nbytes, "impls": results}


def first(out):
    return out[0] if isinstance(out, tuple) else out


def compiled_step(sample, model_output, coef, clip, has_noise, return_noise):
    """The reference step with torch's RNG drawn inside, for torch.compile."""
    noise = torch.randn_like(sample) if has_noise else None
    out, _ = reference.affine_step(sample, model_output, coef, noise, 0, clip, False, has_noise=False)
    return (out, noise) if return_noise else out


def coefficients(sched, t_rows, t_step, prev_ddim, R, device):
    """Per op: (coef [R, 6] float32, clip_range, has_noise), built as the public functions do."""
    return {
        "add_noise": (tkd.add_noise_coef(t_rows, R, sched, device)[0], None, True),
        "ddpm_step": (tkd.ddpm_coef(t_step, R, sched, device)[0], 1.0, True),
        "ddim_step": (tkd.ddim_coef(t_step, R, sched, device, prev_ddim)[0], 1.0, False),
    }


def run_suite(name, doc, argv, smoke_cases, gpu_cases, run_case, extra_config=None):
    """The command line and case loop shared by the elementwise suites (diffusion, flow):
    ``run_case(*case, device, backends, compile, bench, gen)`` returns one result row."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU shapes with the reference backend")
    ap.add_argument("--backends", default=None, help="comma list (default: every backend that can run here)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--reps", type=int, default=None, help="timed calls on a CPU, milliseconds of timing on a GPU")
    ap.add_argument("--cases", default=None, help="comma list of indices into the GPU (or --smoke) cases")
    ap.add_argument(
        "--root", default=None, help="results folder (default benchmarks/results; a temporary folder for --smoke)"
    )
    args = ap.parse_args(argv)

    if args.smoke:
        device, cases, reps = torch.device("cpu"), smoke_cases, args.reps or 5
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --smoke on a CPU")
        device, cases, reps = torch.device("cuda"), gpu_cases, args.reps or 100
    if args.cases:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    wanted = args.backends.split(",") if args.backends else [b for b in BACKENDS if AFFINE_STEP.has(b)]
    backends = stand_ins(wanted, device, stand_in=args.smoke)

    # On a GPU warmup and rep are milliseconds (triton's do_bench); on the CPU, calls.
    warmup = 2 if args.smoke else 25

    def bench(fn):
        return do_bench(fn, warmup=warmup, rep=reps, device=device)

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    config = {
        "warmup": warmup,
        "rep": reps,
        "seed": SEED,
        "backends": backends,
        "compile": not args.no_compile,
        "compile_backend": compile_backend(),
        "diffusers": diffusers_version,
        "smoke": args.smoke,
        **(extra_config or {}),
    }
    root = args.root or (tempfile.gettempdir() if args.smoke else None)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in cases:
        rows.append(run_case(*case, device, backends, not args.no_compile, bench, gen))
        out = write_json(name, rows, config, device=device, root=root)  # a cut-off run keeps its rows
    print(f"wrote {out}")
    return rows


def main(argv=None):
    return run_suite("diffusion", __doc__, argv, SMOKE_CASES, GPU_CASES, run_case)


if __name__ == "__main__":
    main()
