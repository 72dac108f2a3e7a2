"""The call-site finder and mutation of scripts/sync_mutants.py (which checks that deleting any
synchronisation call in csrc/attention/*.cu makes an emulated run fail)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITES_PER_RUN = 2

sys.path.insert(0, str(ROOT / "scripts"))
import sync_mutants  # noqa: E402


def test_finds_the_call_sites():
    sites = sync_mutants.find_sites(ROOT / "csrc")
    for kernel in ("attention_fwd.cu", "attention_bwd.cu", "attention_fwd_sm90.cu"):
        assert any(s.file == kernel for s in sites), kernel
    for s in sites:
        text = (ROOT / "csrc" / "attention" / s.file).read_text()
        call = text[s.start:s.end]
        assert call.endswith(")") and s.call in call, (s.where, call)
        assert sync_mutants.mutate(text, s).count(s.call) == text.count(s.call) - 1
    shards = math.ceil(len(sites) / SITES_PER_RUN)
    covered = {(s.file, s.line) for i in range(shards) for s in sync_mutants.select(sites, None, 0, f"{i}/{shards}")}
    assert covered == {(s.file, s.line) for s in sites}
