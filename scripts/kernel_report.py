#!/usr/bin/env python
"""Static performance report of the attention kernels, CUDA and Triton, read from compiled SASS
(no GPU needed).

    python scripts/kernel_report.py                          # every attention kernel, sm_80 and sm_90a
    python scripts/kernel_report.py --arch 90a --only cuda   # CUDA kernels for sm_90a only
    python scripts/kernel_report.py --kernel fwd --dim 128 --dtype bf16 --json r.json --markdown r.md
    python scripts/kernel_report.py --spill-check csrc/diffusion/affine_step.cu   # any CUDA source

CUDA: every csrc/attention/*.cu (new files are picked up) is compiled with the extension's flags
(CMakeLists.txt, Release: ``-O3 -DNDEBUG -Xcompiler=-fPIC -gencode... -lineinfo
-Xcompiler=-fvisibility=hidden -std=c++17 -Icsrc``) plus ``-Xcompiler=-Wall,-Wextra`` (as
TK_WERROR=ON) and ``-Xptxas -v``; any warning is reported as a failure. Block size and dynamic
shared memory as launched come from running the launchers declared in attention.h against a
stand-in CUDA runtime that records each launch (probe_launches). SASS: ``cuobjdump -sass``.
Triton: the package's own ``forward``/``backward`` run on CPU tensors with every kernel launch
recorded instead of executed (the config is the one the package picks for an A100 / H100 by
device name); each recorded launch is then compiled through the JIT's own ``warmup`` path (a
stand-in driver that only names the target), so signature, ``tt.divisibility`` and equal-to-1
specialisation, constexprs, num_warps and num_stages are what the JIT builds for that launch;
Triton's own ptxas produces the cubin. The launch shape is N = 4096 query and key tokens, 16 query
heads, 4 key/value heads, one causal document, fresh contiguous tensors (16-aligned pointers and
strides, as in training).

Columns (per kernel, arch, head dim, dtype):
  regs, spills (ptxas spill store / load bytes), smem (static + dynamic as launched; "+dyn" where
  no launch was recorded), threads per CTA, CTAs/SM (min over registers, shared memory, threads
  and the 32-CTA limit), tensor-core instructions in the whole kernel (HGMMA "SS"/"RS": wgmma
  with A in shared memory / registers; HMMA: mma.sync), TMA loads / stores (UTMALDG / UTMASTG),
  cp.async (LDGSTS), USETMAXREG, and per FULL main-loop step: instructions, the whole loop body,
  tensor-core instructions, barriers (BAR.SYNC / BAR.ARV / BAR.RED), mbarrier ops (SYNCS.*),
  whether a CTA-wide barrier (BAR.SYNC 0) is inside the main loop, GEMMs per step and the
  tensor-core work ratio.

Main loops: the SASS of each function is split into basic blocks (leaders: branch targets and
the instruction after a branch or EXIT); dominators give the natural loops (an edge u -> h whose
head h dominates u, the loop being h plus every block that reaches u without passing h). The main
loops are the innermost natural loops that contain HGMMA or HMMA (spin loops of mbarrier waits
and TMA elect loops nest inside them and hold no MMA). "body" counts every instruction of the
loop (all paths, PARTIAL-tile masking included); "step" is the FULL key step: the fewest
instructions on any path from the loop head to a back edge, inner loops taken once (a conditional
block such as PARTIAL masking is skipped; a kernel with split masked and unmasked loops reports
its shorter loop). NOPs are not counted. Per-step counts (MMA, barriers) are taken on that path.

Tensor-core work ratio = GEMMs issued per step / GEMMs the algorithm counts: 2 per forward step,
5 per backward step (S, dP, dV, dK, dQ; the backward's kernels summed). GEMMs issued per step:
Triton: the multiply-accumulates of the step's HGMMA / HMMA (per warp times warps, per warpgroup
times warpgroups) over one BM x BN x D GEMM (the launch's constexprs); CUDA wgmma kernels: the
step's HGMMA multiply-accumulates over those of its first accumulation chain (the HGMMA run into
one accumulator that opens the step, its S = Q K^T: one GEMM's share of a warpgroup); CUDA
mma.sync kernels: "-" (their step tile is not in the binary).

Exits non-zero when a source does not compile warning-free or a hot kernel spills.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's torch-free toolchain lookup
REPORT_ROOT_ENV = "TK_REPORT_ROOT"  # --root, passed on to the worker processes


def use_checkout(root: str) -> None:
    """Import the package from the checkout at root: first on sys.path, and without the finder
    of an editable install (it resolves the package to the installed checkout before sys.path)."""
    sys.path.insert(0, root)
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]


from benchmarks.toolchain import find_nvcc  # noqa: E402

if os.environ.get(REPORT_ROOT_ENV):  # a worker process of a report on another checkout
    use_checkout(os.environ[REPORT_ROOT_ENV])

CSRC = ROOT / "csrc"
ATTENTION = CSRC / "attention"
DEFAULT_ARCHS = ("80", "90a")
TRITON_MODULE = "transfusion_kernels.attention.triton"
TRITON_DTYPES = ("bf16", "fp16", "fp32")

_ENTRY = re.compile(r"ptxas[\w-]* info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"ptxas[\w-]* info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas[\w-]* info\s*: Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


# ----------------------------------------------------------------------------------------------
# ptxas -v
# ----------------------------------------------------------------------------------------------
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


def find_cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the one the triton wheel ships."""
    nvcc = find_nvcc()
    cands = [shutil.which("cuobjdump"), nvcc and os.path.join(os.path.dirname(nvcc), "cuobjdump")]
    with contextlib.suppress(ImportError):
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def cuda_include_dirs(nvcc: str) -> list[str]:
    """The include directories nvcc passes to the host compiler (nvcc may be a wrapper script)."""
    out = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True
    ).stderr
    m = re.search(r"^#\$ INCLUDES=(.*)$", out, re.MULTILINE)
    return re.findall(r'"-I([^"]+)"', m.group(1)) if m else []


def nvcc_command(nvcc: str, source: Path, obj: Path, archs=DEFAULT_ARCHS, csrc: Path = CSRC) -> list[str]:
    """The extension's compile flags (CMakeLists.txt, Release) plus ptxas verbosity and the host
    warnings TK_WERROR=ON turns on. Warnings do not stop the compile (the SASS is still read);
    warnings_in() finds them in the output."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [
        nvcc,
        "-O3",
        "-DNDEBUG",
        "-Xcompiler=-fPIC",
        *gencode,
        "-lineinfo",
        "-Xcompiler=-fvisibility=hidden",
        "-std=c++17",
        f"-I{csrc}",
        "-Xcompiler=-Wall,-Wextra",
        "-Xptxas",
        "-v",
        "-c",
        str(source),
        "-o",
        str(obj),
    ]


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
    names = demangle([k.mangled for k in kernels])
    for k, n in zip(kernels, names):
        k.name = n
    return kernels


def demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if filt and names:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
            names = out.splitlines()
    return [re.sub(r"\(anonymous namespace\)::|__nv_|__(?=half)", "", n) for n in names]


def warnings_in(text: str) -> list[str]:
    """Compiler diagnostics other than ptxas' informational lines."""
    return [l for l in text.splitlines() if re.search(r"\b(warning|error)\b", l, re.IGNORECASE)]


def sources(csrc: Path = CSRC) -> list[Path]:
    return sorted(csrc.rglob("*.cu"))


def attention_sources(csrc: Path = CSRC) -> list[Path]:
    return sorted((csrc / "attention").glob("*.cu"))


def compile_and_report(
    source: Path, archs=DEFAULT_ARCHS, nvcc: str | None = None, keep_obj: Path | None = None, csrc: Path = CSRC
) -> tuple[int, str, list[KernelInfo]]:
    """Compile one source; returns (returncode, compiler output, kernels). keep_obj: where to
    leave the object file (for the SASS)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        obj = keep_obj or Path(tmp) / "k.o"
        proc = subprocess.run(nvcc_command(nvcc, source, obj, archs, csrc), capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    base = csrc.parent
    rel = str(source.relative_to(base)) if source.is_relative_to(base) else str(source)
    return proc.returncode, text, parse_ptxas(text, rel)


# ----------------------------------------------------------------------------------------------
# SASS
# ----------------------------------------------------------------------------------------------
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)\s*([^;]*);")
_FUNC = re.compile(r"^\s*Function : (\S+)")
_ARCH = re.compile(r"^\s*code for (sm_\w+)")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")


@dataclasses.dataclass
class Insn:
    addr: int
    pred: str
    op: str
    args: str

    @property
    def is_branch(self) -> bool:
        return self.op.split(".")[0] in ("BRA", "JMP", "BRX", "JMX")

    @property
    def conditional(self) -> bool:
        # @P0 BRA, or BRA P1, target (a predicate operand); @PT is unconditional
        return (bool(self.pred) and self.pred.strip() not in ("@PT", "@UPT")) or bool(re.match(r"!?U?P\d", self.args))

    @property
    def ends_block(self) -> bool:
        return self.is_branch or self.op.split(".")[0] in ("EXIT", "RET")


def parse_sass(text: str) -> dict[tuple[str, str], list[Insn]]:
    """cuobjdump -sass output -> {(arch, mangled name): instructions}."""
    funcs: dict[tuple[str, str], list[Insn]] = {}
    arch, cur = "", None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _FUNC.match(line):
            cur = funcs.setdefault((arch, m.group(1)), [])
        elif cur is not None and (m := _INSN.match(line)):
            cur.append(Insn(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return funcs


def parse_max_threads(elf_text: str) -> dict[tuple[str, str], int]:
    """EIATTR_MAX_THREADS (from __launch_bounds__ / .maxntid) per (arch, mangled name)."""
    out: dict[tuple[str, str], int] = {}
    arch, func, want = "", None, False
    for line in elf_text.splitlines():
        if m := re.match(r"^arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"^\.nv\.info\.(\S+)", line):
            func = m.group(1)
        elif "EIATTR_MAX_THREADS" in line:
            want = True
        elif want and line.strip().startswith("Value:"):
            out[(arch, func)] = int(line.split()[1], 16)
            want = False
    return out


def _blocks(insns: list[Insn]):
    """Basic blocks as (start index, end index exclusive) and successor lists."""
    index = {x.addr: i for i, x in enumerate(insns)}
    leaders = {0}
    for i, x in enumerate(insns):
        if x.ends_block:
            if i + 1 < len(insns):
                leaders.add(i + 1)
            if x.is_branch and (t := _TARGET.search(x.args)) and int(t.group(1), 16) in index:
                leaders.add(index[int(t.group(1), 16)])
    starts = sorted(leaders)
    block_of = {s: b for b, s in enumerate(starts)}
    ranges = [(s, (starts[b + 1] if b + 1 < len(starts) else len(insns))) for b, s in enumerate(starts)]
    succ: list[list[int]] = []
    for b, (s, e) in enumerate(ranges):
        last = insns[e - 1]
        nxt = [b + 1] if b + 1 < len(ranges) else []
        if last.is_branch:
            t = _TARGET.search(last.args)
            tgt = [block_of[index[int(t.group(1), 16)]]] if t and int(t.group(1), 16) in index else []
            succ.append(tgt + (nxt if last.conditional or not tgt else []))
        elif last.op.split(".")[0] in ("EXIT", "RET"):
            succ.append(nxt if last.conditional else [])
        else:
            succ.append(nxt)
    return ranges, succ


def _dominators(succ: list[list[int]]) -> list[set[int]]:
    n = len(succ)
    preds = [[] for _ in range(n)]
    for b, ss in enumerate(succ):
        for s in ss:
            preds[s].append(b)
    everything = set(range(n))
    dom = [everything.copy() for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in range(1, n):
            ps = [dom[p] for p in preds[b]]
            new = (set.intersection(*ps) if ps else set()) | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


def _natural_loops(succ, dom) -> list[tuple[int, int, frozenset[int]]]:
    """(head, latch, body) per back edge latch -> head (loops sharing a head stay apart: an
    mbarrier spin loop often shares its head with the main loop)."""
    preds = [[] for _ in succ]
    for b, ss in enumerate(succ):
        for s in ss:
            preds[s].append(b)
    loops = []
    for u, ss in enumerate(succ):
        for h in ss:
            if h in dom[u]:  # back edge u -> h
                body, stack = {h}, [u]
                while stack:
                    x = stack.pop()
                    if x not in body:
                        body.add(x)
                        stack.extend(preds[x])
                loops.append((h, u, frozenset(body)))
    return loops


def _is_mma(x: Insn) -> bool:
    return x.op.startswith(("HGMMA", "HMMA"))


@dataclasses.dataclass
class LoopStats:
    head: int  # address
    body: int  # instructions in the loop, every path
    step: int  # instructions on the shortest head -> back edge path
    step_ops: dict  # op class -> count on that path
    cta_barrier: bool  # BAR.SYNC 0 anywhere in the body
    steady: int = 0  # instructions on the steady step (steady_path)
    steady_ops: dict = dataclasses.field(default_factory=dict)  # op class -> count on that path


def _op_class(x: Insn) -> str | None:
    op = x.op
    if op.startswith("HGMMA"):
        return "hgmma"
    if op.startswith("HMMA"):
        return "hmma"
    if op.startswith(("BAR.SYNC", "BAR.ARV", "BAR.RED")):
        return "bar"
    if op.startswith("SYNCS"):
        return "mbar"
    if op.startswith(("LDGSTS", "UTMALDG", "UBLKCP")):
        return "async_copy"
    if op.startswith(("STG", "RED", "ATOMG", "UTMASTG", "UTMAREDG", "UBLKRED")):
        return "global_store"
    return None


def _cta_barrier(x: Insn) -> bool:
    """BAR.SYNC on barrier 0 (__syncthreads)."""
    return x.op.startswith(("BAR.SYNC", "BAR.RED")) and re.match(r"(0x0|0)\b", x.args) is not None


def main_loops(insns: list[Insn]) -> list[LoopStats]:
    insns = [x for x in insns if x.op != "NOP"]
    if not insns:
        return []
    ranges, succ = _blocks(insns)
    dom = _dominators(succ)
    loops = _natural_loops(succ, dom)
    mma_loops = [l for l in loops if any(_is_mma(insns[i]) for b in l[2] for i in range(*ranges[b]))]
    innermost = [l for l in mma_loops if not any(o[2] < l[2] for o in mma_loops)]
    out = []
    for h, latch, body in sorted(innermost):
        size = {b: ranges[b][1] - ranges[b][0] for b in body}
        path = _step_path(
            h,
            latch,
            body,
            succ,
            dom,
            size,
            [b for b in sorted(body) if any(_is_mma(insns[i]) for i in range(*ranges[b]))],
        )
        ops: dict[str, int] = {
            "first_gemm_macs": _first_chain_macs([insns[i] for b in path for i in range(*ranges[b])])
        }
        for b in path:
            for i in range(*ranges[b]):
                if c := _op_class(insns[i]):
                    ops[c] = ops.get(c, 0) + 1
                    if c in ("hgmma", "hmma"):
                        ops["macs"] = ops.get("macs", 0) + _macs(insns[i])
        steady = _steady_path(
            h, latch, body, succ, dom, [[insns[i] for i in range(*ranges[b])] for b in range(len(ranges))]
        )
        steady_ops = _path_ops([insns[i] for b in steady for i in range(*ranges[b])])
        out.append(
            LoopStats(
                insns[ranges[h][0]].addr,
                sum(size.values()),
                sum(size[b] for b in path),
                ops,
                any(_cta_barrier(insns[i]) for b in body for i in range(*ranges[b])),
                sum(size[b] for b in steady),
                steady_ops,
            )
        )
    return out


def _path_ops(insns: list[Insn]) -> dict[str, int]:
    ops: dict[str, int] = {"first_gemm_macs": _first_chain_macs(insns), "lone_hgmma": _lone_groups(insns)}
    for x in insns:
        if c := _op_class(x):
            ops[c] = ops.get(c, 0) + 1
            if c in ("hgmma", "hmma"):
                ops["macs"] = ops.get("macs", 0) + _macs(x)
    return ops


def _steady_path(h, latch, body, succ, dom, block_insns):
    """The steady step (FA3's counting, docs/fa3-profile.md): the head -> latch
    path over the loop's forward edges (inner loops taken once) that issues the most tensor-core
    instructions, then the most async copies (cp.async, TMA loads), then the most global stores
    and reductions, then has the fewest instructions. It skips masking branches but keeps the
    next step's loads and any per-step dQ traffic."""

    def weight(b):
        cls = [_op_class(x) for x in block_insns[b]]
        return (
            -sum(c in ("hgmma", "hmma") for c in cls),
            -cls.count("async_copy"),
            -cls.count("global_store"),
            len(block_insns[b]),
        )

    # topological order of the forward-edge DAG from the head (depth-first post order, reversed)
    order, seen, stack = [], {h}, [(h, iter(succ[h]))]
    while stack:
        b, it = stack[-1]
        s = next((x for x in it if x in body and x not in dom[b] and x not in seen), None)
        if s is None:
            order.append(b)
            stack.pop()
        else:
            seen.add(s)
            stack.append((s, iter(succ[s])))
    best = {h: (weight(h), None)}
    for b in reversed(order):
        if b not in best:
            continue
        for s in succ[b]:
            if s in body and s not in dom[b]:
                cand = tuple(x + y for x, y in zip(best[b][0], weight(s)))
                if s not in best or cand < best[s][0]:
                    best[s] = (cand, b)
    if latch not in best:
        return [h]
    path, b = [], latch
    while b is not None:
        path.append(b)
        b = best[b][1]
    return path[::-1]


def _shortest(src, dst, body, succ, dom, size):
    """Fewest instructions from block src to dst over the loop's forward edges (back edges
    dropped, so inner loops are taken once); the blocks in order, or None."""
    dist, prev, todo = {src: size[src]}, {src: None}, {src}
    while todo:
        b = min(todo, key=dist.get)
        todo.discard(b)
        for s in succ[b]:
            if s not in body or s in dom[b]:  # leaves the loop, or a back edge
                continue
            if dist[b] + size[s] < dist.get(s, 1 << 60):
                dist[s], prev[s] = dist[b] + size[s], b
                todo.add(s)
    if dst not in dist:
        return None
    path, b = [], dst
    while b is not None:
        path.append(b)
        b = prev[b]
    return path[::-1]


def _step_path(h, latch, body, succ, dom, size, mma_blocks):
    """The FULL step: the shortest head -> latch path through every block holding tensor-core
    instructions, in address order (conditional code without MMA, such as PARTIAL masking, is
    skipped; a GEMM issued under a branch is kept); the plain shortest path when no path passes
    them all (alternative MMA blocks)."""
    stops = [h] + [b for b in mma_blocks if b != h and b != latch] + [latch]
    path = [h]
    for a, b in zip(stops, stops[1:]):
        seg = _shortest(a, b, body, succ, dom, size) if a != b else [a]
        if seg is None:
            return _shortest(h, latch, body, succ, dom, size) or [h]
        path += seg[1:]
    return path


def _lone_groups(insns: list[Insn]) -> int:
    """wgmma groups of one HGMMA: a WARPGROUP.ARRIVE, one HGMMA that commits (gsb0), nothing
    else issued to the tensor cores before the group is waited on."""
    lone, run = 0, 0
    for x in insns:
        if x.op.startswith("WARPGROUP.ARRIVE"):
            run = 0
        elif x.op.startswith("HGMMA"):
            run += 1
            if re.search(r"\bgsb0\b", x.args):
                lone += run == 1
                run = 0
    return lone


def _first_chain_macs(insns: list[Insn]) -> int:
    """Multiply-accumulates of the first wgmma accumulation chain (the HGMMA run into one
    accumulator that opens the step: its S = Q K^T, per warpgroup)."""
    macs, dest = 0, None
    for x in insns:
        if x.op.startswith("HGMMA"):
            d = x.args.split(",")[0].strip()
            if dest is not None and (d != dest or re.search(r"\bRZ\s*,\s*!UPT", x.args)):
                break
            macs, dest = macs + _macs(x), d
    return macs


_MMA_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)")
# HMMA shapes are per warp: HMMA.16816 = m16n8k16, HMMA.1688 = m16n8k8, HMMA.884 = m8n8k4
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "1684": (16, 8, 4), "884": (8, 8, 4), "16832": (16, 8, 32)}


def _shape(x: Insn) -> tuple[int, int, int] | None:
    part = x.op.split(".")[1] if "." in x.op else ""
    if x.op.startswith("HGMMA"):
        m = _MMA_SHAPE.match(part)
        return tuple(int(v) for v in m.groups()) if m else None
    return _HMMA_SHAPES.get(part)


def _macs(x: Insn) -> int:
    s = _shape(x)
    return s[0] * s[1] * s[2] if s else 0


def mma_summary(insns: list[Insn]) -> str:
    """'8 HGMMA SS 64x128x16 + 8 HGMMA RS 64x128x16' style counts over the whole kernel."""
    counts: dict[str, int] = {}
    for x in insns:
        if x.op.startswith("HGMMA"):
            kind = "RS" if re.match(r"R\d+\s*,\s*R\d+", x.args) else "SS"
            key = f"HGMMA {kind} {x.op.split('.')[1]}"
        elif x.op.startswith("HMMA"):
            key = f"HMMA {'.'.join(x.op.split('.')[1:])}"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return " + ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "0"


def count_ops(insns: list[Insn]) -> dict[str, int]:
    def n(pred):
        return sum(1 for x in insns if pred(x.op))

    return {
        "hgmma": n(lambda o: o.startswith("HGMMA")),
        "hmma": n(lambda o: o.startswith("HMMA")),
        "tma_load": n(lambda o: o.startswith("UTMALDG")),
        "tma_store": n(lambda o: o.startswith(("UTMASTG", "UTMAREDG"))),
        "cp_async": n(lambda o: o.startswith("LDGSTS")),
        "setmaxnreg": n(lambda o: o.startswith("USETMAXREG")),
        "bar": n(lambda o: o.startswith(("BAR.SYNC", "BAR.ARV", "BAR.RED"))),
        "mbar": n(lambda o: o.startswith("SYNCS")),
        "instructions": len([x for x in insns if x.op != "NOP"]),
    }


# ----------------------------------------------------------------------------------------------
# Occupancy
# ----------------------------------------------------------------------------------------------
SM_LIMITS = {  # smem per SM usable by CTAs, per CTA reserved by the system, max CTAs
    "sm_80": (167936, 1024, 32),
    "sm_90a": (233472, 1024, 32),
}


def ctas_per_sm(arch: str, regs: int, smem: int, threads: int) -> int:
    smem_sm, reserved, max_ctas = SM_LIMITS.get(arch, SM_LIMITS["sm_80"])
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = (65536 // per_warp) // warps if per_warp else max_ctas
    by_smem = smem_sm // (smem + reserved)
    by_threads = 2048 // (warps * 32)
    return max(0, min(by_regs, by_smem, by_threads, max_ctas))


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def _family(name: str) -> str:
    """fwd, bwd (the GEMM kernels of the backward) or aux (delta / prep kernels)."""
    n = name.lower()
    if "prep" in n or "delta" in n:
        return "aux"
    if "bwd" in n or "dkdv" in n or "_dq" in n:
        return "bwd"
    return "fwd"


def _dtype_of(name: str) -> str:
    n = name.lower()
    return "bf16" if "bfloat16" in n else "fp16" if "half" in n else "fp32" if "float" in n else ""


def analyse(row: dict, insns: list[Insn], step_tile: tuple[int, int, int] | None) -> dict:
    """Fill row with the SASS counts, main loops and the tensor-core work ratio."""
    row.update(count_ops(insns))
    row["mma"] = mma_summary(insns)
    loops = main_loops(insns)
    row["loops"] = [dataclasses.asdict(l) for l in loops]
    row["ctas_per_sm"] = ctas_per_sm(row["arch"], row["registers"], row["smem"], row["threads"])
    full = min(loops, key=lambda l: l.step, default=None)
    row["step_instructions"] = full.step if full else None
    row["body_instructions"] = full.body if full else None
    row["step_mma"] = (full.step_ops.get("hgmma", 0) + full.step_ops.get("hmma", 0)) if full else None
    row["step_barriers"] = full.step_ops.get("bar", 0) if full else None
    row["step_mbarrier_ops"] = full.step_ops.get("mbar", 0) if full else None
    row["cta_barrier_in_loop"] = any(l.cta_barrier for l in loops)
    # the steady step: the main loop whose steady path issues the most MMA, async copies and
    # global stores, then has the fewest instructions
    steady = min(
        loops,
        key=lambda l: (
            -(l.steady_ops.get("hgmma", 0) + l.steady_ops.get("hmma", 0)),
            -l.steady_ops.get("async_copy", 0),
            -l.steady_ops.get("global_store", 0),
            l.steady,
        ),
        default=None,
    )
    row["steady_instructions"] = steady.steady if steady else None
    row["steady_mma"] = (steady.steady_ops.get("hgmma", 0) + steady.steady_ops.get("hmma", 0)) if steady else None
    row["steady_async_copies"] = steady.steady_ops.get("async_copy", 0) if steady else None
    row["steady_lone_hgmma"] = steady.steady_ops.get("lone_hgmma", 0) if steady else None
    row["steady_global_stores"] = steady.steady_ops.get("global_store", 0) if steady else None
    row["steady_per_element"] = None
    if steady and step_tile:  # step covers BM x BN score elements, every warp issuing
        bm, bn, _ = step_tile
        row["steady_per_element"] = round(steady.steady * (row["threads"] // 32) / (bm * bn), 3)
    elif steady and steady.steady_ops.get("hgmma") and not steady.steady_ops.get("hmma") and row.get("d"):
        # wgmma: the first GEMM chain is one warpgroup's rows x keys x D; its 4 warps issue the step
        first = steady.steady_ops["first_gemm_macs"]
        row["steady_per_element"] = round(4 * steady.steady * row["d"] / first, 3) if first else None
    row["gemms_per_step"] = row["gemm_count_from"] = None
    if full and step_tile:
        bm, bn, d = step_tile
        per_cta = full.step_ops.get("macs", 0)
        warps = row["threads"] // 32
        if full.step_ops.get("hgmma"):
            # warp-specialised kernels (setmaxnreg) leave one producer warpgroup out of the MMA
            per_cta *= max(warps // 4 - (1 if row["setmaxnreg"] else 0), 1)
        else:
            per_cta *= warps
        row["gemms_per_step"], row["gemm_count_from"] = round(per_cta / (bm * bn * d), 3), "macs"
    elif full and full.step_ops.get("hgmma") and not full.step_ops.get("hmma") and full.step_ops["first_gemm_macs"]:
        gemms = full.step_ops["macs"] / full.step_ops["first_gemm_macs"]
        row["gemms_per_step"], row["gemm_count_from"] = round(gemms, 3), "macs / first GEMM"
    needed = KERNEL_GEMMS.get(row.get("kernel"))
    row["mac_ratio"] = round(row["gemms_per_step"] / needed, 3) if needed and row["gemms_per_step"] else None
    return row


# GEMMs per step that each Triton kernel's algorithm needs (S, PV; S, dP, dV, dK; S, dP, dQ):
# its tensor-core MACs over these is its MAC ratio (1.0: nothing split into duplicates)
KERNEL_GEMMS = {"_attn_fwd": 2, "_attn_bwd_dkdv": 4, "_attn_bwd_dq": 3}


def _fmt_smem(r):
    return f"{r['smem']}" + ("+dyn" if r.get("dynamic_smem") is None else "")


def work_ratios(rows: list[dict]) -> None:
    """ratio = GEMMs issued per step / GEMMs counted (forward 2, backward 5, summed over the
    backward's kernels of one source file, arch, head dim and dtype)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        r["work_ratio"] = None
        if r["family"] != "aux" and r["hgmma"] + r["hmma"]:  # kernels without GEMMs take no part
            groups.setdefault((r["family"], r["source"], r["arch"], r["d"], r["dtype"]), []).append(r)
    for (fam, *_), rs in groups.items():
        if all(r["gemms_per_step"] is not None for r in rs):
            ratio = round(sum(r["gemms_per_step"] for r in rs) / (2 if fam == "fwd" else 5), 3)
            for r in rs:
                r["work_ratio"] = ratio


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
def _head_dim(name: str) -> int | None:
    m = re.search(r"<[^<>]*?(\d+)>", name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------
# CUDA launches: block size and dynamic shared memory as the host launchers set them
# ----------------------------------------------------------------------------------------------
# The compiled object is linked with a stand-in CUDA runtime that records every launch (kernel,
# threads, dynamic smem) instead of running it, and each launcher declared in attention.h
#   cudaError_t NAME(const ARGS& args, DType dtype, int head_dim, cudaStream_t stream);
# is called for every dtype and head dim with a 4096-token, 16/4-head problem, once as a
# compute-capability 8.0 device and once as 9.0.
_LAUNCHER = re.compile(
    r"cudaError_t\s+(\w+)\(\s*const\s+(\w+)&\s*\w*,\s*DType\s+\w*,\s*int\s+\w*,\s*cudaStream_t\s*\w*\)\s*;"
)
_STRUCT = re.compile(r"struct\s+(\w+Args)\s*\{(.*?)\};", re.S)
_FIELD = re.compile(r"^\s*((?:const\s+)?[\w:]+\s*\*?)\s*([\w\s,*]+);", re.M)

_FAKE_RUNTIME = r"""
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include "attention/attention.h"

static int g_arch = 90;
static std::map<const void*, std::string> g_names;
static dim3 g_grid, g_block;
static size_t g_smem;
static cudaStream_t g_stream;
static int fake_encode() { return 0; }
static cudaError_t record(const void* fn, dim3 block, size_t smem) {
  auto it = g_names.find(fn);
  std::printf("launch %s %u %zu\n", it == g_names.end() ? "?" : it->second.c_str(), block.x * block.y * block.z, smem);
  return cudaSuccess;
}

extern "C" {
void** CUDARTAPI __cudaRegisterFatBinary(void*) { static void* h; return &h; }
void CUDARTAPI __cudaRegisterFatBinaryEnd(void**) {}
void CUDARTAPI __cudaUnregisterFatBinary(void**) {}
void CUDARTAPI __cudaRegisterFunction(void**, const char* host, char* device, const char*, int, uint3*, uint3*, dim3*,
                                      dim3*, int*) { g_names[host] = device; }
unsigned CUDARTAPI __cudaPushCallConfiguration(dim3 grid, dim3 block, size_t smem, struct CUstream_st* stream) {
  g_grid = grid; g_block = block; g_smem = smem; g_stream = stream; return 0;
}
cudaError_t CUDARTAPI __cudaPopCallConfiguration(dim3* grid, dim3* block, size_t* smem, void* stream) {
  *grid = g_grid; *block = g_block; *smem = g_smem; *static_cast<cudaStream_t*>(stream) = g_stream; return cudaSuccess;
}
cudaError_t CUDARTAPI __cudaGetKernel(cudaKernel_t* k, const void* fn) { *k = (cudaKernel_t)fn; return cudaSuccess; }
cudaError_t CUDARTAPI __cudaLaunchKernel(cudaKernel_t k, dim3, dim3 block, void**, size_t smem, cudaStream_t) {
  return record((const void*)k, block, smem);
}
cudaError_t CUDARTAPI __cudaLaunchKernel_ptsz(cudaKernel_t k, dim3, dim3 block, void**, size_t smem, cudaStream_t) {
  return record((const void*)k, block, smem);
}
cudaError_t CUDARTAPI cudaLaunchKernel(const void* fn, dim3, dim3 block, void**, size_t smem, cudaStream_t) {
  return record(fn, block, smem);
}
cudaError_t CUDARTAPI cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr attr, int) {
  *v = attr == cudaDevAttrComputeCapabilityMajor ? g_arch / 10 : attr == cudaDevAttrComputeCapabilityMinor ? 0 : 1 << 20;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t CUDARTAPI cudaFuncGetAttributes(struct cudaFuncAttributes* a, const void*) {
  std::memset(a, 0, sizeof(*a)); a->binaryVersion = a->ptxVersion = g_arch; a->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetDriverEntryPointByVersion(const char*, void** fn, unsigned int, unsigned long long,
                                                      enum cudaDriverEntryPointQueryResult* status) {
  *fn = (void*)&fake_encode; if (status) *status = cudaDriverEntryPointSuccess; return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetDriverEntryPoint(const char*, void** fn, unsigned long long,
                                             enum cudaDriverEntryPointQueryResult* status) {
  *fn = (void*)&fake_encode; if (status) *status = cudaDriverEntryPointSuccess; return cudaSuccess;
}
// __device__ flags a launcher reads (e.g. "this image has the sm_90a body") read as 1: the
// stand-in device runs the image built for its arch
cudaError_t CUDARTAPI cudaMemcpyFromSymbol(void* dst, const void*, size_t count, size_t, enum cudaMemcpyKind) {
  std::memset(dst, 0, count);
  if (count == sizeof(int)) *static_cast<int*>(dst) = 1;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaPeekAtLastError(void) { return cudaSuccess; }
}
"""


def _fill_args(struct_body: str) -> str:
    """C++ statements filling a.<field> for a [4096, 16 | 4, D] problem: pointers to a fake
    aligned address, sizes, strides (row = heads * D, head = D) and the scale."""
    lines = []
    for m in _FIELD.finditer(re.sub(r"//[^\n]*", "", struct_body)):
        ctype, names = m.group(1).strip(), [n.strip() for n in m.group(2).split(",")]
        for n in names:
            n = n.lstrip("*").strip()
            if "*" in ctype or "*" in m.group(2):
                lines.append(f"a.{n} = reinterpret_cast<decltype(a.{n})>(uintptr_t{{1}} << 20);")
            elif n in ("nq", "nk"):
                lines.append(f"a.{n} = {LAUNCH_SHAPE['n']};")
            elif n == "hq":
                lines.append(f"a.hq = {LAUNCH_SHAPE['hq']};")
            elif n == "hkv":
                lines.append(f"a.hkv = {LAUNCH_SHAPE['hkv']};")
            elif n.endswith("row_stride"):
                heads = LAUNCH_SHAPE["hkv"] if n[0] in "kv" else LAUNCH_SHAPE["hq"]
                lines.append(f"a.{n} = {heads} * head_dim;")
            elif n.endswith("head_stride"):
                lines.append(f"a.{n} = head_dim;")
            elif n == "scale":
                lines.append("a.scale = 0.125f;")
    return "\n    ".join(lines)


def probe_launches(obj: Path, csrc: Path, nvcc: str, tmp: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """{(arch, mangled kernel): (threads, dynamic smem)} for every launch the launchers defined in
    obj make; {} when the probe cannot be built (the report then shows static smem only)."""
    header = (csrc / "attention" / "attention.h").read_text()
    structs = dict(_STRUCT.findall(header))
    defined = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
    calls = []
    for name, args_type in _LAUNCHER.findall(header):
        if args_type in structs and re.search(rf"\btk::{name}\(", defined):
            calls.append(f"""  for (int dt : {{1, 2}}) for (int head_dim : {{32, 64, 128, 256}}) {{
    tk::{args_type} a{{}};
    {_fill_args(structs[args_type])}
    tk::{name}(a, static_cast<tk::DType>(dt), head_dim, nullptr);
  }}""")
    if not calls:
        return {}
    main = "int main(int, char** argv) {\n  g_arch = std::atoi(argv[1]);\n" + "\n".join(calls) + "\n  return 0;\n}\n"
    (tmp / "probe.cpp").write_text(_FAKE_RUNTIME + main)
    cuda_inc = [f"-I{d}" for d in cuda_include_dirs(nvcc)] or [f"-I{Path(nvcc).parent.parent / 'include'}"]
    # other runtime calls the launchers make (memsets, ...) succeed and do nothing
    ours = set(re.findall(r"CUDARTAPI\s+(\w+)\(", _FAKE_RUNTIME))
    undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True).stdout.split()
    # ... and the project's functions from other sources (tk::) return 1: true for a check such
    # as attention_sm90_supported, an error for another launcher (whose launches are its own)
    stubs = [(u, 0) for u in undefined if re.match(r"_*cu", u) and u not in ours]
    stubs += [(u, 1) for u in undefined if u.startswith("_ZN2tk")]
    (tmp / "stubs.c").write_text("".join(f"int {u}(void) {{ return {v}; }}\n" for u, v in stubs))
    exe = tmp / "probe"
    cxx = shutil.which("g++") or "c++"
    build = subprocess.run(
        [
            cxx,
            "-std=c++17",
            "-O0",
            "-w",
            f"-I{csrc}",
            *cuda_inc,
            str(tmp / "probe.cpp"),
            "-x",
            "c",
            str(tmp / "stubs.c"),
            "-x",
            "none",
            str(obj),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
    )
    if build.returncode:
        print(
            f"launch probe for {obj.name} did not build (dynamic smem not shown):\n{build.stderr[-2000:]}",
            file=sys.stderr,
        )
        return {}
    out = {}
    for cap, arch in ((80, "sm_80"), (90, "sm_90a")):
        run = subprocess.run([str(exe), str(cap)], capture_output=True, text=True, timeout=60)
        for m in re.finditer(r"^launch (\S+) (\d+) (\d+)$", run.stdout, re.M):
            out[(arch, m.group(1))] = (int(m.group(2)), int(m.group(3)))
    return out


@dataclasses.dataclass
class CudaBuild:
    """One source compiled for the report: compiler output, ptxas' kernels, SASS per (arch,
    mangled name), launch bounds, and (threads, dynamic smem) per launched kernel."""

    source: Path
    returncode: int
    output: str
    kernels: list[KernelInfo]
    sass: dict
    max_threads: dict
    launches: dict

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not warnings_in(self.output)


def compile_cuda(src: Path, archs=DEFAULT_ARCHS, csrc: Path = CSRC) -> CudaBuild:
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit bin or the triton wheel)")
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "k.o"
        rc, text, kernels = compile_and_report(src, archs, keep_obj=obj, csrc=csrc)
        if rc:
            return CudaBuild(src, rc, text, kernels, {}, {}, {})
        sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
        elf = subprocess.run([cuobjdump, "-elf", str(obj)], capture_output=True, text=True, check=True).stdout
        launches = probe_launches(obj, csrc, find_nvcc(), Path(tmp))
    return CudaBuild(src, rc, text, kernels, parse_sass(sass), parse_max_threads(elf), launches)


def compile_all(files: list[Path], archs=DEFAULT_ARCHS, jobs: int = 2, csrc: Path = CSRC) -> list[CudaBuild]:
    with concurrent.futures.ThreadPoolExecutor(max(1, min(jobs, 2))) as pool:
        return list(pool.map(lambda f: compile_cuda(f, archs, csrc), files))


def cuda_rows(builds: list[CudaBuild]) -> list[dict]:
    """Report rows of every kernel the builds hold (stubs for an arch a kernel is not built for
    are left out)."""
    rows = []
    for b in builds:
        for k in b.kernels:
            insns = b.sass.get((k.arch, k.mangled), [])
            if len([x for x in insns if x.op != "NOP"]) <= 4:
                continue  # a stub for an arch the kernel is not built for (it only exits)
            short = re.sub(r"^.*::", "", k.name.split("<")[0].split("(")[0])
            row = {
                "backend": "cuda",
                "kernel": short,
                "source": k.source,
                "arch": k.arch,
                "d": _head_dim(k.name),
                "dtype": _dtype_of(k.name),
                "registers": k.registers,
                "spill_stores": k.spill_stores,
                "spill_loads": k.spill_loads,
                "stack": k.stack,
                "smem": k.smem,
                "dynamic_smem": None,
                "threads": b.max_threads.get((k.arch, k.mangled), 0),
                "family": _family(short),
                "name": k.name,
            }
            if (k.arch, k.mangled) in b.launches:
                row["threads"], row["dynamic_smem"] = b.launches[(k.arch, k.mangled)]
                row["smem"] += row["dynamic_smem"]
            rows.append(analyse(row, insns, None))
    return rows


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
LAUNCH_SHAPE = {"n": 4096, "hq": 16, "hkv": 4}
# the device each arch stands for when the package looks its config up by device name
DEVICE_NAMES = {80: "NVIDIA A100-SXM4-80GB", 90: "NVIDIA H100 80GB HBM3"}


class _TargetOnlyDriver:
    """Enough of a triton driver for JITFunction.run(warmup=True): it names the target and
    never touches a device. The device id is the capability, so each arch gets its own caches."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.capability = capability
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return self.capability

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def _arch_capability(arch: str) -> int:
    return int(re.sub(r"\D", "", arch))


def record_triton_launches(d: int, dtype: str, capability: int, softcap: float = 0.0):
    """Run the package's triton forward and backward on CPU tensors with every kernel launch
    recorded, not executed: [(kernel name, JITFunction, args, kwargs)]. The package picks its
    config as for a CUDA device of this capability."""
    import importlib

    import torch

    import transfusion_kernels as tk

    mod = importlib.import_module(TRITON_MODULE)
    root = Path(os.environ.get(REPORT_ROOT_ENV) or ROOT).resolve()
    if not Path(mod.__file__).resolve().is_relative_to(root):
        raise RuntimeError(f"{TRITON_MODULE} was imported from {mod.__file__}, not from the checkout {root}")
    from triton.runtime.jit import JITFunction

    launches = []

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, self.fn, args, kwargs))

    orig_pick = mod.pick_config

    def pick_config(*args, **kwargs):  # the config the package picks for a CUDA device
        args = list(args)
        if len(args) >= 3:
            args[2] = torch.device("cuda", 0)
        else:
            kwargs["device"] = torch.device("cuda", 0)
        return orig_pick(*args, **kwargs)

    patches = {name: Recorder(name, fn) for name, fn in vars(mod).items() if isinstance(fn, JITFunction)}
    if not patches:  # imported under TRITON_INTERPRET: forward() would run the interpreter at full size
        raise RuntimeError(f"{TRITON_MODULE} was imported with TRITON_INTERPRET set; compile in a process without it")
    patches["pick_config"] = pick_config
    if hasattr(mod, "_check_device"):
        patches["_check_device"] = lambda *a, **k: None
    saved = {name: getattr(mod, name) for name in patches}
    fake_cuda = {
        "get_device_capability": lambda *a, **k: (capability // 10, capability % 10),
        "get_device_name": lambda *a, **k: DEVICE_NAMES[capability],
        "current_device": lambda: 0,
    }
    saved_cuda = {name: getattr(torch.cuda, name) for name in fake_cuda}
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    n, hq, hkv = LAUNCH_SHAPE["n"], LAUNCH_SHAPE["hq"], LAUNCH_SHAPE["hkv"]
    try:
        for name, value in patches.items():
            setattr(mod, name, value)
        for name, value in fake_cuda.items():
            setattr(torch.cuda, name, value)
        mask = tk.HybridMask.causal(torch.tensor([0, n], dtype=torch.int32))
        q = torch.empty(n, hq, d, dtype=torch_dtype)
        k = torch.empty(n, hkv, d, dtype=torch_dtype)
        v = torch.empty(n, hkv, d, dtype=torch_dtype)
        # checkouts before the interval-union masks: kv_start / kv_end and (tables, blocks)
        starts, ends = (mask.starts, mask.ends) if hasattr(mask, "starts") else (mask.kv_start, mask.kv_end)
        plan = mod.prepare(mask, q, k)
        plan = plan if isinstance(plan, tuple) else (plan,)
        cap = (softcap,) if softcap else ()  # checkouts before softcap take no such argument
        out, lse = mod.forward(q, k, v, starts, ends, *plan, d**-0.5, *cap)
        mod.backward(torch.empty_like(q), q, k, v, out, lse, starts, ends, *plan, d**-0.5, *cap)
    finally:
        for name, value in saved.items():
            setattr(mod, name, value)
        for name, value in saved_cuda.items():
            setattr(torch.cuda, name, value)
    return launches


def compile_launch(fn, args, kwargs, capability: int):
    """Compile one recorded launch through the JIT (its binder computes the specialisation) for
    the given capability; returns (CompiledKernel, ptxas log)."""
    import triton
    from triton.runtime import driver

    log = io.StringIO()
    previous = getattr(driver, "_active", None)  # reading driver.active would look for a GPU
    driver.set_active(_TargetOnlyDriver(capability))
    try:
        knobs = getattr(triton, "knobs", None)
        with contextlib.redirect_stdout(log):
            if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
                with knobs.nvidia.scope():
                    knobs.nvidia.dump_ptxas_log = True
                    kernel = fn.warmup(*args, grid=(1,), **kwargs)
            else:
                kernel = fn.warmup(*args, grid=(1,), **kwargs)
    finally:
        driver.set_active(previous)
    text = log.getvalue()
    if "Used" not in text:  # an older triton without the log knob: run its ptxas once more
        text = _ptxas_log(kernel.asm["ptx"], capability)
    return kernel, text


def _ptxas_log(ptx: str, capability: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    try:
        ptxas = get_ptxas(capability).path
    except TypeError:
        ptxas = get_ptxas().path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        return subprocess.run(
            [
                ptxas,
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(capability)}",
                f.name,
                "-o",
                os.devnull,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr


def triton_rows_for(
    d: int, dtype: str, arch: str, kernels: str | None = None, keep_ir: bool = False, softcap: float = 0.0
) -> list[dict]:
    """Report rows of every kernel the package launches for (d, dtype) on arch (with softcap:
    the launches of a softcapped call)."""
    capability = _arch_capability(arch)
    cuobjdump = find_cuobjdump()
    rows = []
    for name, fn, args, kwargs in record_triton_launches(d, dtype, capability, softcap):
        if kernels and not re.search(kernels, name):
            continue
        kernel, log = compile_launch(fn, args, kwargs, capability)
        (info,) = parse_ptxas(log) or [KernelInfo("", arch, name)]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        (insns,) = parse_sass(sass).values()
        consts = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        meta = kernel.metadata
        num_warps = getattr(meta, "num_warps", kwargs.get("num_warps", 4))
        bm, bn, dp = consts.get("BM"), consts.get("BN"), consts.get("DP", d)
        tile = (bm, bn, dp) if bm and bn else None
        row = {
            "backend": "triton",
            "kernel": name,
            "source": TRITON_MODULE.replace(".", "/") + ".py",
            "arch": "sm_90a" if capability == 90 else f"sm_{capability}",
            "d": d,
            "dtype": dtype,
            "registers": info.registers,
            "spill_stores": info.spill_stores,
            "spill_loads": info.spill_loads,
            "stack": info.stack,
            "smem": meta.shared,
            "dynamic_smem": meta.shared,
            "threads": num_warps * 32,
            "family": _family(name),
            "name": name,
            "config": {
                "num_warps": num_warps,
                "num_stages": getattr(meta, "num_stages", kwargs.get("num_stages")),
                **{k: v for k, v in consts.items() if isinstance(v, (int, str, bool))},
            },
        }
        if keep_ir:  # the TTIR and the launch's runtime arguments, to check the specialisation against
            row["ttir"] = kernel.asm.get("ttir", "")
            row["launch_args"] = [
                (
                    p,
                    "tensor" if hasattr(a, "data_ptr") else type(a).__name__,
                    a.data_ptr() if hasattr(a, "data_ptr") else a,
                )
                for p, a in zip(fn.arg_names, args)
            ]
        rows.append(analyse(row, insns, tile))
    return rows


def _triton_job(job):
    return triton_rows_for(*job)


def triton_dims() -> list[int]:
    """Head dims of the package's GPU config table, read at run time (GPU_CONFIGS keyed by padded
    head dim first, or the shipped configs file), else the supported powers of two."""
    import importlib

    mod = importlib.import_module(TRITON_MODULE)
    keys = list(getattr(mod, "GPU_CONFIGS", {}))
    if not keys and hasattr(mod, "load_configs") and hasattr(mod, "SHIPPED_CONFIGS"):
        keys = list(mod.load_configs(mod.SHIPPED_CONFIGS))
    dims = {next((x for x in k if isinstance(x, int) and x >= 16), None) for k in keys if isinstance(k, tuple)}
    return sorted(dims - {None}) or [32, 64, 128, 256]


def triton_rows(archs, dims=None, dtypes=TRITON_DTYPES, kernels=None, jobs=2, keep_ir=False, softcap=0.0) -> list[dict]:
    """All Triton rows, compiled in at most `jobs` (<= 2) worker processes (keep_ir: with each
    kernel's TTIR)."""
    import multiprocessing

    dims = dims or triton_dims()
    work = [(d, t, a, kernels, keep_ir, softcap) for a in archs for t in dtypes for d in dims]
    interpret = os.environ.get("TRITON_INTERPRET")
    if jobs <= 1 and not interpret:
        return [r for job in work for r in _triton_job(job)]
    # Fresh workers: the package picks the interpreter at import, so they start without it
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max(1, min(jobs, 2)), mp_context=ctx) as pool:
            return [r for rs in pool.map(_triton_job, work) for r in rs]
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
COLUMNS = (
    "kernel",
    "arch",
    "d",
    "dtype",
    "regs",
    "spills",
    "smem",
    "thr",
    "CTA/SM",
    "tensor-core ops",
    "TMA ld/st",
    "cp.async",
    "setmaxnreg",
    "step instr",
    "steady step",
    "warp-instr/elem",
    "loop body",
    "step MMA",
    "step bar",
    "step mbar",
    "bar 0 in loop",
    "GEMMs/step",
    "work ratio",
    "MAC ratio",
    "lone HGMMA",
)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:

        def v(x):
            return "-" if x is None else str(x)

        cells = [
            f"{r['backend']} {r['kernel']}",
            r["arch"],
            v(r["d"]),
            r["dtype"],
            r["registers"],
            f"{r['spill_stores']}/{r['spill_loads']}",
            _fmt_smem(r),
            r["threads"],
            r["ctas_per_sm"],
            r["mma"],
            f"{r['tma_load']}/{r['tma_store']}",
            r["cp_async"],
            r["setmaxnreg"],
            v(r["step_instructions"]),
            v(r.get("steady_instructions")),
            v(r.get("steady_per_element")),
            v(r["body_instructions"]),
            v(r["step_mma"]),
            v(r["step_barriers"]),
            v(r["step_mbarrier_ops"]),
            "yes" if r["cta_barrier_in_loop"] else "no",
            v(r["gemms_per_step"]),
            v(r["work_ratio"]),
            v(r.get("mac_ratio")),
            v(r.get("steady_lone_hgmma")),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Estimate calibrated on FlashAttention-3 (docs/fa3-profile.md)
# ----------------------------------------------------------------------------------------------
H100 = {"sms": 132, "ghz": 1.83, "flop_per_clock": 4096, "schedulers": 4}  # SXM5, dense bf16/fp16
FA3 = {"fwd": (0.229, 2, (0.88, 0.97)), "bwd": (0.475, 5, (0.70, 0.77))}  # warp-instr/elem, GEMMs, measured/model
ESTIMATE_MODEL = (
    "Model (an estimate, not a measurement): per score element an H100 SXM5 SM (132 SMs, 1.83 GHz) "
    "spends the issued tensor-core FLOP (2 x D per GEMM issued) / 4096 FLOP per clock, plus the "
    "warp-instructions per element / 4 schedulers, with no overlap; TFLOP/s are effective (forward "
    "4 x D, backward 10 x D FLOP per element, recomputed GEMMs not counted). The same model gives "
    "FlashAttention-3 (D = 128: forward 0.229, backward 0.475 warp-instr/elem) {fa3_fwd:.0f} / "
    "{fa3_bwd:.0f} TFLOP/s against its measured ~600-660 / ~500-550, so the estimate is the model times "
    "FA3's measured/model factor: forward 0.88-0.97, backward 0.70-0.77. FA3 earns its factor "
    "with warp specialisation and a ping-pong that overlaps softmax with the GEMMs; a kernel with "
    "CTA-wide barriers in its step and no producer warps (the Triton kernels) may fall below the band."
)


def model_tflops(d: int, per_element: float, gemms: float, effective_gemms: float) -> float:
    """TFLOP/s of the model: (issued GEMM FLOP / tensor rate + instructions / issue rate) per
    element, effective FLOP counted."""
    clocks = 2 * d * gemms / H100["flop_per_clock"] + per_element / H100["schedulers"]
    return 2 * d * effective_gemms / clocks * H100["sms"] * H100["ghz"] * 1e9 / 1e12


def estimates(rows: list[dict]) -> list[dict]:
    """Per (head dim, dtype) of the Triton sm_90a bf16/fp16 rows: the forward and the backward
    (dk/dv + dq) through the FA3-calibrated model."""
    out = []
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r["backend"] == "triton" and r["arch"] == "sm_90a" and r["dtype"] in ("bf16", "fp16"):
            groups.setdefault((r["d"], r["dtype"]), {})[r["kernel"]] = r
    for (d, dtype), ks in sorted(groups.items()):
        for what, names, effective in (
            ("forward", ("_attn_fwd",), 2),
            ("backward", ("_attn_bwd_dkdv", "_attn_bwd_dq"), 5),
        ):
            rs = [ks.get(n) for n in names]
            if not all(r and r.get("steady_per_element") and r.get("gemms_per_step") for r in rs):
                continue
            per_element = round(sum(r["steady_per_element"] for r in rs), 3)
            gemms = round(sum(r["gemms_per_step"] for r in rs), 3)
            model = model_tflops(d, per_element, gemms, effective)
            lo, hi = FA3["fwd" if what == "forward" else "bwd"][2]
            out.append(
                {
                    "d": d,
                    "dtype": dtype,
                    "pass": what,
                    "warp_instr_per_elem": per_element,
                    "gemms": gemms,
                    "model_tflops": round(model),
                    "estimate_tflops": [round(model * lo), round(model * hi)],
                }
            )
    return out


def estimates_markdown(rows: list[dict]) -> str:
    est = estimates(rows)
    if not est:
        return ""
    fa3 = {k: model_tflops(128, v[0], v[1], v[1]) for k, v in FA3.items()}
    lines = [
        "",
        ESTIMATE_MODEL.format(fa3_fwd=fa3["fwd"], fa3_bwd=fa3["bwd"]),
        "",
        "| pass | d | dtype | warp-instr/elem | GEMMs issued per step | model TFLOP/s | estimate TFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in est:
        lo, hi = e["estimate_tflops"]
        lines.append(
            f"| {e['pass']} | {e['d']} | {e['dtype']} | {e['warp_instr_per_elem']} | {e['gemms']} | "
            f"{e['model_tflops']} | {lo}-{hi} (estimate) |"
        )
    return "\n".join(lines) + "\n"


def _sort_key(r):
    return (r["backend"], r["family"], r["kernel"], r["arch"], r["d"] or 0, r["dtype"])


def build_report(args) -> tuple[list[dict], list[str]]:
    archs = tuple(args.arch or DEFAULT_ARCHS)
    rows, failures = [], []
    if args.only in (None, "cuda"):
        files = [f.resolve() for f in args.files] or attention_sources(args.csrc)
        builds = compile_all(files, archs, args.jobs, args.csrc)
        failures = [
            f"{b.source}: compile {'failed' if b.returncode else 'warned'}\n{b.output}" for b in builds if not b.clean
        ]
        rows += [x for x in cuda_rows(builds) if not args.kernel or re.search(args.kernel, x["kernel"])]
    if args.only in (None, "triton"):
        rows += triton_rows(
            [("90a" if a.startswith("90") else a) for a in archs],
            args.dim or None,
            tuple(args.dtype or TRITON_DTYPES),
            args.kernel,
            args.jobs,
        )
    if args.dim:
        rows = [r for r in rows if r["d"] in args.dim]
    if args.dtype:
        rows = [r for r in rows if r["dtype"] in args.dtype]
    work_ratios(rows)
    rows.sort(key=_sort_key)
    return rows, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="CUDA sources (default: csrc/attention/*.cu)")
    ap.add_argument("--arch", action="append", help="SASS target, 80 or 90a (repeatable; default both)")
    ap.add_argument("--only", choices=("cuda", "triton"), help="one backend only")
    ap.add_argument("--kernel", help="regex on the kernel name")
    ap.add_argument("--dim", type=int, action="append", help="head dim (repeatable)")
    ap.add_argument("--dtype", action="append", choices=TRITON_DTYPES, help="dtype (repeatable)")
    ap.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="checkout to report on (its csrc/ and its triton module), e.g. an older commit's",
    )
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    ap.add_argument("--markdown", type=Path, help="write the table as markdown")
    ap.add_argument(
        "--load",
        type=Path,
        action="append",
        help="rows from an earlier --json instead of compiling (repeatable: merged)",
    )
    ap.add_argument("--title", help="a line written above the markdown table")
    ap.add_argument("--hot", default=".", help="regex on the kernel name: kernels that must not spill")
    ap.add_argument(
        "--spill-check",
        action="store_true",
        help="only compile the given CUDA sources (default csrc/**/*.cu) and check warnings and spills",
    )
    ap.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    args.root = args.root.resolve()
    args.csrc = args.root / "csrc"
    if args.root != ROOT:  # import the package from that checkout, here and in the workers
        os.environ[REPORT_ROOT_ENV] = str(args.root)
        use_checkout(str(args.root))
    hot = re.compile(args.hot)
    if args.spill_check:
        return spill_check(
            [f.resolve() for f in args.files] or sources(args.csrc),
            tuple(args.arch or DEFAULT_ARCHS),
            hot,
            args.jobs,
            args.csrc,
        )

    start = time.monotonic()
    if args.load:
        rows, failures = [r for f in args.load for r in json.loads(f.read_text())], []
        work_ratios(rows)
        rows.sort(key=_sort_key)
    else:
        rows, failures = build_report(args)
    table = markdown(rows) + estimates_markdown(rows)
    print(table, end="")
    print(f"{len(rows)} kernels in {time.monotonic() - start:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text((f"{args.title}\n\n" if args.title else "") + table)
    spilling = [r for r in rows if (r["spill_stores"] or r["spill_loads"]) and hot.search(r["kernel"])]
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    for r in spilling:
        print(f"SPILLS {r['backend']} {r['kernel']} {r['arch']} d={r['d']} {r['dtype']}", file=sys.stderr)
    return 1 if failures or spilling else 0


def spill_check(files, archs, hot, jobs, csrc) -> int:
    failed = False
    with concurrent.futures.ThreadPoolExecutor(max(1, min(jobs, 2))) as pool:
        results = list(pool.map(lambda f: (f, *compile_and_report(f, archs, csrc=csrc)), files))
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
            print(
                f"{name:<72} {k.arch:<7} {k.registers:>4} {k.smem:>7} {k.stack:>5} "
                f"{k.spill_stores:>5}/{k.spill_loads:<5}{flag}"
            )
    return 1 if failed else 0


# Triton 3.9 warns when this is unset and defaults to fusion on, as every earlier version did
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):  # the package picks the interpreter at import: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode)
    sys.exit(main())
