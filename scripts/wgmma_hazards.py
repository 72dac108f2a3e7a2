#!/usr/bin/env python
"""Static check of the sm_90a kernels' SASS: no register of a wgmma still in flight is touched.

PTX leaves undefined any access to the accumulator or register A operand of a
wgmma.mma_async before the wgmma.wait_group that retires it (the only exception: a later wgmma
accumulating into the same registers). The compiler does not enforce this: the asm statements
only promise their register operands at issue, so a plain read (a store of an A operand to shared
memory, a rescale of an accumulator) can land while the tensor cores still read or write it.

In the SASS, per function:
  * HGMMA.MxNxK.F32.* Rd, [Ra,] ...: Rd .. Rd + N / 2 - 1 (f32 accumulators; N / 4 for f16) and,
    for A from registers, Ra .. Ra + 3 join the open group;
  * an HGMMA with `gsb0` closes the group (wgmma.commit_group): it is then in flight;
  * WARPGROUP.DEPBAR.LE gsb0, N retires the oldest groups until N are in flight;
  * every other instruction that reads or writes one of the in-flight (or open) groups'
    registers is a hazard.
The state is propagated over the control-flow graph (basic blocks from the branches, as
kernel_report.py builds them) until it settles: a hazard on any path is reported.

    python scripts/wgmma_hazards.py                          # every csrc/**/*.cu with wgmma, sm_90a
    python scripts/wgmma_hazards.py csrc/attention/attention_bwd_sm90.cu
    python scripts/wgmma_hazards.py --sass k.sass            # cuobjdump -sass output

Exits 1 when a hazard is found or a source does not compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_report as kr  # noqa: E402

ARCH = "90a"
_REG = re.compile(r"(?<![\w.])R(\d+)(\.64)?\b")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\.(F32|F16)")
_DEPBAR = re.compile(r"gsb0\s*,\s*(0x[0-9a-f]+|\d+)")
MAX_STATES = 64  # distinct in-flight states kept per block entry
# Committed groups tracked one by one; beyond that the oldest are merged, which retires them no
# earlier than the hardware does (a DEPBAR.LE N then retires fewer groups), so nothing is missed.
MAX_GROUPS = 8


@dataclasses.dataclass(frozen=True)
class Hazard:
    function: str
    addr: int
    insn: str
    register: int
    hgmma: int  # address of the HGMMA whose register it is

    def __str__(self) -> str:
        return (
            f"{self.function}: /*{self.addr:04x}*/ {self.insn} touches R{self.register} of the HGMMA at "
            f"/*{self.hgmma:04x}*/ before the WARPGROUP.DEPBAR that retires it"
        )


def _width(op: str) -> int:
    """Registers per data operand of a load / store / shuffle-like instruction."""
    if re.search(r"\.128\b", op):
        return 4
    if re.search(r"\.64\b", op):
        return 2
    if op.startswith(("LDSM", "STSM")):
        m = re.search(r"\.(\d)$", op)
        return int(m.group(1)) if m else 1
    return 1


def registers(insn: kr.Insn) -> set[int]:
    """General registers an instruction reads or writes (guard predicate excluded)."""
    op, regs = insn.op, set()
    operands = [o.strip() for o in re.split(r",(?![^\[]*\])", insn.args) if o.strip()]
    vector = op.startswith(("LD", "ST", "ATOM", "RED", "SHFL")) and not op.startswith("LDGSTS")
    for k, operand in enumerate(operands):
        memory = "[" in operand
        for m in _REG.finditer(operand):
            base = int(m.group(1))
            n = 2 if m.group(2) else 1
            if not memory:
                if vector:
                    n = max(n, _width(op))
                elif op.startswith("CS2R") and ".32" not in op:
                    n = 2  # clears a register pair
                elif op.startswith(("IMAD.WIDE", "UIMAD.WIDE")) and k in (0, 3):
                    n = 2  # 64-bit destination and addend
                elif op.startswith(("D", "F2I.U64", "F2I.S64", "I2F.U64", "I2F.S64", "F2F.F64")):
                    n = max(n, 2)
            regs.update(range(base, base + n))
    return regs


def hgmma_registers(insn: kr.Insn) -> set[int]:
    """Accumulator and register-A registers of an HGMMA."""
    m = _HGMMA.match(insn.op)
    if not m:
        raise ValueError(f"unknown HGMMA form: {insn.op} {insn.args}")
    n, acc = int(m.group(2)), m.group(4)
    operands = [o.strip() for o in insn.args.split(",")]
    d = int(re.match(r"R(\d+)", operands[0]).group(1))
    regs = set(range(d, d + (n // 2 if acc == "F32" else n // 4)))
    if (a := re.match(r"R(\d+)$", operands[1])) is not None:  # A from registers
        regs.update(range(int(a.group(1)), int(a.group(1)) + 4))
    return regs


# A state: (committed groups oldest first, the open group); a group maps register -> HGMMA address.
State = tuple


def _step(state: State, insn: kr.Insn, function: str, out: set[Hazard]) -> State:
    groups, open_group = state
    if insn.op.startswith("HGMMA"):
        owned = dict(open_group)
        for r in hgmma_registers(insn):
            owned[r] = insn.addr
        owned_t = tuple(sorted(owned.items()))
        if re.search(r"\bgsb0\b", insn.args):
            groups += (owned_t,)
            if len(groups) > MAX_GROUPS:  # a loop that commits without waiting: merge the oldest two
                groups = (tuple(sorted(dict(groups[1] + groups[0]).items())),) + groups[2:]
            return groups, ()
        return groups, owned_t
    if insn.op.startswith("WARPGROUP.DEPBAR"):
        m = _DEPBAR.search(insn.args)
        keep = int(m.group(1), 0) if m else 0
        return groups[max(0, len(groups) - keep) :], open_group
    if insn.op.startswith(("WARPGROUP", "NOP")) or not (groups or open_group):
        return state
    touched = registers(insn)
    if touched:
        for group in (*groups, open_group):
            for r, at in group:
                if r in touched:
                    out.add(
                        Hazard(
                            function, insn.addr, f"{insn.pred + ' ' if insn.pred else ''}{insn.op} {insn.args}", r, at
                        )
                    )
    return state


def check_function(insns: list[kr.Insn], function: str = "") -> list[Hazard]:
    """Hazards of one function's instructions (cuobjdump order)."""
    insns = [x for x in insns if x.op != "NOP"]
    if not any(x.op.startswith("HGMMA") for x in insns):
        return []
    # A call is followed into its callee (with the caller's in-flight groups) and past it.
    cfg = [kr.Insn(x.addr, "@P0", "BRA", x.args) if x.op.startswith("CALL") else x for x in insns]
    ranges, succ = kr._blocks(cfg)
    entry: list[set[State]] = [set() for _ in ranges]
    entry[0].add(((), ()))
    done: list[set[State]] = [set() for _ in ranges]
    hazards: set[Hazard] = set()
    work = [0]
    while work:
        b = work.pop()
        new = entry[b] - done[b]
        if not new:
            continue
        done[b] |= new
        for state in new:
            for i in range(*ranges[b]):
                state = _step(state, insns[i], function, hazards)
            for s in succ[b]:
                if state not in entry[s]:
                    if len(entry[s]) >= MAX_STATES:
                        raise RuntimeError(f"{function}: more than {MAX_STATES} wgmma states at one block")
                    entry[s].add(state)
                    work.append(s)
    return sorted(hazards, key=lambda h: (h.addr, h.register))


def check_sass(text: str, arch: str = f"sm_{ARCH}") -> tuple[dict[str, list[Hazard]], int]:
    """{mangled function: hazards} over the functions compiled for arch, and how many HGMMA
    instructions were checked."""
    result, checked = {}, 0
    for (a, name), insns in kr.parse_sass(text).items():
        if a != arch:
            continue
        checked += sum(1 for x in insns if x.op.startswith("HGMMA"))
        result[name] = check_function(insns, name)
    return result, checked


def wgmma_sources(csrc: Path = kr.CSRC) -> list[Path]:
    """CUDA sources whose kernels may issue wgmma (they use the sm90 wgmma wrappers)."""
    return [p for p in kr.sources(csrc) if re.search(r"\bwgmma_\w+\s*[<(]", p.read_text())]


def compile_sass(source: Path, defines: tuple[str, ...] = (), csrc: Path = kr.CSRC) -> str:
    """cuobjdump -sass of source built for sm_90a with the extension's flags (ptxas -v dropped)."""
    nvcc, cuobjdump = kr.find_nvcc(), kr.find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        raise FileNotFoundError("nvcc and cuobjdump are needed (CUDA toolkit, or cuobjdump from the triton wheel)")
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "k.o"
        cmd = [c for c in kr.nvcc_command(nvcc, source, obj, (ARCH,), csrc) if c not in ("-Xptxas", "-v")]
        cmd[1:1] = [f"-D{d}" for d in defines]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{source}: compile failed\n{proc.stderr[-4000:]}")
        return subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="CUDA sources (default: csrc/**/*.cu that use wgmma)")
    ap.add_argument("--sass", type=Path, action="append", default=[], help="cuobjdump -sass output to check instead")
    args = ap.parse_args(argv)
    texts = [(str(p), p.read_text()) for p in args.sass]
    if not args.sass:
        for src in [f.resolve() for f in args.files] or wgmma_sources():
            try:
                texts.append((str(src), compile_sass(src)))
            except RuntimeError as e:
                print(f"FAIL {e}", file=sys.stderr)
                return 1
    bad = 0
    for where, text in texts:
        result, checked = check_sass(text)
        names = dict(zip(result, kr.demangle(list(result))))
        hazards = [h for hs in result.values() for h in hs]
        print(f"{where}: {len(result)} sm_{ARCH} functions, {checked} HGMMA, {len(hazards)} hazards")
        for h in hazards:
            print(f"  {names[h.function]}: {str(h).split(': ', 1)[1]}")
        bad += len(hazards)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
