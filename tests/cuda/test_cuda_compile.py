"""Every CUDA source compiles warning-free (nvcc --Werror all-warnings, host -Wall -Wextra -Werror)
for sm_80 and sm_90a, and no kernel spills registers (scripts/ptxas_report.py). No GPU needed."""
from __future__ import annotations

import concurrent.futures

import pytest

from tests.cuda.conftest import needs_nvcc, ptxas_report

SOURCES = ptxas_report.sources()


@pytest.fixture(scope="module")
def reports():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(SOURCES, pool.map(ptxas_report.compile_and_report, SOURCES)))


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles_without_warnings_and_spills(reports, source):
    rc, text, kernels = reports[source]
    assert rc == 0 and not ptxas_report.warnings_in(text), text
    assert kernels, f"ptxas reported no kernels for {source}"
    assert {k.arch for k in kernels} == {f"sm_{a}" for a in ptxas_report.DEFAULT_ARCHS}
    for k in kernels:
        print(f"{k.name} {k.arch}: {k.registers} registers, {k.smem} B smem, {k.stack} B stack, "
              f"spills {k.spill_stores}/{k.spill_loads} B")
    spilling = [f"{k.name} ({k.arch}): {k.spill_stores} B stores, {k.spill_loads} B loads" for k in kernels if k.spills]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_ptxas_parser():
    text = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16384 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90a'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
"""
    foo, bar = ptxas_report.parse_ptxas(text)
    assert (foo.name, foo.arch, foo.registers, foo.smem, foo.stack, foo.spill_stores, foo.spill_loads) == (
        "foo(float*)", "sm_80", 255, 16384, 8, 4, 12)
    assert (bar.name, bar.arch, bar.registers, bar.smem, bar.spills) == ("bar()", "sm_90a", 12, 0, 0)
    assert ptxas_report.warnings_in("x.cu(3): warning #177-D: variable declared but never referenced")
    assert not ptxas_report.warnings_in(text)
