"""Time a few candidate configs of each Triton attention kernel on this GPU; write the winners.

    python -m benchmarks.tune                # D 64 and 128, float16 and bfloat16, on the GPU
    python -m benchmarks.tune --short        # D 128 bfloat16, two candidates per kernel, shorter timing
    python -m benchmarks.tune --out FILE     # default: benchmarks/results/<device>-<date>/tuned_attention.json
    python -m benchmarks.tune --dry-run      # CPU under TRITON_INTERPRET=1, tiny shapes: every code
                                             # path, no timing (the JSON says so)

The workload is an 8k-token Transfusion mix (documents of 2048 tokens with images of 256 and
1024 patches, benchmarks/attention.py), 16 query heads, GQA 4:1. Each candidate is first held to
the reference backend (fp32 math) by the tests' rule (error <= 2x the error of dense attention
computed by PyTorch in the inputs' dtype, plus a floor) on a 4k-token mix (2k with --short);
failing candidates are reported and never win. The forward candidates are timed with the default
backward configs; the dk/dv candidates by the whole backward with the default dq; the dq
candidates with the dk/dv winner. Times are triton.testing.do_bench medians.

The output is keyed by (device name, head dim, dtype); point TRANSFUSION_KERNELS_TUNED at it to
use it (transfusion_kernels/attention/configs.json holds the untimed shipped defaults).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Candidates per (arch, padded head dim), shared by float16 and bfloat16: (block_m, block_n,
# warps, stages[, flags]), the shipped default first and, on sm90, the other contender second
# (--short times these two); flags (transfusion_kernels.attention.triton) TMA = 1 loads the
# forward's and dq's K/V tiles through tensor descriptors, KT = 2 accumulates dk/dv transposed.
# All compile without register spills for their arch (triton 3.9, sm_90a and sm_80, with the
# JIT's divisibility specialisation). block_m is query rows, block_n key rows; the program tile is fwd/dq block_m and dk/dv block_n. Triton 3.9's
# automatic warp specialisation (tl.range(..., warp_specialize=True)) is not a candidate: on
# sm_90 it leaves a loop with a branch in its body (the PARTIAL tiles' masking) unpartitioned,
# and fails to compile a kernel with a second loop beside the specialised one.
CANDIDATES = {
    ("sm90", 64): {
        "fwd": [(128, 128, 8, 2, 1), (128, 64, 8, 3), (128, 64, 8, 3, 1)],
        "dkdv": [(128, 64, 8, 2, 2), (32, 128, 8, 3), (64, 128, 8, 3)],
        "dq": [(128, 64, 8, 2, 1), (128, 64, 8, 3), (64, 64, 4, 3)],
    },
    ("sm90", 128): {
        "fwd": [(128, 128, 8, 2, 1), (128, 64, 8, 3), (128, 64, 8, 3, 1)],
        "dkdv": [(128, 64, 8, 2, 2), (32, 128, 8, 3), (128, 64, 8, 3, 2)],
        "dq": [(128, 64, 8, 2, 1), (128, 64, 8, 2), (128, 64, 8, 3, 1)],
    },
    ("sm80", 64): {
        "fwd": [(128, 64, 8, 3), (64, 64, 4, 3)],
        "dkdv": [(32, 128, 8, 3), (32, 64, 4, 3)],
        "dq": [(128, 64, 8, 3), (64, 64, 4, 3)],
    },
    ("sm80", 128): {
        "fwd": [(128, 64, 8, 3), (64, 64, 4, 3)],
        "dkdv": [(32, 64, 8, 3), (32, 64, 4, 2)],
        "dq": [(64, 64, 4, 3), (64, 32, 4, 3)],
    },
}
KEYS = [(d, dt) for d in (64, 128) for dt in ("float16", "bfloat16")]
SHORT_KEYS = [(128, "bfloat16")]
DRY_RUN_KEYS = [(64, "bfloat16")]
FLOOR = {"float16": 1e-4, "bfloat16": 1e-3}  # as tests/attention/test_attention_triton.py
HQ, HKV = 16, 4
TOKENS, CHECK_TOKENS = 8192, 4096


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.tune", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON file to write (default: under benchmarks/results/)")
    p.add_argument(
        "--short",
        action="store_true",
        help="D 128 bfloat16 only, two candidates per kernel, 2k-token check, shorter timing",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, TRITON_INTERPRET=1, tiny shapes: runs every code path, times nothing",
    )
    return p


def _interpreted_module_loaded() -> bool | None:
    """Whether the triton kernels were already imported interpreted (None: not imported yet)."""
    mod = sys.modules.get("transfusion_kernels.attention.triton")
    return None if mod is None else mod._INTERPRETED


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.dry_run:
        loaded = _interpreted_module_loaded()
        if loaded is False:  # compiled kernels already imported here: interpret in a fresh process
            cmd = [sys.executable, "-m", f"{__package__}.tune"] + list(argv if argv is not None else sys.argv[1:])
            path = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
            return subprocess.run(cmd, env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)).returncode
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined (first import)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks.tune: no CUDA device; run on a GPU, or use --dry-run on a CPU", file=sys.stderr)
        return 2
    return _tune(args)


def _arch(device) -> str:
    """The candidate list: sm90 for Hopper and the dry run, sm80 for the other GPUs."""
    import torch

    return "sm80" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9 else "sm90"


def _workload(n_tokens: int, device, dry_run: bool):
    from .attention import build_mask

    if dry_run:  # documents of 32 tokens with images of 4 and 8 patches: FULL and PARTIAL blocks
        mask, _, spans = build_mask("mix", n_tokens, device, doc_len=32, image_sizes=(4, 8))
    else:
        mask, _, spans = build_mask("mix", n_tokens, device)
    return mask, len(spans)


def _inputs(n, hq, hkv, d, dtype, device, seed):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, hq, d, device=device, generator=gen).to(dtype)
    k = torch.randn(n, hkv, d, device=device, generator=gen).to(dtype)
    v = torch.randn(n, hkv, d, device=device, generator=gen).to(dtype)
    dout = torch.randn(n, hq, d, device=device, generator=gen).to(dtype)
    return q, k, v, dout


def _dense_same_dtype(q, k, v, dout, allowed, scale):
    """Dense softmax attention and its gradients computed by PyTorch in the inputs' dtype: the
    error that the 2x rule allows twice over."""
    import torch

    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("ihd,jhd->hij", q, k.repeat_interleave(g, 1)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s.float(), -1)
    out = torch.einsum("hij,jhd->ihd", torch.softmax(s, -1).nan_to_num(0.0), v.repeat_interleave(g, 1))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return [out.detach(), lse, *grads]


class _Check:
    """The oracle (the reference backend's fp32 math on the inputs, results kept in float64) and
    the same-dtype PyTorch error on one mask."""

    def __init__(self, mask, q, k, v, dout, scale, dtype_name):
        import torch

        from transfusion_kernels.attention import reference

        self.mask, self.inputs, self.scale, self.floor = mask, (q, k, v, dout), scale, FLOOR[dtype_name]
        q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
        args = (mask.starts, mask.ends, reference.prepare(mask, q64, k64), scale)
        out, lse = reference.forward(q64, k64, v64, *args)
        self.oracle = [out, lse, *reference.backward(do64, q64, k64, v64, out, lse, *args)]
        low = _dense_same_dtype(q, k, v, dout, mask.to_dense(), scale)
        self.allowed = [self._err(a, b) for a, b in zip(low, self.oracle)]
        del low
        if q.is_cuda:
            torch.cuda.empty_cache()

    @staticmethod
    def _err(got, want) -> float:
        import torch

        got, want = got.double(), want.double()
        finite = torch.isfinite(want)  # lse is -inf on empty rows: both must agree there
        if not torch.equal(torch.isfinite(got), finite) or not torch.equal(got[~finite], want[~finite]):
            return float("inf")
        return (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0

    def failures(self, cfg) -> list[str]:
        """Names of the results that break the 2x rule for this config (empty: it passes)."""
        from transfusion_kernels.attention import triton as tkt

        q, k, v, dout = self.inputs
        args = (self.mask.starts, self.mask.ends, tkt.prepare(self.mask, q, k, cfg), self.scale)
        out, lse = tkt.forward(q, k, v, *args)
        got = [out, lse, *tkt.backward(dout, q, k, v, out, lse, *args)]
        bad = []
        for name, g, o, base in zip(("out", "lse", "dq", "dk", "dv"), got, self.oracle, self.allowed):
            err = self._err(g, o)
            if not err <= 2 * base + self.floor:
                bad.append(f"{name} error {err:.3g} > 2 x {base:.3g} + {self.floor:g}")
        return bad


def _tune_key(d, dtype_name, device, args, log) -> dict:
    """Check and time the candidates of one (head dim, dtype); the entry for the output file."""
    import torch

    from .common import do_bench
    from transfusion_kernels.attention import triton as tkt

    dtype = getattr(torch, dtype_name)
    arch = _arch(device)
    cands = CANDIDATES[(arch, d)]
    if args.short:  # the default and the first alternative of each kernel
        cands = {kernel: c[:2] for kernel, c in cands.items()}
    default = tkt.AttentionConfig(*(tkt.KernelConfig(*cands[k][0]) for k in ("fwd", "dkdv", "dq")))
    hq, hkv = (2, 1) if args.dry_run else (HQ, HKV)
    tokens, check_tokens = (64, 64) if args.dry_run else (TOKENS, CHECK_TOKENS // 2 if args.short else CHECK_TOKENS)
    scale = d**-0.5

    cmask, _ = _workload(check_tokens, device, args.dry_run)
    check = _Check(cmask, *_inputs(check_tokens, hq, hkv, d, dtype, device, seed=1), scale, dtype_name)
    mask, images = _workload(tokens, device, args.dry_run)
    q, k, v, dout = _inputs(tokens, hq, hkv, d, dtype, device, seed=0)
    warmup, rep = (10, 40) if args.short else (25, 100)

    def time_ms(cfg, backward: bool):
        a = (mask.starts, mask.ends, tkt.prepare(mask, q, k, cfg), scale)
        out, lse = tkt.forward(q, k, v, *a)
        fn = (lambda: tkt.backward(dout, q, k, v, out, lse, *a)) if backward else (lambda: tkt.forward(q, k, v, *a))
        if args.dry_run:  # one call for the code path; an interpreter's time means nothing
            fn()
            return None
        return do_bench(fn, warmup=warmup, rep=rep, device=device)

    best = {"fwd": default.fwd, "dkdv": default.dkdv, "dq": default.dq}
    rows = []
    for kernel in ("fwd", "dkdv", "dq"):  # dq is timed with the dk/dv winner
        timed = []
        for c in cands[kernel]:
            kc = tkt.KernelConfig(*c)
            cfg = tkt.AttentionConfig(**dict(best, **{kernel: kc}))
            row = {"kernel": kernel, "config": list(c)}
            try:
                bad = check.failures(cfg)
                if bad:
                    row["error"] = "; ".join(bad)
                else:
                    row["ms"] = time_ms(cfg, backward=kernel != "fwd")
                    timed.append((row["ms"], kc))
            except Exception as e:  # noqa: BLE001 - a candidate that does not build or run loses
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows.append(row)
            what = row.get("error") or ("ran (dry run)" if row.get("ms") is None else f"{row['ms']:.3f} ms")
            log(f"D={d} {dtype_name:8s} {kernel:4s} {c}: {what}")
        if not timed:
            raise RuntimeError(f"D={d} {dtype_name}: no {kernel} candidate passed the check")
        if not args.dry_run:  # a dry run keeps the defaults: nothing was timed
            best[kernel] = min(timed, key=lambda t: t[0])[1]
    entry = {
        "device": _device_name(device),
        "head_dim": d,
        "dtype": dtype_name,
        **{k: best[k].to_list() for k in ("fwd", "dkdv", "dq")},
        "arch": arch,
        "workload": {
            "layout": "mix",
            "tokens": tokens,
            "images": images,
            "hq": hq,
            "hkv": hkv,
            "check_tokens": check_tokens,
        },
        "candidates": rows,
    }
    return entry


def _device_name(device) -> str:
    from .common import device_name

    return device_name(device)


def _tune(args) -> int:
    import torch

    from .common import environment, results_path

    device = torch.device("cpu" if args.dry_run else "cuda")
    keys = DRY_RUN_KEYS if args.dry_run else SHORT_KEYS if args.short else KEYS
    out_path = args.out or results_path("tuned_attention" + ("_dry_run" if args.dry_run else ""), device)

    def log(msg):
        print(msg, flush=True)

    entries, failed = [], []
    for d, dtype_name in keys:
        try:
            entries.append(_tune_key(d, dtype_name, device, args, log))
        except RuntimeError as e:
            failed.append(str(e))
            log(f"FAILED {e}")
    data = {
        "format": 1,
        "measured": not args.dry_run,
        "dry_run": args.dry_run,
        "source": (
            "dry run under the Triton interpreter: code paths only, nothing timed, not a tuning result"
            if args.dry_run
            else f"python -m benchmarks.tune{' --short' if args.short else ''}: triton.testing.do_bench medians "
            f"on {_device_name(device)}, {_dt.date.today().isoformat()}"
        ),
        "environment": environment(device),
        "configs": entries,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    log(f"wrote {out_path}" + ("" if args.dry_run else f" (use it with TRANSFUSION_KERNELS_TUNED={out_path})"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
