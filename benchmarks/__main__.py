"""Run the benchmark suite: attention, timestep embedding, diffusion and flow-matching updates and the model.

    python -m benchmarks                     # GPU: full sizes; results in ./benchmarks/results/<device>-<date>/
    python -m benchmarks --smoke             # CPU: tiny shapes, checks the harness, makes no speed claims
    python -m benchmarks --only attention,model

Each suite writes its JSON (device, versions, commit, command, shapes, medians) into one folder;
this driver then writes ``summary.md`` (a markdown table per suite) and PNG plots there:
effective TFLOP/s against sequence length per attention method, achieved bandwidth against size
for the memory-bound ops.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from .common import markdown_table, results_path  # noqa: E402

SUITES = ("attention", "timestep", "diffusion", "flow", "model")


def produced_by(name: str, record: dict) -> str:
    """A row's implementation as it ran: ``reference, standing in for tk:triton`` when the
    reference ran in place of a backend that cannot run here (the smoke mode)."""
    return (
        f"reference, standing in for {name}"
        if str(record.get("note", "")).startswith("reference standing in")
        else name
    )


def summarize(suite: str, data: dict) -> tuple[list[dict], list[str]]:
    """Flat rows and the columns worth showing, per suite's JSON layout."""
    rows = data["rows"]
    if suite == "attention":
        cols = [
            "workload",
            "tokens",
            "hq",
            "hkv",
            "method",
            "fwd_ms",
            "fwd_tflops",
            "bwd_ms",
            "bwd_tflops",
            "peak_mem_mb",
        ]
        return [{**r, "method": produced_by(r["method"], r)} for r in rows if "fwd_ms" in r], cols
    if suite == "timestep":
        flat = [
            dict(P=r["P"], D=r["D"], M=r["M"], copy_GBps=r["copy_GBps"], **v, impl=produced_by(name, v))
            for r in rows
            for name, v in r["impls"].items()
        ]
        return flat, ["P", "D", "M", "impl", "fwd_nograd_ms", "fwd_GBps", "fwd_frac_of_copy", "bwd_ms", "copy_GBps"]
    if suite == "diffusion":
        flat = [
            dict(
                case=r["case"],
                op=op,
                MB=r["ops"][op]["bytes"] / 3 / 2**20,
                copy_GBps=r["copy_GBps"],
                **v,
                impl=produced_by(name, v),
            )
            for r in rows
            for op in r["ops"]
            for name, v in r["ops"][op]["impls"].items()
        ]
        return flat, ["case", "op", "impl", "MB", "median_ms", "GBps", "frac_of_copy", "copy_GBps"]
    if suite == "flow":
        flat = [
            dict(
                case=r["case"],
                dtype=r["dtype"],
                op=op,
                MB=r["MB_per_tensor"],
                copy_GBps=r["copy_GBps"],
                **v,
                impl=produced_by(name, v),
            )
            for r in rows
            for op in r["ops"]
            for name, v in r["ops"][op]["impls"].items()
        ]
        return flat, ["case", "dtype", "op", "impl", "MB", "median_ms", "GBps", "frac_of_copy", "copy_GBps"]
    if suite == "model":
        return [{**r, "method": produced_by(r["method"], r)} for r in rows], [
            "method",
            "tokens",
            "images",
            "train_tokens_per_s",
            "images_per_s_cache",
            "images_per_s_no_cache",
            "cache_speedup",
            "error",
        ]
    return rows, sorted({k for r in rows for k in r})


def plot(suite: str, rows: list[dict], folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'transfusion-kernels[bench]')")
        return []
    made = []
    if suite == "attention" and rows:
        for phase in ("fwd", "bwd"):
            key = f"{phase}_tflops"
            groups = sorted({(r["workload"], r["hq"]) for r in rows if key in r})
            if not groups:
                continue
            fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
            for ax, (workload, hq) in zip(axes[0], groups):
                sel = [r for r in rows if r["workload"] == workload and r["hq"] == hq and key in r]
                for method in sorted({r["method"] for r in sel}):
                    pts = sorted((r["tokens"], r[key]) for r in sel if r["method"] == method)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
                ax.set(
                    title=f"{workload}, Hq={hq}", xlabel="tokens", ylabel=f"{phase} TFLOP/s (effective)", xscale="log"
                )
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.tight_layout()
            made.append(folder / f"attention_{phase}_tflops.png")
            fig.savefig(made[-1], dpi=120)
            plt.close(fig)
    if suite in ("timestep", "diffusion", "flow") and rows:
        size_key, bw_key, group_key = ("P", "fwd_GBps", "impl") if suite == "timestep" else ("MB", "GBps", "impl")
        panels = [None] if suite == "timestep" else sorted({r["op"] for r in rows})
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
        for ax, op in zip(axes[0], panels):
            sel = [r for r in rows if op is None or r["op"] == op]
            for impl in sorted({r[group_key] for r in sel}):
                pts = sorted((r[size_key], r[bw_key]) for r in sel if r[group_key] == impl)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            copy = sorted({(r[size_key], r["copy_GBps"]) for r in sel})
            ax.plot([p[0] for p in copy], [p[1] for p in copy], "k--", label="device copy")
            ax.set(
                title=op or "patch_timestep_embedding fwd",
                xlabel="patches" if suite == "timestep" else "MB per tensor",
                ylabel="GB/s",
                xscale="log",
            )
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        made.append(folder / f"{suite}_bandwidth.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made


@contextlib.contextmanager
def smoke_compile_backend(smoke: bool):
    """The smoke mode traces the compiled baselines with aot_eager (inductor's CPU code
    generation costs minutes on a small CPU and says nothing about GPU speed); a backend chosen
    in TK_BENCH_COMPILE_BACKEND wins."""
    if not smoke or "TK_BENCH_COMPILE_BACKEND" in os.environ:
        yield
        return
    os.environ["TK_BENCH_COMPILE_BACKEND"] = "aot_eager"
    try:
        yield
    finally:
        del os.environ["TK_BENCH_COMPILE_BACKEND"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes (the default without a GPU)")
    p.add_argument("--only", default=",".join(SUITES), help=f"comma list from {','.join(SUITES)}")
    p.add_argument(
        "--root",
        default=None,
        help="results root (default benchmarks/results under the current directory; a temporary folder for --smoke)",
    )
    args = p.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and not args.smoke:
        print("no CUDA device: running the smoke mode (harness check, no speed claims)")
    suites = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(suites) - set(SUITES)
    if unknown:
        p.error(f"unknown suite(s) {sorted(unknown)}; choose from {SUITES}")
    root = args.root or (tempfile.mkdtemp(prefix="tk-bench-") if smoke else None)
    folder = Path(results_path("x", root=root)).parent
    summary = [f"# Benchmarks: {folder.name}", ""] + (
        ["Smoke run on a CPU: checks the harness, not speed.", ""] if smoke else []
    )
    failed = []
    for suite in suites:
        print(f"\n=== {suite} ===", flush=True)
        suite_args = (["--smoke"] if smoke else []) + (["--root", str(root)] if root else [])
        try:
            with smoke_compile_backend(smoke):
                importlib.import_module(f".{suite}", __package__).main(suite_args)
        except Exception as e:  # noqa: BLE001 - one broken suite must not hide the others
            failed.append(suite)
            print(f"{suite} failed: {type(e).__name__}: {e}")
            continue
        data = json.loads((folder / f"{suite}.json").read_text())
        rows, cols = summarize(suite, data)
        plots = plot(suite, rows, folder)
        summary += [
            f"## {suite}",
            "",
            f"Command: `{data['environment']['command']}`, commit {data['environment']['commit']}, "
            f"device {data['environment']['device']}",
            "",
            markdown_table(rows, cols),
            "",
        ]
        summary += [f"![{pl.stem}]({pl.name})" for pl in plots] + [""]
    (folder / "summary.md").write_text("\n".join(summary))
    print(f"\nsummary: {folder / 'summary.md'}")
    if failed:
        print(f"failed suites: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
