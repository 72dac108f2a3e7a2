#!/usr/bin/env python3
"""Mutation test of the synchronisation in the CUDA attention kernels.

Finds every call of a synchronisation primitive (waits, arrivals, commits, fences, barriers) in
csrc/attention/*.cu, deletes one call site at a time, rebuilds that kernel's emulation object
(tests/cuda/attention_host) and runs the emulation cases of that kernel under a few schedules.
A mutant is caught when a run fails: a wrong result or NaN against the float64 oracle, an
emulation error (race, protocol), a reported deadlock or a timeout. A surviving site is either
dead code on hardware too or a behaviour the emulator does not model: both need a look.

    python scripts/sync_mutants.py --list
    python scripts/sync_mutants.py [--sample K --seed S | --shard I/N] [--json out.json] [--markdown out.md]

Exit status 1 when a site survives (or its kernel has no emulation mode).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRIMITIVES = ("mbar_wait", "mbar_arrive", "mbar_expect_tx", "wgmma_wait", "wgmma_commit", "wgmma_fence",
              "fence_proxy_async", "fence_operands", "__syncthreads", "named_bar_sync", "named_bar_arrive",
              "cp_async_wait", "cp_async_commit", "tma_store_wait", "__syncwarp")
CALL = re.compile(r"\b(?:\w+::)*(" + "|".join(PRIMITIVES) + r")\s*(?:<[^<>;()]*>)?\s*\(")

# Cases run against each mutant, in order (the first failure catches it), and the schedules.
CASES = ("nan-outside-empty-rows-d128-f16", "ring-wraps-cache-d64-f16", "gap-in-query-range-d64-f16")
SCHEDULES = (1, 2, 3)
DATA_SEED = 20240607
TIMEOUT_S = 240


@dataclass
class Site:
    file: str  # name under csrc/attention/
    line: int
    call: str  # the primitive
    start: int  # character span of the call expression in the file
    end: int
    text: str  # the source line

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _call_end(text: str, open_paren: int) -> int:
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError("unbalanced call")


def find_sites(csrc: Path) -> list[Site]:
    sites = []
    for path in sorted((csrc / "attention").glob("*.cu")):
        text = path.read_text()
        for m in CALL.finditer(text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            if "//" in text[line_start:m.start()]:
                continue  # a comment
            line_no = text.count("\n", 0, m.start()) + 1
            line = text[line_start:text.find("\n", m.start())].strip()
            sites.append(Site(path.name, line_no, m.group(1), m.start(), _call_end(text, m.end() - 1), line))
    return sites


def mutate(text: str, site: Site) -> str:
    return text[:site.start] + "(void)0" + text[site.end:]


def select(sites: list[Site], sample: int | None, seed: int, shard: str | None) -> list[Site]:
    if shard:
        i, n = map(int, shard.split("/"))
        return sites[i % n::n]
    if sample is not None and sample < len(sites):
        return sorted(random.Random(seed).sample(sites, sample), key=lambda s: (s.file, s.line))
    return sites


def run(sites: list[Site], cases, schedules, timeout: float, jobs: int, log) -> list[dict]:
    import tests.cuda.test_cuda_attention as emu  # torch and the package: only when running

    os.environ.setdefault("EMU_DEADLOCK_S", "10")
    with tempfile.TemporaryDirectory(prefix="sync_mutants_") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        exe = emu.emulation_build(base)
        work = base / "work"
        work.mkdir()
        for case in cases:  # the kernels as they are must pass, or no failure means anything
            for schedule in schedules:
                emu.emulation_check(exe, work, case, [m for ms in emu.EMU_MODES.values() for m in ms], schedule,
                                    DATA_SEED, timeout=timeout)

        def one(k: int, site: Site) -> dict:
            t0 = time.time()
            row = {**asdict(site), "where": site.where, "caught_by": None, "reason": None}
            del row["start"], row["end"]
            modes = emu.EMU_MODES.get(site.file)
            if modes is None:
                row["reason"] = "UNTESTED: no emulation mode runs this kernel"
                return row
            mdir = Path(tmp) / f"m{k}"
            mdir.mkdir()
            text = (emu.CSRC / "attention" / site.file).read_text()
            proc = emu.emulation_compile(mdir, site.file, mutate(text, site))
            if proc.returncode != 0:
                row["caught_by"], row["reason"] = "build", proc.stderr.strip().splitlines()[-1][:200]
                return row
            objects = [mdir / f"{site.file}.o"]
            objects += [base / f"{n}.o" for n in (*emu.KERNEL_SOURCES, "emu.cpp", "driver.cpp") if n != site.file]
            exe = emu.emulation_link(mdir, objects, mdir / "attention_emu")
            work = mdir / "work"
            work.mkdir()
            for case in cases:
                for schedule in schedules:
                    try:
                        emu.emulation_check(exe, work, case, modes, schedule, DATA_SEED, timeout=timeout)
                    except AssertionError as e:
                        msg = " ".join(str(e).split())
                        m = re.search(r"emulation error: [^(]*|deadlock[^;]*|no result within \d+ s", msg)
                        row["caught_by"] = f"{case} / schedule {schedule}"
                        row["reason"] = (m.group(0) if m else msg)[:200].strip()
                        break
                if row["caught_by"]:
                    break
            status = f"caught by {row['caught_by']}: {row['reason']}" if row["caught_by"] else "SURVIVED"
            print(f"[{k + 1}/{len(sites)}] {site.where} {site.call}: {status} ({time.time() - t0:.0f} s)", file=log,
                  flush=True)
            return row

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(one, range(len(sites)), sites))


def markdown(results: list[dict]) -> str:
    lines = ["| site | call | caught by | failure |", "|---|---|---|---|"]
    for r in results:
        caught = r["caught_by"] or ("UNTESTED" if r["reason"] else "**SURVIVED**")
        reason = (r["reason"] or "").replace("|", "\\|")
        lines.append(f"| {r['where']} | `{r['call']}` | {caught} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the call sites and exit")
    ap.add_argument("--sample", type=int, help="test K sites drawn with --seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", help="I/N: every N-th site from the I-th (a rotation over N runs covers all)")
    ap.add_argument("--cases", default=",".join(CASES), help="emulation cases, in the order tried")
    ap.add_argument("--schedules", default=",".join(map(str, SCHEDULES)), help="EMU_SEED values")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per emulation run")
    ap.add_argument("--jobs", type=int, default=1, help="mutants built and run at once")
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    ap.add_argument("--markdown", type=Path, help="write the result table as markdown")
    args = ap.parse_args(argv)

    sites = find_sites(ROOT / "csrc")
    if args.list:
        for s in sites:
            print(f"{s.where}\t{s.call}\t{s.text}")
        return 0
    chosen = select(sites, args.sample, args.seed, args.shard)
    results = run(chosen, args.cases.split(","), [int(s) for s in args.schedules.split(",")], args.timeout, args.jobs,
                  sys.stderr)
    table = markdown(results)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    survivors = [r for r in results if not r["caught_by"]]
    print(f"{len(results) - len(survivors)} of {len(results)} sites caught", file=sys.stderr)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
