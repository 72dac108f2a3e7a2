"""Every CUDA source compiles warning-free for sm_80 and sm_90a with the extension's flags, no
kernel spills registers, and the sm_90a attention kernels have the structure they are built for
(scripts/kernel_report.py reads it from the SASS). No GPU needed; each source is compiled once
per test session, two at a time."""

from __future__ import annotations

import re

import pytest

from tests.cuda.conftest import CSRC, needs_nvcc, kernel_report

SOURCES = kernel_report.sources()
ATTENTION = CSRC / "attention"


@pytest.fixture(scope="session")
def builds():
    return {b.source: b for b in kernel_report.compile_all(SOURCES, jobs=2)}


@pytest.fixture(scope="session")
def attention_rows(builds):
    return kernel_report.cuda_rows([b for s, b in builds.items() if s.parent == ATTENTION])


def sm90_sources(kind: str) -> list:
    """csrc/attention sources of the sm_90a forward or backward (attention_fwd_sm90*.cu, ...)."""
    return sorted(ATTENTION.glob(f"attention_{kind}_sm90*.cu"))


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles_without_warnings_and_spills(builds, source):
    b = builds[source]
    assert b.clean, b.output
    assert b.kernels, f"ptxas reported no kernels for {source}"
    assert {k.arch for k in b.kernels} == {f"sm_{a}" for a in kernel_report.DEFAULT_ARCHS}
    for k in b.kernels:
        print(
            f"{k.name} {k.arch}: {k.registers} registers, {k.smem} B smem, {k.stack} B stack, "
            f"spills {k.spill_stores}/{k.spill_loads} B"
        )
    spilling = [
        f"{k.name} ({k.arch}): {k.spill_stores} B stores, {k.spill_loads} B loads" for k in b.kernels if k.spills
    ]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


@needs_nvcc
def test_sm90_backward_uses_wgmma(builds, attention_rows):
    """The sm_90a backward's tensor-core work is wgmma (HGMMA), never mma.sync; kernels without
    GEMMs (delta, dQ conversion) may be part of it."""
    sources = sm90_sources("bwd")
    if not sources:
        pytest.skip("no sm_90a attention backward source (csrc/attention/attention_bwd_sm90*.cu) yet")
    for s in sources:
        assert builds[s].returncode == 0, builds[s].output
    rel = {str(s.relative_to(CSRC.parent)) for s in sources}
    rows = [r for r in attention_rows if r["source"] in rel and r["arch"] == "sm_90a" and r["hgmma"] + r["hmma"]]
    assert rows, f"no sm_90a kernel with tensor-core instructions compiled from {sorted(rel)}"
    for r in rows:
        assert r["hmma"] == 0, f"{r['name']}: mma.sync in the sm_90a backward ({r['mma']})"
        assert r["step_mma"], f"{r['name']}: no tensor-core instruction in its main loop"


@needs_nvcc
def test_sm90_forward_is_warp_specialised(builds, attention_rows):
    """The sm_90a forward: producer/consumer warpgroups (setmaxnreg) and no CTA-wide barrier
    (bar.sync 0) inside its main loop."""
    sources = [s for s in sm90_sources("fwd") if re.search(r"setmaxnreg", s.read_text())]
    if not sources:
        pytest.skip(
            "the sm_90a forward has no producer/consumer split yet (no setmaxnreg in "
            "csrc/attention/attention_fwd_sm90*.cu)"
        )
    for s in sources:
        assert builds[s].returncode == 0, builds[s].output
    rel = {str(s.relative_to(CSRC.parent)) for s in sources}
    rows = [r for r in attention_rows if r["source"] in rel and r["arch"] == "sm_90a" and r["family"] == "fwd"]
    assert rows, f"no sm_90a forward kernel compiled from {sorted(rel)}"
    for r in rows:
        assert r["setmaxnreg"] > 0, f"{r['name']}: no USETMAXREG"
        # setmaxnreg redistributes the registers the launch allocated: ptxas must give the kernel
        # all that __launch_bounds__(threads, 1) allows (the source's kLaunchRegs static_assert)
        assert r["registers"] == 65536 // r["threads"] // 8 * 8, (r["name"], r["registers"], r["threads"])
        assert r["loops"], f"{r['name']}: no main loop with tensor-core instructions found"
        assert not r["cta_barrier_in_loop"], f"{r['name']}: BAR.SYNC 0 inside the main loop"
