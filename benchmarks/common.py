"""Shared benchmark helpers: median timing, peak memory, environment record, JSON results.

Every GPU run is saved as JSON under ``<root>/<device>-<date>/<name>.json`` (root: the folder the
user names with --root, default ``benchmarks/results`` under the current directory, never the
installed package) with the device, library versions, git commit, the exact command line, the
shapes and the medians, so a number in a table can always be traced to the run that printed it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, or site-packages
RESULTS = os.path.join("benchmarks", "results")  # under the current directory
COMMAND_ENV = "TK_BENCH_COMMAND"  # `transfusion bench` names itself here, for the record

if "TORCH_LOGS" not in os.environ:
    # The compiled baselines break their graphs on purpose (an .item() in the reference loss);
    # dynamo's multi-line warning about it is noise to someone running the benchmarks.
    import logging

    torch._logging.set_logs(dynamo=logging.ERROR)


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def do_bench(
    fn: Callable[[], object], warmup: int = 25, rep: int = 100, device: torch.device | str | None = None
) -> float:
    """Median time of ``fn()`` in milliseconds.

    On a GPU: ``triton.testing.do_bench`` (it flushes the L2 cache between calls; ``warmup`` and
    ``rep`` are in milliseconds there), or CUDA events when triton is missing. On the CPU: wall
    time over ``rep`` calls after ``warmup`` calls."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        try:
            from triton.testing import do_bench as triton_bench
        except ImportError:
            triton_bench = None
        if triton_bench is not None:
            return float(triton_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(rep // 4, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(rep, 1)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str | None = None) -> float | None:
    """Peak GPU memory allocated while ``fn()`` runs, above what was allocated before (MiB);
    None on the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def git_commit() -> str:
    """HEAD commit, with "+dirty" when tracked files differ from it; for an installed package, the
    commit its build recorded."""
    if not os.path.exists(os.path.join(ROOT, ".git")):
        from transfusion_kernels.backends import build_record

        return build_record().get("commit") or "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """The command as it was typed: ``transfusion bench ...`` (passed down by the CLI),
    ``python -m <package> ...`` for a module run, else the script and its arguments."""
    import shlex

    if os.environ.get(COMMAND_ENV):
        return os.environ[COMMAND_ENV]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        module = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return shlex.join(["python", "-m", module, *sys.argv[1:]])
    script = os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "python"
    return shlex.join(["python", script, *sys.argv[1:]])


def environment(device: torch.device | str | None = None) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "diffusers": diffusers_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": command_line(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def results_path(name: str, device: torch.device | str | None = None, root: str | None = None) -> str:
    """``<root>/<device>-<date>/<name>.json``, absolute (root defaults to benchmarks/results under
    the current directory)."""
    folder = f"{_slug(device_name(device))[:40]}-{_dt.date.today().isoformat()}"
    return os.path.abspath(os.path.join(root or RESULTS, folder, f"{name}.json"))


def write_json(name: str, rows: list[dict], config: dict | None = None, device=None, root: str | None = None) -> str:
    """Save ``{"environment", "config", "rows"}`` and return the path."""
    path = results_path(name, device, root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(device), "config": config or {}, "rows": rows}, f, indent=2)
        f.write("\n")
    return path


def compile_backend() -> str:
    """torch.compile backend for the compiled baselines. Inductor unless TK_BENCH_COMPILE_BACKEND
    names another: the CPU dry run of ``benchmarks.device_check`` traces through dynamo with
    ``aot_eager`` (inductor's C++ code generation costs minutes on a small CPU and proves
    nothing about its GPU code)."""
    return os.environ.get("TK_BENCH_COMPILE_BACKEND", "inductor")


def compile_fn(fn, **kwargs):
    return torch.compile(fn, backend=compile_backend(), **kwargs)


def max_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    """max |result - expected| in float64; NaN when either holds a NaN (a NaN never passes)."""
    diff = (result.detach().double() - expected.detach().double()).abs()
    if diff.numel() == 0:
        return 0.0
    return float("nan") if bool(diff.isnan().any()) else float(diff.max())


_COMPILED_CREATE_BLOCK_MASK = {}


def interval_mask_mod(kv_start: torch.Tensor, kv_end: torch.Tensor):
    """FlexAttention mask_mod of an interval mask: query i sees keys [kv_start[i], kv_end[i])."""

    def interval_mask(b, h, q_idx, kv_idx):
        return (kv_idx >= kv_start[q_idx]) & (kv_idx < kv_end[q_idx])

    return interval_mask


def compiled_create_block_mask():
    """``torch.compile(create_block_mask)``, made once per process (recompiled per shape)."""
    from torch.nn.attention.flex_attention import create_block_mask

    backend = compile_backend()
    if backend not in _COMPILED_CREATE_BLOCK_MASK:
        _COMPILED_CREATE_BLOCK_MASK[backend] = torch.compile(create_block_mask, backend=backend)
    return _COMPILED_CREATE_BLOCK_MASK[backend]


def flex_block_mask(mask, block_size: int = 128):
    """BlockMask of a HybridMask built by ``torch.compile(create_block_mask)`` (how FlexAttention
    users build masks: eager create_block_mask evaluates the N x N mask densely).

    Returns (block_mask, first_call_s, steady_ms): the first call's wall time (compilation
    included) apart from the median of later builds."""
    build_fn = compiled_create_block_mask()
    mask_mod = interval_mask_mod(mask.kv_start, mask.kv_end)

    def build():
        bm = build_fn(mask_mod, None, None, mask.num_queries, mask.num_keys, device=mask.device, BLOCK_SIZE=block_size)
        if mask.device.type == "cuda":
            torch.cuda.synchronize()
        return bm

    t0 = time.perf_counter()
    block_mask = build()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        build()
        times.append((time.perf_counter() - t0) * 1e3)
    return block_mask, first_s, statistics.median(times)


def stand_ins(backends, device, stand_in: bool) -> dict:
    """{backend asked for: backend that runs it}. One that cannot run here is left out, or, with
    ``stand_in`` (the CPU smoke and dry runs), run by the reference so that its row's code path
    still runs (no speed claim is made there)."""
    import transfusion_kernels as tk

    info = tk.available_backends(device)
    return {b: b if info[b].available else "reference" for b in backends if info[b].available or stand_in}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
