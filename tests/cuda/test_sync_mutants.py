"""scripts/sync_mutants.py: the call-site finder and mutation, and today's shard of the mutants
(deleting a synchronisation call of csrc/attention/*.cu must make an emulated run fail). The
shard rotates by date, so consecutive days cover every site; SYNC_MUTANTS_SHARD=I/N picks one."""

from __future__ import annotations

import datetime
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.cuda.conftest import NVCC

ROOT = Path(__file__).resolve().parents[2]
SITES_PER_RUN = 2

sys.path.insert(0, str(ROOT / "scripts"))
import sync_mutants  # noqa: E402


def shard_of_day(n_sites: int, day: int) -> str:
    shards = math.ceil(n_sites / SITES_PER_RUN)
    return f"{day % shards}/{shards}"


def test_finds_the_call_sites():
    sites = sync_mutants.find_sites(ROOT / "csrc")
    for kernel in ("attention_fwd.cu", "attention_bwd.cu", "attention_fwd_sm90.cu", "attention_bwd_sm90.cu"):
        assert any(s.file == kernel for s in sites), kernel
    for s in sites:
        text = (ROOT / "csrc" / "attention" / s.file).read_text()
        call = text[s.start : s.end]
        assert call.endswith(")") and s.call in call, (s.where, call)
        assert sync_mutants.mutate(text, s).count(s.call) == text.count(s.call) - 1
    for file, call, nth in (*sync_mutants.SCHEDULING_ONLY, *sync_mutants.KNOWN_GAPS):  # each names a site
        assert sum(sync_mutants.listed(s, {(file, call, nth): "x"}, sites) is not None for s in sites) == 1, (
            file,
            call,
        )


def test_the_daily_shards_cover_every_site():
    sites = sync_mutants.find_sites(ROOT / "csrc")
    shards = math.ceil(len(sites) / SITES_PER_RUN)
    start = datetime.date.today().toordinal()
    covered = {
        (s.file, s.line)
        for day in range(start, start + shards)
        for s in sync_mutants.select(sites, None, 0, shard_of_day(len(sites), day))
    }
    assert covered == {(s.file, s.line) for s in sites}


needs_emulation = pytest.mark.skipif(
    shutil.which("g++") is None or NVCC is None, reason="needs g++ and the CUDA headers (nvcc)"
)


@needs_emulation
def test_deleting_the_mbarrier_init_fence_is_caught():
    """Without fence.mbarrier_init after the barriers' initialisation the async proxy (TMA) may not
    see them initialised: the emulation fails the first TMA load that completes on one."""
    fence = r"^attention_fwd_sm90\.cu:.*\tmbar_fence_init\t"
    sites = sync_mutants.select(sync_mutants.find_sites(ROOT / "csrc"), None, 0, None, fence)
    assert len(sites) == 1, [s.where for s in sites]
    (row,) = sync_mutants.run(sites, ("ring-wraps-cache-d64-f16",), (1,), sync_mutants.TIMEOUT_S, 1, sys.stderr)
    assert row["caught_by"] and "fence.mbarrier_init" in row["reason"], row


@needs_emulation
def test_todays_mutants_are_caught():
    sites = sync_mutants.find_sites(ROOT / "csrc")
    shard = os.environ.get("SYNC_MUTANTS_SHARD") or shard_of_day(len(sites), datetime.date.today().toordinal())
    chosen = sync_mutants.select(sites, None, 0, shard)
    results = sync_mutants.run(
        chosen, sync_mutants.CASES, sync_mutants.SCHEDULES, sync_mutants.TIMEOUT_S, 2, sys.stderr
    )
    bad = [r for r in results if sync_mutants.failed(r)]  # known gaps: reported by the full run
    assert not bad, f"shard {shard}:\n" + sync_mutants.markdown(bad)
