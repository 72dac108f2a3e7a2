"""Mutation check of the Triton kernels' tests: do the tests catch plausible bugs?

Each mutant is one textual patch (an off-by-one at an interval end, swapped operands, a row
pointer that ignores the program id, a dropped term) of one file of a temporary copy of the
package. The relevant fast tests run against that copy in a subprocess (PYTHONPATH points at the
copy, so the checkout is never modified) under the Triton interpreter. A mutant the tests pass
"survives". Before the mutants, every test selection must pass on the unmodified copy.

    python scripts/mutants.py                 # all mutants; exit 1 if any survives
    python scripts/mutants.py --only affine,masks   # mutants whose name contains "affine" or "masks"
    python scripts/mutants.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments (files and -k), relative to the repository root


TS = "transfusion_kernels/timestep/triton.py"
DF = "transfusion_kernels/diffusion/triton.py"
ATT = "transfusion_kernels/attention/triton.py"
PLAN = "transfusion_kernels/attention/plan.py"

TS_KERNELS = ("tests/timestep/test_timestep.py", "-k", "triton and (kernel or many_programs or flip or add_rows)")
TS_PUBLIC = ("tests/timestep/test_timestep.py", "-k", "triton and (many_programs or flip or segment or add_rows)")
DF_AFFINE = (
    "tests/diffusion/test_kernels.py",
    "tests/diffusion/test_steps.py",
    "-k",
    "triton and (affine or philox_high_counter)",
)
TS_SEGMENT = ("tests/timestep/test_timestep.py", "-k", "triton and segment_sum_kernel")
DF_LOSS = ("tests/diffusion/test_kernels.py", "-k", "triton and loss")
ATT_TESTS = ("tests/attention/test_attention.py", "-k", "triton and layouts")
ATT_UNION = ("tests/attention/test_attention.py", "-k", "triton and (union or softcap)")
MASK_TESTS = ("tests/test_masks.py",)

MUTANTS = [
    # ---- timestep: sinusoid
    Mutant(
        "timestep sinusoid: sin and cos swapped when flip_sin_to_cos",
        TS,
        "v = tl.where(second[None, :], tl.sin(r), tl.cos(r))",
        "v = tl.where(second[None, :], tl.cos(r), tl.sin(r))",
        TS_KERNELS,
    ),
    Mutant(
        "timestep sinusoid: second half starts one column late",
        TS,
        "second = cols >= half",
        "second = cols > half",
        TS_KERNELS,
    ),
    Mutant(
        "timestep sinusoid: odd-dim pad column not zeroed",
        TS,
        "valid = cols < 2 * half",
        "valid = cols <= 2 * half",
        TS_KERNELS,
    ),
    Mutant(
        "timestep sinusoid: low part of the 2 pi reduction dropped",
        TS,
        "r = (arg - n * _2PI_HI) - n * _2PI_LO",
        "r = arg - n * _2PI_HI",
        TS_KERNELS,
    ),
    Mutant(
        "timestep sinusoid: row pointer ignores the program id",
        TS,
        "    rm = tl.program_id(0) * BM + tl.arange(0, BM)\n    cols = tl.program_id(1) * BD",
        "    rm = tl.arange(0, BM)\n    cols = tl.program_id(1) * BD",
        TS_KERNELS,
    ),
    # ---- timestep: hidden layer
    Mutant(
        "timestep hidden: row pointer ignores the program id",
        TS,
        "    rm = tl.program_id(0) * BM + tl.arange(0, BM)\n    rh = ",
        "    rm = tl.arange(0, BM)\n    rh = ",
        TS_PUBLIC,
    ),
    Mutant(
        "timestep hidden: hidden column pointer ignores the program id",
        TS,
        "rh = tl.program_id(1) * BH + tl.arange(0, BH)",
        "rh = tl.arange(0, BH)",
        TS_PUBLIC,
    ),
    Mutant(
        "timestep hidden: bias b1 dropped",
        TS,
        "        acc += tl.load(b1_ptr + rh, mask=rh < H, other=0.0).to(tl.float32)[None, :]\n",
        "        acc += 0.0\n",
        TS_PUBLIC,
    ),
    Mutant(
        "timestep hidden: SiLU derivative uses sig for 1 - sig",
        TS,
        "sig * (1.0 + acc * (1.0 - sig))",
        "sig * (1.0 + acc * sig)",
        TS_PUBLIC,
    ),
    # ---- timestep: add pass
    Mutant(
        "timestep add: image 0 treated as text",
        TS,
        "has = (idx >= 0) & (idx < M)",
        "has = (idx > 0) & (idx < M)",
        TS_PUBLIC,
    ),
    Mutant(
        "timestep add: column pointer ignores the program id",
        TS,
        "    cols = tl.program_id(1) * BD + tl.arange(0, BD)\n    pmask = rp < P",
        "    cols = tl.arange(0, BD)\n    pmask = rp < P",
        TS_PUBLIC,
    ),
    Mutant(
        "timestep add: bf16 rounding half-up instead of half-even",
        TS,
        "u = u + 0x7FFF + ((u >> 16) & 1)",
        "u = u + 0x7FFF",
        TS_PUBLIC,
    ),
    # ---- timestep: segment sum
    Mutant("timestep segment sum: piece end inclusive", TS, "rmask = r < end", "rmask = r <= end", TS_SEGMENT),
    Mutant(
        "timestep segment sum: image's last partial row included twice (end inclusive)",
        TS,
        "mask=(p < hi)[:, None] & cmask[None, :]",
        "mask=(p <= hi)[:, None] & cmask[None, :]",
        TS_SEGMENT,
    ),
    Mutant(
        "timestep segment sum: image's first partial row skipped",
        TS,
        "lo = tl.load(off_ptr + m)\n",
        "lo = tl.load(off_ptr + m) + 1\n",
        TS_SEGMENT,
    ),
    Mutant(
        "timestep segment sum: pieces cross image ends",
        TS,
        "end = torch.minimum(start + rows, seg_end[m])",
        "end = start + rows",
        TS_SEGMENT,
    ),
    # ---- diffusion: affine step
    Mutant(
        "diffusion affine: coefficient row pointer ignores the program id",
        DF,
        "cptr = coef_ptr + rows * 6",
        "cptr = coef_ptr + tl.arange(0, BLOCK_R) * 6",
        DF_AFFINE,
    ),
    Mutant(
        "diffusion affine: column pointer ignores the program id",
        DF,
        "cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)",
        "cols = tl.arange(0, BLOCK_L)",
        DF_AFFINE,
    ),
    Mutant(
        "diffusion affine: column mask inclusive at the row end",
        DF,
        "mask = rmask[:, None] & (cols < L)[None, :]\n    offs",
        "mask = rmask[:, None] & (cols <= L)[None, :]\n    offs",
        DF_AFFINE,
    ),
    Mutant("diffusion affine: c0 and c1 swapped", DF, "x0 = x0 + c1 * m", "x0 = x0 + c0 * m", DF_AFFINE),
    Mutant(
        "diffusion affine: clamp drops its lower bound",
        DF,
        "x0 = tl.minimum(tl.maximum(x0, -clip), clip)",
        "x0 = tl.minimum(x0, clip)",
        DF_AFFINE,
    ),
    Mutant(
        "diffusion affine: model_output term dropped",
        DF,
        "        out = out + c4 * m\n",
        "        out = out + 0.0 * m\n",
        DF_AFFINE,
    ),
    Mutant("diffusion affine: c3 and c2 swapped", DF, "out = c2 * x0 + c3 * s", "out = c3 * x0 + c2 * s", DF_AFFINE),
    Mutant("diffusion philox: key words swapped", DF, "c2 = hi0 ^ c3 ^ k1", "c2 = hi0 ^ c3 ^ k0", DF_AFFINE),
    Mutant(
        "diffusion philox: counter high word dropped",
        DF,
        "c1 = (offs >> 32).to(tl.uint32)",
        "c1 = (offs >> 33).to(tl.uint32)",
        DF_AFFINE,
    ),
    # ---- diffusion: loss
    # ---- attention forward and backward
    Mutant(
        "attention fwd: interval end inclusive",
        ATT,
        "                    vis = (cols[None, :] >= kvs[:, None]) & (cols[None, :] < kve[:, None])\n"
        "                    qk = tl.where",
        "                    vis = (cols[None, :] >= kvs[:, None]) & (cols[None, :] <= kve[:, None])\n"
        "                    qk = tl.where",
        ATT_TESTS,
    ),
    Mutant(
        "attention fwd: rescale factor with swapped operands",
        ATT,
        "alpha = tl.math.exp2(m_i - m_sub)",
        "alpha = tl.math.exp2(m_sub - m_i)",
        ATT_TESTS,
    ),
    Mutant(
        "attention fwd: running sum not rescaled (dropped term)",
        ATT,
        "l_i = l_i * alpha + tl.sum(p, 1)",
        "l_i = l_i + tl.sum(p, 1)",
        ATT_TESTS,
    ),
    Mutant(
        "attention fwd: rows of intervals and output from the program id, not the tile order",
        ATT,
        '    m_i = tl.full([BM], float("-inf"), tl.float32)',
        "    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)\n    row_ok = offs_m < Nq\n"
        '    m_i = tl.full([BM], float("-inf"), tl.float32)',
        ATT_TESTS,
    ),
    Mutant(
        "attention dk/dv: interval start exclusive",
        ATT,
        "v = (cols[:, None] >= s[None, :]) & (cols[:, None] < e[None, :])",
        "v = (cols[:, None] > s[None, :]) & (cols[:, None] < e[None, :])",
        ATT_TESTS,
    ),
    # the two backward kernels compute ds alike: each patch names the kernel by the GEMM after it
    Mutant(
        "attention dq: ds without delta",
        ATT,
        "ds = p * (dp - delta[:, None])\n            if SOFTCAP:\n                ds = ds * dcap\n            dq = _dot(",
        "ds = p * dp\n            if SOFTCAP:\n                ds = ds * dcap\n            dq = _dot(",
        ATT_TESTS,
    ),
    Mutant(
        "attention dk/dv transposed: ds without delta",
        ATT,
        "ds = p * (dp - delta[:, None])\n            if SOFTCAP:\n                ds = ds * dcap\n            dk = _dot(tl.trans(q)",
        "ds = p * dp\n            if SOFTCAP:\n                ds = ds * dcap\n            dk = _dot(tl.trans(q)",
        ATT_TESTS,
    ),
    # ---- attention over unions of intervals, softcap
    Mutant(
        "attention fwd union: every run tests slot 0's interval",
        ATT,
        "kvs = tl.load(KVS + offs_m * NI + r, mask=row_ok, other=0)\n        kve = tl.load(KVE + offs_m * NI + r,",
        "kvs = tl.load(KVS + offs_m * NI + 0, mask=row_ok, other=0)\n        kve = tl.load(KVE + offs_m * NI + 0,",
        ATT_UNION,
    ),
    Mutant(
        "attention fwd union: softcap run's interval end inclusive",
        ATT,
        "                    vis = (cols[None, :] >= kvs[:, None]) & (cols[None, :] < kve[:, None])\n"
        "                    z = tl.where",
        "                    vis = (cols[None, :] >= kvs[:, None]) & (cols[None, :] <= kve[:, None])\n"
        "                    z = tl.where",
        ATT_UNION,
    ),
    Mutant(
        "attention fwd union: run table read one slot off",
        ATT,
        "    for r in tl.static_range(NI):\n        kv_lo = tl.load(TAB + (tile * NI + r) * 4)\n",
        "    for r in tl.static_range(NI):\n        kv_lo = tl.load(TAB + (tile * NI + (r + 1) % NI) * 4)\n",
        ATT_UNION,
    ),
    Mutant(
        "attention dk/dv union: only the first interval tested",
        ATT,
        "    for r in tl.static_range(NI):\n        s = tl.load(S + rows * NI + r",
        "    for r in tl.static_range(1):\n        s = tl.load(S + rows * NI + r",
        ATT_UNION,
    ),
    Mutant(
        "attention dq union: run's interval start exclusive",
        ATT,
        "                vis = (cols[None, :] >= kvs[:, None]) & (cols[None, :] < kve[:, None])\n"
        "                p = tl.where(vis, p, 0.0)",
        "                vis = (cols[None, :] > kvs[:, None]) & (cols[None, :] < kve[:, None])\n"
        "                p = tl.where(vis, p, 0.0)",
        ATT_UNION,
    ),
    Mutant("attention softcap: derivative 1 + tanh^2", ATT, "dcap = 1.0 - t * t", "dcap = 1.0 + t * t", ATT_UNION),
    Mutant(
        "attention softcap: the cap's scale dropped from the forward logits",
        ATT,
        "z = _tanh(qk * cap_in) * cap_out",
        "z = _tanh(qk * cap_in) * LOG2E",
        ATT_UNION,
    ),
    # ---- tile plans
    Mutant(
        "plan: query run's full range from the wrong bound",
        PLAN,
        "full_lo = tiled(s, 0).amax(1)",
        "full_lo = tiled(s, 0).amin(1)",
        MASK_TESTS,
    ),
    Mutant(
        "plan: union run bounds include empty slots",
        PLAN,
        "lo = tiled(torch.where(nonempty, s, INT32_MAX), INT32_MAX).amin(1)",
        "lo = tiled(torch.where(nonempty, s, INT32_MAX), INT32_MAX).amin(1) + 1",
        MASK_TESTS,
    ),
    Mutant(
        "plan: key tile's last query off by one",
        PLAN,
        "q_hi = torch.searchsorted(s, n1, right=False, out_int32=True)",
        "q_hi = torch.searchsorted(s, n1, right=False, out_int32=True) - 1",
        MASK_TESTS,
    ),
    Mutant(
        "plan: key tile's full queries include one that starts after n0",
        PLAN,
        "full_hi = torch.searchsorted(s, n0, right=True, out_int32=True)",
        "full_hi = torch.searchsorted(s, n0, right=True, out_int32=True) + 1",
        MASK_TESTS,
    ),
    Mutant(
        "plan: union key tile's FULL run jumps over a tile that is not full",
        PLAN,
        "f_end = torch.where(~full & (idx > f_first), idx, runs.shape[0]).amin(0)",
        "f_end = torch.where(full, idx + 1, 0).amax(0)",
        MASK_TESTS,
    ),
    Mutant(
        "plan: query runs built from a dense N x N mask",
        PLAN,
        "    nonempty = e > s\n",
        "    nonempty = e > s\n    assert (torch.arange(n)[None, :] >= s[:, :1]).shape[0] == n\n",
        MASK_TESTS,
    ),
    Mutant(
        "diffusion loss: row pointer ignores the program id",
        DF,
        "rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)",
        "rows = tl.arange(0, BLOCK_P)",
        DF_LOSS,
    ),
    Mutant(
        "diffusion loss: last channel tile skipped",
        DF,
        "for c_start in range(0, C, BLOCK_C):",
        "for c_start in range(0, C - BLOCK_C, BLOCK_C):",
        DF_LOSS,
    ),
    Mutant(
        "diffusion loss: gradient without the factor 2", DF, "g = (2.0 * w)[:, None] * d", "g = w[:, None] * d", DF_LOSS
    ),
    Mutant(
        "diffusion loss: weight not applied to the partial sum",
        DF,
        "tl.store(partial_ptr + pid, tl.sum(acc * w, axis=0))",
        "tl.store(partial_ptr + pid, tl.sum(acc, axis=0) / P)",
        DF_LOSS,
    ),
]


def copy_tree(dest: Path) -> None:
    """The package and the tests, so that pytest's rootdir and PYTHONPATH both point at the copy."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("transfusion_kernels", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.cfg", "pytest.ini", "conftest.py"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)


def apply(mutant: Mutant, dest: Path) -> None:
    target = dest / mutant.path
    text = target.read_text()
    if text.count(mutant.old) != 1:
        raise SystemExit(
            f"{mutant.name}: the patch text occurs {text.count(mutant.old)} times in {mutant.path} "
            f"(must be once): {mutant.old!r}"
        )
    target.write_text(text.replace(mutant.old, mutant.new))


def run_tests(dest: Path, tests: tuple[str, ...], timeout: int) -> tuple[str, str]:
    """("passed" | "failed" (a test assertion) | "crashed" (the process died) | "timed out", the
    output's last line)."""
    env = dict(os.environ, PYTHONPATH=str(dest), TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out", ""
    out = [
        line
        for line in (proc.stdout + proc.stderr).strip().splitlines()
        if " in " in line and "passed" in line or "failed" in line
    ]
    result = {0: "passed", 1: "failed"}.get(proc.returncode, "crashed")
    return result, (out[-1] if out else f"exit {proc.returncode}")


def check_copy_is_imported(dest: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(dest))
    code = "import transfusion_kernels as tk; print(tk.__file__)"
    path = subprocess.run([sys.executable, "-c", code], cwd=dest, env=env, capture_output=True, text=True).stdout
    if not path.strip().startswith(str(dest)):
        raise SystemExit(f"the package imported from {path.strip()!r}, not from the copy in {dest}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma list: run the mutants whose name contains one of these")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run")
    args = ap.parse_args(argv)
    wanted = args.only.split(",")
    chosen = [m for m in MUTANTS if any(w in m.name for w in wanted) and (ROOT / m.path).exists()]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.path}]")
        return 0
    with tempfile.TemporaryDirectory(prefix="tk-mutants-") as tmp:
        base = Path(tmp) / "base"
        copy_tree(base)
        check_copy_is_imported(base)
        for tests in dict.fromkeys(m.tests for m in chosen):  # each selection passes unmutated
            result, last = run_tests(base, tests, args.timeout)
            if result != "passed":
                raise SystemExit(f"the unmutated copy fails {' '.join(tests)}: {last}")
        rows, survivors = [], 0
        for i, m in enumerate(chosen):
            dest = Path(tmp) / f"m{i}"
            copy_tree(dest)
            apply(m, dest)
            t0 = time.perf_counter()
            result, last = run_tests(dest, m.tests, args.timeout)
            verdict = {"passed": "SURVIVED", "failed": "killed"}.get(result, f"killed ({result})")
            survivors += result == "passed"
            rows.append((m.name, verdict, f"{time.perf_counter() - t0:.0f}", last))
            print(f"{verdict:8}  {m.name}  ({last})", flush=True)
            shutil.rmtree(dest)
    print("\n| mutant | result | s | tests |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n{len(rows) - survivors} of {len(rows)} killed, {survivors} survived")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
