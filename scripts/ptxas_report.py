#!/usr/bin/env python
"""Compile every CUDA source under csrc/ with warnings as errors and report, per kernel and SASS
target, the registers, shared memory, stack frame and spills that ptxas assigns (-Xptxas -v).

    python scripts/ptxas_report.py                   # all of csrc/**/*.cu, sm_80 and sm_90a
    python scripts/ptxas_report.py --arch 90a csrc/diffusion/affine_step.cu

Exits non-zero when a source does not compile warning-free or a hot kernel spills (every kernel
is hot unless --hot narrows it with a regex on the demangled name). Needs only nvcc (no GPU).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = ("80", "90a")

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclasses.dataclass
class KernelInfo:
    source: str
    arch: str
    mangled: str
    name: str = ""
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def find_nvcc() -> str | None:
    for c in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
              "/usr/local/cuda/bin/nvcc"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_include_dirs(nvcc: str) -> list[str]:
    """The include directories nvcc passes to the host compiler (nvcc may be a wrapper script)."""
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    m = re.search(r"^#\$ INCLUDES=(.*)$", out, re.MULTILINE)
    return re.findall(r'"-I([^"]+)"', m.group(1)) if m else []


def nvcc_command(nvcc: str, source: Path, obj: Path, archs=DEFAULT_ARCHS) -> list[str]:
    """The extension's compile flags (CMakeLists.txt), plus -Werror and ptxas verbosity."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [nvcc, "-std=c++17", "-O3", "-lineinfo", f"-I{CSRC}", *gencode,
            "--Werror", "all-warnings", "-Xcompiler=-Wall,-Wextra,-Werror", "-Xptxas", "-v",
            "-c", str(source), "-o", str(obj)]


def parse_ptxas(text: str, source: str = "") -> list[KernelInfo]:
    """Kernels (entry functions) and their resources from ptxas -v output."""
    kernels: list[KernelInfo] = []
    frames: dict[tuple[str, str], tuple[int, int, int]] = {}
    current: KernelInfo | None = None
    last_props: str | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = KernelInfo(source, m.group(2), m.group(1))
            kernels.append(current)
            last_props = None
        elif m := _PROPS.search(line):
            last_props = m.group(1)
        elif (m := _FRAME.search(line)) and last_props is not None and current is not None:
            frames[(last_props, current.arch)] = tuple(int(x) for x in m.groups())
            last_props = None
        elif (m := _USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
            if s := _SMEM.search(m.group(2)):
                current.smem = int(s.group(1))
    for k in kernels:
        k.stack, k.spill_stores, k.spill_loads = frames.get((k.mangled, k.arch), (0, 0, 0))
    _demangle(kernels)
    return kernels


def _demangle(kernels: list[KernelInfo]) -> None:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    names = [k.mangled for k in kernels]
    if filt and names:
        try:
            out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
            names = out.splitlines()
        except (subprocess.CalledProcessError, OSError):
            pass
    for k, n in zip(kernels, names):
        k.name = n.replace("(anonymous namespace)::", "")


def compile_and_report(source: Path, archs=DEFAULT_ARCHS, nvcc: str | None = None) -> tuple[int, str, list[KernelInfo]]:
    """Compile one source; returns (returncode, compiler output, kernels)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(nvcc_command(nvcc, source, Path(tmp) / "k.o", archs), capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    return proc.returncode, text, parse_ptxas(text, str(source.relative_to(ROOT) if source.is_relative_to(ROOT) else source))


def warnings_in(text: str) -> list[str]:
    """Compiler diagnostics other than ptxas' informational lines."""
    return [l for l in text.splitlines() if re.search(r"\b(warning|error)\b", l, re.IGNORECASE)]


def sources() -> list[Path]:
    return sorted(CSRC.rglob("*.cu"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="CUDA sources (default: csrc/**/*.cu)")
    ap.add_argument("--arch", action="append", help="SASS target, e.g. 80 or 90a (repeatable; default 80 and 90a)")
    ap.add_argument("--hot", default=".", help="regex on the demangled kernel name: kernels that must not spill")
    ap.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    archs = tuple(args.arch or DEFAULT_ARCHS)
    files = [f.resolve() for f in args.files] or sources()
    hot = re.compile(args.hot)

    failed = False
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda f: (f, *compile_and_report(f, archs)), files))
    print(f"{'kernel':<72} {'arch':<7} {'regs':>4} {'smem':>7} {'stack':>5} {'spill st/ld':>11}")
    for f, rc, text, kernels in results:
        if rc != 0 or warnings_in(text):
            failed = True
            print(f"FAIL {f}: compile {'failed' if rc else 'warned'}\n{text}", file=sys.stderr)
        for k in kernels:
            flag = ""
            if k.spills and hot.search(k.name):
                failed, flag = True, "  <- SPILLS"
            name = k.name if len(k.name) <= 72 else k.name[:69] + "..."
            print(f"{name:<72} {k.arch:<7} {k.registers:>4} {k.smem:>7} {k.stack:>5} "
                  f"{k.spill_stores:>5}/{k.spill_loads:<5}{flag}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
