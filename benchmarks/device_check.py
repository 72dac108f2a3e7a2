"""One-call check of a bare H100/H200: build, GPU tests, tuning, benchmarks, in under 9 minutes.

    python -m benchmarks.device_check --out DIR            # on the GPU machine
    python -m benchmarks.device_check --dry-run --out DIR  # on a CPU: every step, tiny sizes, no timings

Steps, in order (each in its own process, with a time cap; a failure does not stop the next):
  build      the CUDA extension with CMake + parallel ninja, straight into transfusion_kernels/
             (SASS for this GPU only), then an import check of the built module
  tests      the tests marked ``gpu``, one pytest run per file, each with a time cap
  tune       benchmarks.tune --short (skipped while benchmarks/tune.py is absent); the later
             steps use its winners (TRANSFUSION_KERNELS_TUNED)
  attention  8k and 32k Transfusion mix, forward and forward + backward, every backend against
             compiled FlexAttention, SDPA (naive dense-mask baseline) and FlashAttention varlen;
             then the cuda backend on 8k-token interval unions (BAGEL-style noise
             splits and sink plus window: K = 2; random unions: K = 4) and with a softcap, each
             checked against the reference backend before it is timed
  timestep, diffusion, model   the other suites at reduced sizes

A global deadline (--budget-s) stops the run before the machine's time is up: a step that no
longer fits is skipped and the summary says so. After every step DIR gets the evidence so far, in
at most seven flat files: results.json (environment, command, every step's status and data),
summary.md, build.log, tests.log, bench.log, plots.png and tuned.json (written by tune).

The dry run goes through the same functions: only sizes and backends differ (TRITON_INTERPRET=1
for Triton, the reference standing in for a backend that cannot run on a CPU, ``ninja -n`` instead
of compiling, torch.compile with the aot_eager backend); its summary says "dry run: no timings".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from .common import environment, markdown_table  # noqa: E402
from .toolchain import find_nvcc  # noqa: E402

SOURCES = (ROOT / "CMakeLists.txt").is_file()  # a checkout or an unpacked sdist, not an installed package

STEPS = ("build", "tests", "tune", "attention", "timestep", "diffusion", "model")
# Seconds each step may take at most on the GPU (the dry run is held by the budget alone).
CAPS = {"build": 150, "tests": 110, "tune": 75, "attention": 245, "timestep": 40, "diffusion": 40, "model": 90}
MIN_START = 15  # a step is not started with less time than this left
TEST_FILE_CAP = 40  # seconds per test file on the GPU; the dry run allows a slow, shared CPU more
DRY_TEST_FILE_CAP = 180
RESERVE = 15  # seconds kept for the final summary and plots
# Columns that hold timings: left out of a dry run's summary (no timing claims on a CPU).
TIMING = re.compile(r"(_ms|_s|tflops|GBps|per_s|frac|speedup)")


# ----------------------------------------------------------------------------- run state
@dataclass
class Check:
    out: Path
    dry_run: bool
    deadline: float
    command: str
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tk-device-check-")))
    steps: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def remaining(self) -> float:
        return self.deadline - time.time()

    def log(self, name: str) -> Path:
        return self.out / f"{name}.log"

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        if self.dry_run:
            env.update(TRITON_INTERPRET="1", TK_BENCH_COMPILE_BACKEND="aot_eager", CUDA_VISIBLE_DEVICES="")
        if self.steps.get("tune", {}).get("status") == "ok" and (self.out / "tuned.json").exists():
            env["TRANSFUSION_KERNELS_TUNED"] = str(self.out / "tuned.json")  # the benchmarks use the winners
        return env


def run_logged(check: Check, cmd: list[str], log: str, timeout: float, cwd: Path = ROOT) -> tuple[int | None, str]:
    """Run ``cmd`` with its output appended to ``<out>/<log>.log``; (exit code or None on timeout,
    the output's tail). The process group is killed at the timeout (inductor's workers too)."""
    path = check.log(log)
    with open(path, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        start = f.tell()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=check.env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
            f.write(f"\n[killed after {timeout:.0f} s]\n")
    with open(path) as f:
        f.seek(start)
        tail = f.read()[-4000:]
    return code, tail


def python_call(name: str, argv: list[str]) -> list[str]:
    """``python -c`` calling ``main(argv)`` of this package's module ``name`` (works whether or
    not the module has a ``__main__`` block), with sys.argv set as if the script ran, so that the
    command recorded in its JSON is the one that reproduces it; a non-integer return counts as
    success. The package is ``benchmarks`` in a checkout, ``transfusion_kernels_bench`` installed."""
    module = f"{__package__}.{name}"
    script = str(Path(__file__).with_name(f"{name}.py"))
    code = (
        f"import sys; sys.argv = [{script!r}] + {argv!r}; from {module} import main; "
        f"r = main({argv!r}); sys.exit(r if isinstance(r, int) else 0)"
    )
    return [sys.executable, "-c", code]


# ----------------------------------------------------------------------------- steps
def cuda_arch() -> str:
    """SASS target for the visible GPU (sm_90a on Hopper: wgmma and setmaxnreg need it)."""
    if not torch.cuda.is_available():
        return "90a"
    major, minor = torch.cuda.get_device_capability()
    return "90a" if (major, minor) == (9, 0) else f"{major}{minor}"


def step_build(check: Check, timeout: float) -> dict:
    if not SOURCES:
        return {
            "status": "skipped",
            "detail": "installed package: no sources to build; transfusion --version "
            "shows the installed extension's build",
        }
    nvcc, cmake, ninja = find_nvcc(), shutil.which("cmake"), shutil.which("ninja")
    missing = [n for n, p in (("nvcc", nvcc), ("cmake", cmake), ("ninja", ninja)) if p is None]
    if missing:
        return {"status": "failed", "detail": f"{', '.join(missing)} not found on PATH"}
    import pybind11

    build_dir = ROOT / "build" / f"device-check-{sys.implementation.cache_tag}"
    cache = build_dir / "CMakeCache.txt"
    if cache.exists() and f"CMAKE_COMMAND:INTERNAL={cmake}\n" not in cache.read_text():
        shutil.rmtree(build_dir)  # configured by another cmake: start over
    # The dry run checks the configuration and the build graph (ninja -n) without compiling, and
    # writes nothing into the package.
    out_dir = build_dir / "dry-run-output" if check.dry_run else ROOT / "transfusion_kernels"
    arch = cuda_arch()
    jobs = str(os.cpu_count() or 2)
    configure = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(build_dir),
        "-G",
        "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={ninja}",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DTK_OUTPUT_DIR={out_dir}",
        f"-DTK_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX') or '.so'}",
        f"-DTK_CUDA_ARCHS={arch}",
    ]
    build = [cmake, "--build", str(build_dir), "-j", jobs] + (["--", "-n"] if check.dry_run else [])
    t0 = time.time()
    for cmd in (configure, build):
        code, tail = run_logged(check, cmd, "build", timeout - (time.time() - t0))
        if code != 0:
            reason = "timed out" if code is None else f"exit code {code}"
            return {
                "status": "failed",
                "detail": f"{Path(cmd[0]).name} {cmd[1]}: {reason}; see build.log",
                "arch": arch,
                "jobs": jobs,
            }
    probe = (
        "import json, transfusion_kernels as tk; from transfusion_kernels import _C; "
        "print(json.dumps({'file': _C.__file__, 'build_info': dict(_C.build_info()), "
        "'backends': {k: str(v) for k, v in tk.available_backends().items()}}))"
    )
    if check.dry_run:  # ninja -n compiled nothing: there is no module to import, only the package
        probe = (
            "import json, transfusion_kernels as tk; "
            "print(json.dumps({'backends': {k: str(v) for k, v in tk.available_backends().items()}}))"
        )
    code, tail = run_logged(check, [sys.executable, "-c", probe], "build", max(10.0, timeout - (time.time() - t0)))
    info = {"arch": arch, "jobs": jobs, "build_dir": str(build_dir.relative_to(ROOT))}
    if code != 0:
        return dict(info, status="failed", detail="the built extension does not import; see build.log")
    try:
        info.update(json.loads(tail.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        pass
    return dict(
        info, status="ok", detail=f"sm_{arch}, {jobs} jobs" + (" (ninja -n: nothing compiled)" if check.dry_run else "")
    )


def gpu_test_files() -> list[Path]:
    """Test files holding tests marked ``gpu`` (see tests/conftest.py and pyproject's markers)."""
    return sorted(p for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|error|errors|deselected|xfailed|xpassed)")


def step_tests(check: Check, timeout: float) -> dict:
    if not SOURCES:
        return {"status": "skipped", "detail": "installed package: the tests ship in the sdist and the checkout"}
    files, results = [str(p.relative_to(ROOT)) for p in gpu_test_files()], []
    # On the GPU one pytest per file, each capped, so that a hang costs one file; the dry run
    # (every test skipped on a CPU) checks the same plumbing in one process.
    groups = [files] if check.dry_run else [[f] for f in files]
    t0 = time.time()
    for group in groups:
        rel = " ".join(group)
        left = timeout - (time.time() - t0)
        if left < 5:
            results.append({"file": rel, "status": "skipped", "detail": "no time left in the step"})
            continue
        cap = min(DRY_TEST_FILE_CAP if check.dry_run else TEST_FILE_CAP, left)
        code, tail = run_logged(
            check,
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "--no-header",
                "-rfE",
                *group,
            ],
            "tests",
            cap,
        )
        counts = {}
        for n, kind in PYTEST_COUNT.findall(tail.strip().splitlines()[-1] if tail.strip() else ""):
            counts[kind.rstrip("s") if kind == "errors" else kind] = int(n)
        status = "timeout" if code is None else ("ok" if code in (0, 5) else "failed")  # 5: nothing collected
        results.append({"file": rel, "status": status, "exit_code": code, "cap_s": round(cap), **counts})
        print(f"  tests {rel}: {status} {counts}", flush=True)
    totals = {k: sum(r.get(k, 0) for r in results) for k in ("passed", "failed", "error", "skipped")}
    bad = [r["file"] for r in results if r["status"] != "ok"]
    return {
        "status": "ok" if not bad else "failed",
        "files": results,
        **totals,
        "detail": ", ".join(f"{v} {k}" for k, v in totals.items()) + (f"; not ok: {', '.join(bad)}" if bad else ""),
    }


def step_tune(check: Check, timeout: float) -> dict:
    if not Path(__file__).with_name("tune.py").exists():
        return {"status": "skipped", "detail": "tune.py is not beside device_check.py"}
    out = check.out / "tuned.json"
    argv = ["--out", str(out), "--short"] + (["--dry-run"] if check.dry_run else [])
    code, _ = run_logged(check, python_call("tune", argv), "bench", timeout)
    result = {
        "status": "timeout" if code is None else ("ok" if code == 0 else "failed"),
        "exit_code": code,
        "detail": "tuned.json" if out.exists() else "no tuned.json written; see bench.log",
    }
    if out.exists():
        try:
            result["tuned"] = json.loads(out.read_text())
        except ValueError:
            result["detail"] = "tuned.json is not valid JSON"
    return result


# Per suite: (arguments on the GPU, arguments in the dry run). The dry run's are the suites'
# own --smoke sizes; the GPU's are cut to fit the deadline.
SUITE_ARGS = {
    "attention": (
        [
            "--workloads",
            "mix",
            "--tokens",
            "8192,32768",
            "--heads",
            "16",
            "--gqa",
            "4",
            "--methods",
            "triton,cuda,flex,sdpa,fa2,fa3",
            "--sdpa-max-tokens",
            "32768",
            "--warmup",
            "10",
            "--rep",
            "50",
        ],
        ["--smoke", "--workloads", "mix"],
    ),
    "timestep": (["--sizes", "65536x2048x64,32768x4096x256", "--reps", "30"], ["--smoke", "--sizes", "96x32x3"]),
    "diffusion": (["--cases", "1,2,5", "--reps", "50"], ["--smoke", "--cases", "0"]),
    # training only: sampling would compile FlexAttention for three more shapes
    "model": (
        ["--methods", "tk:triton,tk:cuda,flex,sdpa-dense", "--reps", "3", "--no-sampling"],
        # tk:reference for tk:triton: the same code path, without a minute of interpreted kernels
        ["--smoke", "--methods", "tk:reference,tk:cuda,flex,sdpa-dense", "--reps", "1", "--no-sampling"],
    ),
}


# The attention cases the suite's workloads do not cover: interval unions (K > 1) and softcap.
# (GPU arguments, dry-run arguments) of union_cases; the dry run's reference stands in for the
# kernel backends.
UNION_ARGS = (["--tokens", "8192", "--heads", "16", "--gqa", "4", "--rep", "20"], ["--tokens", "300", "--heads", "2"])
UNION_TIME = 45  # seconds of the attention step kept for them (its cap: the suite's 200 plus these)


def union_masks(n: int, device) -> dict:
    """name -> (mask, softcap): 8k-class masks with K = 2 and 4 intervals per query, and softcap."""
    import transfusion_kernels as tk

    from .attention import build_mask

    sample = [n // 8, n // 4, n // 4, n // 8, n // 4]  # text, noised image, clean image, text, text
    bagel = tk.HybridMask.from_splits(
        [sample + [n - sum(sample)]], [["causal", "noise", "full", "causal", "causal", "causal"]], device=device
    )
    i = torch.arange(n, device=device)
    win0 = torch.minimum(torch.clamp(i - n // 8 + 1, min=4), i + 1)  # 4 sinks, then a window of n / 8
    sink = tk.HybridMask.from_intervals(
        torch.stack([torch.zeros_like(i), win0], 1).int(), torch.stack([torch.clamp(i + 1, max=4), i + 1], 1).int(), n
    )
    gen = torch.Generator().manual_seed(0)
    pts = torch.sort(torch.randint(0, n + 1, (n, 8), generator=gen), 1).values.to(device)
    rand4 = tk.HybridMask.from_intervals(pts[:, 0::2].int(), pts[:, 1::2].int(), n)
    mix, _, _ = build_mask("mix", n, device)
    return {
        "bagel-k2": (bagel, 0.0),
        "bagel-k2-softcap": (bagel, 50.0),
        "sink-window-k2": (sink, 0.0),
        "random-k4": (rand4, 0.0),
        "mix-softcap": (mix, 50.0),
    }


def union_cases(argv: list[str]) -> int:
    """Times hybrid_attention on the cuda backend over union_masks, forward and forward +
    backward (CUDA events, median), after checking out, dq, dk, dv against the reference
    backend; writes {--root}/attention_unions.json (rows as the attention suite's)."""
    import transfusion_kernels as tk

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--gqa", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--root", type=Path, required=True)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    n, hq, d = args.tokens, args.heads, args.head_dim
    hkv = max(1, hq // args.gqa)
    backend = "cuda" if gpu else "reference"  # the dry run: the reference standing in
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    args.root.mkdir(parents=True, exist_ok=True)
    out_file = args.root / "attention_unions.json"
    for name, (mask, cap) in union_masks(n, device).items():
        q, k, v = (torch.randn(n, h, d, generator=gen, device=device, dtype=dtype) for h in (hq, hkv, hkv))
        dout = torch.randn(n, hq, d, generator=gen, device=device, dtype=dtype)
        flops = 4 * d * hq * mask.visible_pairs()
        ins = [t.detach().requires_grad_() for t in (q, k, v)]

        def run(backend, backward):
            out = tk.hybrid_attention(*ins, mask, backend=backend, softcap=cap or None)
            return (out, *torch.autograd.grad(out, ins, dout)) if backward else (out,)

        ref = run("reference", True)
        row = {"tokens": n, "hq": hq, "method": f"cuda:{name}", "num_intervals": mask.num_intervals}
        if not gpu:
            row["note"] = "reference standing in (no GPU)"
        row["softcap"] = cap
        try:
            got = run(backend, True)
            row["max_abs_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))
            # relative to each result's largest value: bf16 rounding is about 4e-3 of it
            rel = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, ref))
            row["check"] = "ok" if rel <= 2e-2 else f"mismatch (relative error {rel:.3g})"
            if row["check"] != "ok":  # no timing for a wrong result
                raise ValueError(row["check"])
            for key, backward in (("fwd", False), ("fwdbwd", True)):
                times = []
                for _ in range(2 + (args.rep if gpu else 0)):
                    if gpu:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        run(backend, backward)
                        end.record()
                        torch.cuda.synchronize()
                        times.append(start.elapsed_time(end))
                    else:
                        t0 = time.perf_counter()
                        run(backend, backward)
                        times.append((time.perf_counter() - t0) * 1e3)
                ms = sorted(times[2:] or times)[len(times[2:] or times) // 2]
                row[f"{key}_ms"] = round(ms, 3)
                row[f"{key}_tflops"] = round(flops * (3.5 if backward else 1.0) / ms / 1e9, 1)
        except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(row, flush=True)
        out_file.write_text(json.dumps({"rows": rows}, indent=1))
    return 0


def step_attention(check: Check, timeout: float) -> dict:
    """The attention suite, then union_cases in the time kept for them; their rows join the
    suite's table."""
    result = step_suite("attention")(check, max(timeout - UNION_TIME, MIN_START))
    root = check.work / "attention_unions"
    gpu_args, dry_args = UNION_ARGS
    argv = (dry_args if check.dry_run else gpu_args) + ["--root", str(root)]
    code = f"import sys; from {__package__}.device_check import union_cases; sys.exit(union_cases({argv!r}))"
    left = max(check.remaining() - RESERVE, MIN_START) if check.dry_run else UNION_TIME
    exit_code, _ = run_logged(check, [sys.executable, "-c", code], "bench", left)
    found = root / "attention_unions.json"
    rows = json.loads(found.read_text())["rows"] if found.exists() else []
    if result.get("data") is not None:
        result["data"]["rows"] += rows
    else:
        result["data"] = {"rows": rows}
    result["detail"] += f"; unions and softcap: {len(rows)} rows" + (" (timed out)" if exit_code is None else "")
    return result


def step_suite(name: str):
    def run(check: Check, timeout: float) -> dict:
        gpu_args, dry_args = SUITE_ARGS[name]
        root = check.work / name
        argv = (dry_args if check.dry_run else gpu_args) + ["--root", str(root)]
        code, tail = run_logged(check, python_call(name, argv), "bench", timeout)
        found = sorted(root.glob(f"*/{name}.json"))
        data = json.loads(found[0].read_text()) if found else None  # partial rows survive a timeout
        status = "timeout" if code is None else ("ok" if code == 0 else "failed")
        errors = [r for r in (data or {}).get("rows", []) if "error" in r]
        detail = f"{len(data['rows'])} rows" if data else "no results written"
        if errors:
            detail += f", {len(errors)} with errors"
        if status != "ok":
            detail += "; see bench.log: " + (tail.strip().splitlines() or [""])[-1][:200]
        return {"status": status, "exit_code": code, "detail": detail, "data": data}

    return run


STEP_FNS = {
    "build": step_build,
    "tests": step_tests,
    "tune": step_tune,
    **{name: step_suite(name) for name in SUITE_ARGS},
    "attention": step_attention,
}


# ----------------------------------------------------------------------------- reporting
def suite_table(name: str, data: dict, dry_run: bool) -> str:
    """The suite's table as ``python -m benchmarks`` shows it, plus every error column."""
    from .__main__ import summarize

    rows, cols = summarize(name, data)
    if name == "attention":
        rows = data["rows"]  # skipped and failed rows too
        cols = [
            "tokens",
            "hq",
            "method",
            "fwd_ms",
            "fwd_tflops",
            "fwdbwd_ms",
            "fwdbwd_tflops",
            "bwd_tflops",
            "mask_build_ms",
            "mask_compile_s",
            "sdpa_kernel",
        ]
    extra = list(dict.fromkeys(k for r in rows for k in r if k.startswith(("err_", "max_abs_diff")) or k == "check"))
    cols = cols + [c for c in extra + ["note", "skipped", "error"] if c not in cols]
    if dry_run:
        cols = [c for c in cols if not TIMING.search(c)]
    cols = [c for c in cols if any(c in r for r in rows)]
    return markdown_table(rows, cols)


def write_summary(check: Check, plots: list[str]) -> None:
    env = environment()
    lines = ["# Device check", ""]
    if check.dry_run:
        lines += [
            "**dry run: no timings** (CPU, tiny shapes, Triton interpreter, the reference standing in for "
            "backends that cannot run here; it checks that every step runs, not speed)",
            "",
        ]
    lines += [
        f"- device: {env['device']}",
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, python {env['python']}",
        f"- commit: {env['commit']}",
        f"- command: `{check.command}`",
        f"- elapsed: {time.time() - check.started:.0f} s of a {check.deadline - check.started:.0f} s budget",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for name in STEPS:
        s = check.steps.get(name, {"status": "pending", "detail": "not reached yet"})
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '-')} | {s.get('detail', '')} |")
    tests = check.steps.get("tests", {}).get("files")
    if tests:
        lines += [
            "",
            "## tests (marked gpu, one run per file)",
            "",
            markdown_table(tests, ["file", "status", "passed", "failed", "error", "skipped", "cap_s"]),
        ]
    tuned = check.steps.get("tune", {}).get("tuned")
    configs = tuned.get("configs") if isinstance(tuned, dict) else None
    if isinstance(configs, list):
        cols = ["head_dim", "dtype", "arch", "fwd", "dkdv", "dq"]
        rows = [
            {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in c.items() if k in cols}
            for c in configs
            if isinstance(c, dict)
        ]
        lines += [
            "",
            "## tune",
            "",
            f"winners (measured: {tuned.get('measured')}; every candidate in tuned.json):",
            "",
            markdown_table(rows, cols),
        ]
    for name in SUITE_ARGS:
        data = check.steps.get(name, {}).get("data")
        if data and data.get("rows"):
            lines += [
                "",
                f"## {name}",
                "",
                f"config: `{json.dumps(_short_config(data['config']))}`",
                "",
                suite_table(name, data, check.dry_run),
            ]
    if plots:
        lines += ["", "![plots](plots.png)"]
    (check.out / "summary.md").write_text("\n".join(lines) + "\n")


def _short_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not isinstance(v, (dict, list)) and v not in (None, False, "")}


def write_results(check: Check) -> None:
    payload = {
        "environment": environment(),
        "command": check.command,
        "dry_run": check.dry_run,
        "budget_s": round(check.deadline - check.started),
        "elapsed_s": round(time.time() - check.started),
        "steps": {name: check.steps.get(name, {"status": "pending"}) for name in STEPS},
    }
    tmp = check.out / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(check.out / "results.json")


def write_plots(check: Check) -> list[str]:
    """One PNG: attention TFLOP/s per method (forward, forward + backward), the memory-bound ops'
    bandwidth, the model's training tokens/s. Titled as a dry run when it is one."""
    panels = []
    att = (check.steps.get("attention", {}).get("data") or {}).get("rows", [])
    for key, title in (("fwd_tflops", "attention fwd TFLOP/s"), ("fwdbwd_tflops", "attention fwd+bwd TFLOP/s")):
        bars = [
            (f"{r['method']}\n{r['tokens'] // 1024 or r['tokens']}{'k' if r['tokens'] >= 1024 else ''}", r[key])
            for r in att
            if key in r
        ]
        if bars:
            panels.append((title, bars))
    ts = (check.steps.get("timestep", {}).get("data") or {}).get("rows", [])
    bars = [(f"{impl}\nP={r['P']}", v["fwd_GBps"]) for r in ts for impl, v in r["impls"].items()]
    if bars:
        panels.append(("timestep fwd GB/s", bars))
    df = (check.steps.get("diffusion", {}).get("data") or {}).get("rows", [])
    bars = [
        (f"{impl}\n{op}", v["GBps"]) for r in df[:1] for op, o in r["ops"].items() for impl, v in o["impls"].items()
    ]
    if bars:
        panels.append((f"diffusion GB/s ({df[0]['case']})" if df else "diffusion GB/s", bars))
    md = (check.steps.get("model", {}).get("data") or {}).get("rows", [])
    bars = [(r["method"], r["train_tokens_per_s"]) for r in md if "train_tokens_per_s" in r]
    if bars:
        panels.append(("model training tokens/s", bars))
    if not panels:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, (title, bars) in zip(axes[:, 0], panels):
        ax.bar(range(len(bars)), [b[1] for b in bars])
        crowded = len(bars) > 8
        ax.set_xticks(
            range(len(bars)),
            [b[0].replace("\n", " ") if crowded else b[0] for b in bars],
            fontsize=7,
            rotation=60 if crowded else 0,
            ha="right" if crowded else "center",
        )
        ax.set_title(title + (" (dry run: no timings)" if check.dry_run else ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(check.out / "plots.png", dpi=90)
    plt.close(fig)
    return ["plots.png"]


def save(check: Check) -> None:
    write_results(check)
    try:
        plots = write_plots(check)
    except Exception as e:  # noqa: BLE001 - a plot must never cost the numbers
        check.steps.setdefault("_plots", {})["error"] = str(e)
        plots = []
    write_summary(check, plots)


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.device_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for results.json, summary.md, logs and plots")
    p.add_argument("--dry-run", action="store_true", help="CPU: every step at tiny sizes, no timings")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting steps so that the run ends within this many seconds (default 510 on a "
        "GPU, 1200 for the dry run: a guard for a loaded CPU)",
    )
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list from {','.join(STEPS)}")
    args = p.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        p.error(f"unknown step(s) {sorted(unknown)}; choose from {','.join(STEPS)}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device is visible: run on the GPU machine, or pass --dry-run on a CPU")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("results.json", "summary.md", "build.log", "tests.log", "bench.log", "plots.png", "tuned.json"):
        (out / stale).unlink(missing_ok=True)
    budget = args.budget_s or (1200.0 if args.dry_run else 510.0)
    command = " ".join([f"python -m {__package__}.device_check"] + (argv if argv is not None else sys.argv[1:]))
    check = Check(out=out, dry_run=args.dry_run, deadline=time.time() + budget, command=command)
    print(
        f"device check{' (dry run)' if args.dry_run else ''}: {environment()['device']}, budget {budget:.0f} s, "
        f"out {out}",
        flush=True,
    )
    for name in STEPS:
        if name not in steps:
            check.steps[name] = {"status": "skipped", "detail": "not asked for (--steps)"}
            continue
        left = check.remaining() - RESERVE
        if left < MIN_START:
            check.steps[name] = {"status": "skipped", "detail": f"did not fit: {max(left, 0):.0f} s left of the budget"}
            print(f"[{name}] skipped: out of time", flush=True)
            save(check)
            continue
        timeout = left if args.dry_run else min(CAPS[name], left)
        print(f"[{name}] up to {timeout:.0f} s ...", flush=True)
        t0 = time.time()
        try:
            result = STEP_FNS[name](check, timeout)
        except Exception as e:  # noqa: BLE001 - one broken step must not hide the others
            result = {"status": "failed", "detail": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.time() - t0, 1)
        check.steps[name] = result
        print(f"[{name}] {result['status']} in {result['seconds']} s: {result.get('detail', '')}", flush=True)
        save(check)
    shutil.rmtree(check.work, ignore_errors=True)
    print("\n" + (out / "summary.md").read_text())
    failed = [n for n, s in check.steps.items() if s.get("status") in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
