"""scripts/wgmma_hazards.py: no register of an in-flight wgmma is touched before its wait.

The checker on fixed SASS (group tracking, control flow), then on every sm_90a kernel built
from csrc (one arch, only the sources that use wgmma), and on the backward with the dS^T
store put back behind the dK wgmma that reads it (the hazard the check exists for)."""

from __future__ import annotations

import sys

import pytest

from tests.cuda.conftest import CSRC, ROOT, needs_nvcc

sys.path.insert(0, str(ROOT / "scripts"))
import wgmma_hazards as wh  # noqa: E402

HEAD = "\tcode for sm_90a\n\t\tFunction : _Z1kv\n"


def sass(*lines: str) -> str:
    return HEAD + "".join(f"        /*{16 * i:04x}*/                   {x} ;\n" for i, x in enumerate(lines))


def hazards(*lines: str):
    result, _ = wh.check_sass(sass(*lines))
    (found,) = result.values()
    return found


RS = "HGMMA.64x128x16.F32.BF16 R24, R184, gdesc[UR8].tnspB, R24, gsb0"


def test_store_of_a_pending_a_operand_is_found():
    found = hazards(
        "WARPGROUP.ARRIVE", RS, "STS [R17+UR5], R186", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "STS [R17+UR5], R187", "EXIT"
    )
    assert [(h.addr, h.register, h.hgmma) for h in found] == [(0x20, 186, 0x10)]


def test_accumulator_reads_and_writes_are_found_until_the_wait_retires_the_group():
    found = hazards(
        "WARPGROUP.ARRIVE",
        "HGMMA.64x64x16.F32.BF16 R152, gdesc[UR8], RZ, !UPT, gsb0",
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0",
        "WARPGROUP.DEPBAR.LE gsb0, 0x1",  # retires the R152 group only
        "FMUL R152, R152, 0.5",
        "FMUL R87, R87, 2",
        "CS2R R22, SRZ",
        "STS.64 [R2], R86",
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        "FMUL R87, R87, 2",
        "EXIT",
    )
    # R87 (last of R24..R87), the pair R22/R23 misses R24, STS.64 of R86/R87
    assert [(h.addr, h.register) for h in found] == [(0x50, 87), (0x70, 86), (0x70, 87)]


def test_open_groups_and_later_wgmma_on_the_same_accumulator():
    # a second wgmma onto the in-flight accumulator is allowed; an FADD between them is not
    found = hazards(
        "WARPGROUP.ARRIVE",
        "HGMMA.64x64x16.F32.BF16 R152, gdesc[UR8], RZ, !UPT",
        "FADD R153, R153, 1",
        "HGMMA.64x64x16.F32.BF16 R152, gdesc[UR8], R152, gsb0",
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        "EXIT",
    )
    assert [(h.addr, h.register) for h in found] == [(0x20, 153)]


def test_state_follows_the_control_flow():
    # the wait is skipped on one path into the store, and the back edge carries a pending group
    found = hazards(
        "WARPGROUP.ARRIVE",
        RS,
        "@P0 BRA 0x40",
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        "STS [R17], R184",
        "@P1 BRA 0x10",
        "EXIT",
    )
    assert [(h.addr, h.register) for h in found] == [(0x40, 184)]
    loop = hazards("WARPGROUP.ARRIVE", "STS [R17], R184", RS, "@P1 BRA 0x10", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "EXIT")
    assert [(h.addr, h.register) for h in loop] == [(0x10, 184)]


def test_calls_are_followed_into_the_callee():
    found = hazards(
        "WARPGROUP.ARRIVE",
        RS,
        "CALL.REL.NOINC 0x50",
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        "EXIT",
        "FADD R30, R30, 1",
        "RET.REL.NODEC R6 0x0",
    )
    assert [(h.addr, h.register) for h in found] == [(0x50, 30)]


@pytest.fixture(scope="module")
def sources():
    found = wh.wgmma_sources()
    assert (
        CSRC / "attention" / "attention_bwd_sm90.cu" in found and CSRC / "attention" / "attention_fwd_sm90.cu" in found
    )
    return found


@needs_nvcc
def test_every_sm90a_kernel_is_free_of_hazards(sources):
    for src in sources:
        result, checked = wh.check_sass(wh.compile_sass(src))
        assert checked > 0, f"{src.name}: no HGMMA in its sm_90a SASS"
        found = [str(h) for hs in result.values() for h in hs]
        assert not found, f"{src.name}:\n" + "\n".join(found)


@needs_nvcc
def test_the_planted_pending_store_is_caught(tmp_path):
    """attention_bwd_sm90.cu with dS^T stored after the dV / dK wgmmas are issued (as before the
    fix): the stores read dsf, the dK wgmma's A operand, while it is in flight."""
    src = (CSRC / "attention" / "attention_bwd_sm90.cu").read_text()
    store, commit = "    store_ds();", "    sm90::wgmma_commit();\n\n    if (step_dq) {\n"
    assert src.count(store) == 1 and src.count(commit) == 1, "the dS^T store moved: update the planted variant"
    planted = tmp_path / "attention_bwd_sm90_planted.cu"
    planted.write_text(src.replace(store, "    // store moved below").replace(commit, commit + "  " + store + "\n"))
    result, _ = wh.check_sass(wh.compile_sass(planted))
    found = [h for hs in result.values() for h in hs]
    assert found, "the hazard check missed the store of a pending wgmma's A operand"
    assert all(h.insn.startswith("STS") for h in found), [str(h) for h in found]
    # every dK/dV kernel (2 dtypes x 2 head dims x K = 1, 2, 4 intervals x softcap or not), 16 registers each
    assert len({h.function for h in found}) == 24 and len(found) == 24 * 16
