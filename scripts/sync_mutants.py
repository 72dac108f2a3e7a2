#!/usr/bin/env python3
"""Mutation test of the synchronisation in the CUDA attention kernels.

Finds every call of a synchronisation primitive (waits, arrivals, commits, fences, barriers) in
csrc/attention/*.cu, deletes one call site at a time, rebuilds that kernel's emulation object
(tests/cuda/attention_host) and runs the emulation cases of that kernel under a few schedules.
A mutant is caught when a run fails: a wrong result or NaN against the float64 oracle, an
emulation error (race, protocol), a reported deadlock or a timeout. A surviving site is either
dead code on hardware too or a behaviour the emulator does not model: both need a look.

    python scripts/sync_mutants.py --list
    python scripts/sync_mutants.py [--sample K --seed S | --shard I/N | --site REGEX] [--json out.json] [--markdown out.md]

Exit status 1 when a site survives (or its kernel has no emulation mode; a KNOWN_GAPS one too),
or a call listed in SCHEDULING_ONLY is caught.
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

PRIMITIVES = (
    "mbar_wait",
    "mbar_arrive",
    "mbar_expect_tx",
    "mbar_fence_init",
    "wgmma_wait",
    "wgmma_commit",
    "wgmma_fence",
    "fence_proxy_async",
    "fence_operands",
    "__syncthreads",
    "named_bar_sync",
    "named_bar_arrive",
    "cp_async_wait",
    "cp_async_commit",
    "tma_store_commit",
    "tma_store_wait",
    "__syncwarp",
)
CALL = re.compile(r"\b(?:\w+::)*(" + "|".join(PRIMITIVES) + r")\s*(?:<[^<>;()]*>)?\s*\(")

# Cases run against each mutant, in order (the first failure catches it), and the schedules. A
# case is an EMU_CASES name with options: ":ordered" (blocks take their tiles heaviest first, as
# cuda.prepare passes them: the k_order paths), ":scale=X" (softmax scale; negative: the sm80 forward's
# own-row Q negation, the sm90 forward through -q and -scale as cuda.forward passes them).
CASES = (
    "nan-outside-empty-rows-d128-f16",
    "ring-wraps-cache-d64-f16",
    "gap-in-query-range-d64-f16",
    "long-documents-gqa-d64-bf16:ordered:scale=-0.3",
)
SCHEDULES = (1, 2, 3)  # EMU_SEED; 3: warp 0 lags after its waits (attention_host/cuda_emu.h)
DATA_SEED = 20240607
TIMEOUT_S = 240

# Calls that schedule rather than order: deleting one leaves the kernel correct on hardware too
# (only slower), so no emulated run can fail. They are still mutated and must survive (a catch
# would mean they order something after all). (file, text of the call, which such call) -> why.
SCHEDULING_ONLY = {
    (
        "attention_fwd_sm90.cu",
        "named_bar_sync(kTurnBar + cg, kConsumerThreads)",
        0,
    ): "the consumer warpgroups' turns on the tensor cores (ping-pong): it orders wgmma issue, no data; "
    "without it the other warpgroup's arrivals complete the barrier among themselves",
}
# Calls needed on hardware whose deletion the emulator catches only by chance: a full run still
# fails on their survival (the gap stays visible); a rotating shard does not. -> what it misses.
KNOWN_GAPS: dict = {}


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
            if "//" in text[line_start : m.start()]:
                continue  # a comment
            line_no = text.count("\n", 0, m.start()) + 1
            line = text[line_start : text.find("\n", m.start())].strip()
            sites.append(Site(path.name, line_no, m.group(1), m.start(), _call_end(text, m.end() - 1), line))
    return sites


def mutate(text: str, site: Site) -> str:
    return text[: site.start] + "(void)0" + text[site.end :]


def select(sites: list[Site], sample: int | None, seed: int, shard: str | None, site: str | None = None) -> list[Site]:
    if site:
        return [s for s in sites if re.search(site, f"{s.where}\t{s.call}\t{s.text}")]
    if shard:
        i, n = map(int, shard.split("/"))
        return sites[i % n :: n]
    if sample is not None and sample < len(sites):
        return sorted(random.Random(seed).sample(sites, sample), key=lambda s: (s.file, s.line))
    return sites


def case_options(spec: str) -> tuple[str, dict]:
    """ "name:ordered:scale=X" -> (name, emulation_check keyword arguments)."""
    name, *opts = spec.split(":")
    kw = {}
    for opt in opts:
        if opt == "ordered":
            kw["ordered"] = True
        elif opt.startswith("scale="):
            kw["scale"] = float(opt[len("scale=") :])
        else:
            raise ValueError(f"case option {opt!r} of {spec!r}: use ordered or scale=X")
    return name, kw


def listed(site: Site, table: dict, sites: list[Site]) -> str | None:
    """table's entry for site: (file, text of the call, index among the file's sites with it)."""
    for (file, call, nth), why in table.items():
        same = [s for s in sites if s.file == file and call in s.text]
        if nth < len(same) and (same[nth].file, same[nth].line) == (site.file, site.line):
            return why
    return None


def failed(row: dict) -> bool:
    """A survivor, or a scheduling-only call whose deletion was caught (a known gap never)."""
    return not row.get("known_gap") and bool(row["caught_by"]) == bool(row.get("scheduling_only"))


def run(sites: list[Site], cases, schedules, timeout: float, jobs: int, log) -> list[dict]:
    import tests.cuda.test_cuda_attention as emu  # torch and the package: only when running

    all_sites = find_sites(ROOT / "csrc")

    os.environ.setdefault("EMU_DEADLOCK_S", "10")
    with tempfile.TemporaryDirectory(prefix="sync_mutants_") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        exe = emu.emulation_build(base)
        work = base / "work"
        work.mkdir()
        # The kernels as they are must pass, or no failure means anything (those of the sites).
        kernel_modes = [m for file, ms in emu.EMU_MODES.items() if any(s.file == file for s in sites) for m in ms]
        for case in cases:
            name, kw = case_options(case)
            for schedule in schedules:
                emu.emulation_check(exe, work, name, kernel_modes, schedule, DATA_SEED, timeout=timeout, **kw)

        def one(k: int, site: Site) -> dict:
            t0 = time.time()
            row = {
                **asdict(site),
                "where": site.where,
                "caught_by": None,
                "reason": None,
                "scheduling_only": listed(site, SCHEDULING_ONLY, all_sites),
                "known_gap": listed(site, KNOWN_GAPS, all_sites),
            }
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
                name, kw = case_options(case)
                for schedule in schedules:
                    try:
                        emu.emulation_check(exe, work, name, modes, schedule, DATA_SEED, timeout=timeout, **kw)
                    except AssertionError as e:
                        msg = " ".join(str(e).split())
                        m = re.search(r"emulation error: [^(]*|deadlock[^;]*|no result within \d+ s", msg)
                        row["caught_by"] = f"{case} / schedule {schedule}"
                        row["reason"] = (m.group(0) if m else msg)[:200].strip()
                        break
                if row["caught_by"]:
                    break
            status = f"caught by {row['caught_by']}: {row['reason']}" if row["caught_by"] else "survived"
            print(
                f"[{k + 1}/{len(sites)}] {site.where} {site.call}: {status} ({time.time() - t0:.0f} s)",
                file=log,
                flush=True,
            )
            return row

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(one, range(len(sites)), sites))


def markdown(results: list[dict]) -> str:
    lines = ["| file | sites | caught | scheduling only (survive) | survived |", "|---|---|---|---|---|"]
    for file in sorted({r["file"] for r in results}):
        rows = [r for r in results if r["file"] == file]
        lines.append(
            f"| {file} | {len(rows)} | {sum(bool(r['caught_by']) for r in rows)} | "
            f"{sum(bool(r.get('scheduling_only')) for r in rows)} | "
            f"{sum(not r['caught_by'] and not r.get('scheduling_only') for r in rows)} |"
        )
    lines += ["", "| site | call | caught by | failure |", "|---|---|---|---|"]
    for r in results:
        if r.get("scheduling_only"):
            caught = (
                f"**CAUGHT**: {r['caught_by']} (listed as scheduling only)"
                if r["caught_by"]
                else "survives: scheduling only"
            )
            reason = (r["reason"] or r["scheduling_only"]).replace("|", "\\|")
            lines.append(f"| {r['where']} | `{r['call']}` | {caught} | {reason} |")
            continue
        caught = r["caught_by"] or ("UNTESTED" if r["reason"] else "**SURVIVED**")
        reason = (r["reason"] or "").replace("|", "\\|")
        if r.get("known_gap") and not r["caught_by"]:
            caught, reason = "**SURVIVED** (known gap)", r["known_gap"]
        lines.append(f"| {r['where']} | `{r['call']}` | {caught} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the call sites and exit")
    ap.add_argument("--sample", type=int, help="test K sites drawn with --seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", help="I/N: every N-th site from the I-th (a rotation over N runs covers all)")
    ap.add_argument("--site", help="regex on 'file:line<TAB>call<TAB>source line' (as --list prints): those sites only")
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
    chosen = select(sites, args.sample, args.seed, args.shard, args.site)
    if not chosen:
        ap.error(f"no call site matches --site {args.site!r} (see --list)")
    results = run(
        chosen, args.cases.split(","), [int(s) for s in args.schedules.split(",")], args.timeout, args.jobs, sys.stderr
    )
    table = markdown(results)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    bad = [r for r in results if failed(r) or (r.get("known_gap") and not r["caught_by"])]
    expected = sum(1 for r in results if r.get("scheduling_only"))
    caught = sum(1 for r in results if r["caught_by"] and not r.get("scheduling_only"))
    print(
        f"{caught} of {len(results) - expected} sites caught ({expected} scheduling-only left out); "
        f"failing: {' '.join(r['where'] for r in bad) or 'none'}",
        file=sys.stderr,
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
