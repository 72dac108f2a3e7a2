"""scripts/kernel_report.py: the ptxas and SASS readers on fixed text, and the Triton kernels
compiled as the JIT specialises a real launch (sm_90a, bf16, every head dim; no spills in the
hot kernels). The Triton part needs triton's NVIDIA backend, not a GPU."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import kernel_report  # noqa: E402

SASS = """
\tcode for sm_90a
\t\tFunction : _Z4loopv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   USETMAXREG.TRY_ALLOC.CTAPOOL 0xf0 ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3 ;
        /*0040*/              @!P0 BRA 0x130 ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0080*/               @P1 BRA 0xc0 ;
        /*0090*/                   ISETP.GE.AND P2, PT, R4, R5, PT ;
        /*00a0*/                   FSEL R24, R24, -INF , P2 ;
        /*00b0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00c0*/                   HGMMA.64x64x16.F32.BF16 R88, R120, gdesc[UR12], R88, gsb0 ;
        /*00d0*/                   BAR.ARV 0x1, 0x100 ;
        /*00e0*/                   ISETP.NE.AND P3, PT, R2, R6, PT ;
        /*00f0*/               @P3 BRA 0x20 ;
        /*0100*/                   UTMALDG.3D [UR8], [UR22] ;
        /*0110*/                   EXIT ;
        /*0120*/                   BRA 0x120;
        /*0130*/                   NANOSLEEP 0x20 ;
        /*0140*/                   BRA 0x30 ;
"""


def test_main_loop_from_back_edges():
    (((arch, name), insns),) = kernel_report.parse_sass(SASS).items()
    assert (arch, name, len(insns)) == ("sm_90a", "_Z4loopv", 21)
    # one main loop (head 0x20); the mbarrier retry (0x130 -> 0x30) is an inner loop without MMA
    (loop,) = kernel_report.main_loops(insns)
    assert loop.head == 0x20
    assert loop.body == 1 + 2 + 4 + 3 + 4 + 2  # every block of the loop, the retry included
    assert loop.step == 1 + 2 + 4 + 4  # the masked block (0x90-0xb0) and the retry skipped
    assert loop.step_ops["hgmma"] == 3 and loop.step_ops["first_gemm_macs"] == 2 * 64 * 128 * 16
    assert loop.step_ops["macs"] == 2 * 64 * 128 * 16 + 64 * 64 * 16
    assert (loop.step_ops["bar"], loop.step_ops["mbar"]) == (1, 1)  # BAR.ARV; the wait
    assert loop.cta_barrier  # BAR.SYNC 0 in the masked block is still inside the loop
    ops = kernel_report.count_ops(insns)
    assert (ops["hgmma"], ops["tma_load"], ops["setmaxnreg"], ops["bar"], ops["mbar"]) == (3, 1, 1, 2, 1)
    assert kernel_report.mma_summary(insns) == "1 HGMMA RS 64x64x16 + 2 HGMMA SS 64x128x16"


def test_steady_step_keeps_copies_and_stores():
    """The steady step (FA3's counting) takes the path with the most MMA, then async copies,
    then global stores, then the fewest instructions: a branch that issues a copy is kept."""
    ((_, insns),) = kernel_report.parse_sass(SASS).items()
    (loop,) = kernel_report.main_loops(insns)
    assert loop.steady == loop.step  # nothing but masking off the shortest path
    copy = SASS.replace("FSEL R24, R24, -INF , P2", "LDGSTS.E.BYPASS.128 [R15], desc[UR20][R12.64]")
    ((_, insns),) = kernel_report.parse_sass(copy).items()
    (loop,) = kernel_report.main_loops(insns)
    assert loop.steady == loop.step + 3 and loop.steady_ops["async_copy"] == 1
    row = kernel_report.analyse(
        {"arch": "sm_90a", "registers": 168, "smem": 0, "threads": 384, "setmaxnreg": 1, "d": 128}, insns, None
    )
    # 4 warps x step x D over the MACs of the first GEMM chain (the two 64x128x16 HGMMA)
    assert row["steady_instructions"] == loop.steady
    assert row["steady_per_element"] == round(4 * loop.steady * 128 / (2 * 64 * 128 * 16), 3)


def test_lone_hgmma_groups_and_mac_ratio():
    """A wgmma group of one HGMMA (arrive, one committing HGMMA, wait) is counted on the steady
    step; the MAC ratio of a Triton kernel is its issued MACs over those of its own GEMMs."""
    lone = SASS.replace(
        "        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;\n",
        "        /*0060*/                   WARPGROUP.ARRIVE ;\n",
    ).replace(
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;",
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ;",
    )
    ((_, insns),) = kernel_report.parse_sass(lone).items()
    (loop,) = kernel_report.main_loops(insns)
    assert loop.steady_ops["lone_hgmma"] == 2  # the S HGMMA and the P.V one, each alone
    ((_, insns),) = kernel_report.parse_sass(SASS).items()
    (loop,) = kernel_report.main_loops(insns)
    assert loop.steady_ops["lone_hgmma"] == 1  # the two S HGMMA commit together; P.V alone
    row = {"arch": "sm_90a", "registers": 168, "smem": 0, "threads": 128, "setmaxnreg": 0, "d": 128}
    # one warpgroup, a 64 x 128 x 128 step: S (2 x 64x128x16) and P.V (64x64x16) are 0.75 GEMM
    fwd = kernel_report.analyse(dict(row, kernel="_attn_fwd"), insns, (64, 128, 128))
    assert fwd["gemms_per_step"] == round((2 * 64 * 128 * 16 + 64 * 64 * 16) / (64 * 128 * 128), 3)
    assert fwd["mac_ratio"] == round(fwd["gemms_per_step"] / 2, 3)
    assert kernel_report.analyse(dict(row, kernel="other"), insns, (64, 128, 128))["mac_ratio"] is None


def test_estimate_model_reproduces_its_fa3_calibration():
    """The model gives FA3's D = 128 profile (forward 0.229, backward 0.475 warp-instr/elem) the
    679 / 717 TFLOP/s that the anchor's calibration factors were taken against."""
    assert round(kernel_report.model_tflops(128, 0.229, 2, 2)) == 679
    assert round(kernel_report.model_tflops(128, 0.475, 5, 5)) == 717
    # recomputed GEMMs cost tensor time but are not counted as work
    assert kernel_report.model_tflops(128, 0.5, 7, 5) < kernel_report.model_tflops(128, 0.5, 5, 5)
    rows = [
        {
            "backend": "triton",
            "arch": "sm_90a",
            "dtype": "bf16",
            "d": 128,
            "kernel": k,
            "steady_per_element": e,
            "gemms_per_step": g,
        }
        for k, e, g in (("_attn_fwd", 0.25, 2.0), ("_attn_bwd_dkdv", 0.6, 4.0), ("_attn_bwd_dq", 0.3, 3.0))
    ]
    fwd, bwd = kernel_report.estimates(rows)
    assert (fwd["pass"], fwd["warp_instr_per_elem"], fwd["gemms"]) == ("forward", 0.25, 2.0)
    assert (bwd["pass"], bwd["warp_instr_per_elem"], bwd["gemms"]) == ("backward", 0.9, 7.0)
    model = kernel_report.model_tflops(128, 0.9, 7.0, 5)
    assert bwd["model_tflops"] == round(model)
    assert bwd["estimate_tflops"] == [round(model * 0.70), round(model * 0.77)]  # FA3's backward factors
    assert "estimate" in kernel_report.estimates_markdown(rows)


def test_no_loop_without_tensor_cores():
    text = SASS.replace("HGMMA.64x128x16.F32.BF16", "FFMA").replace("HGMMA.64x64x16.F32.BF16", "FFMA")
    ((_, insns),) = kernel_report.parse_sass(text).items()
    assert kernel_report.main_loops(insns) == []


def test_ptxas_parser():
    text = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16384 bytes smem, 360 bytes cmem[0]
ptxas-blackwell info    : Compiling entry function '_Z3barv' for 'sm_90a'
ptxas-blackwell info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 12 registers, used 0 barriers
"""
    foo, bar = kernel_report.parse_ptxas(text)
    assert (foo.name, foo.arch, foo.registers, foo.smem, foo.stack, foo.spill_stores, foo.spill_loads) == (
        "foo(float*)",
        "sm_80",
        255,
        16384,
        8,
        4,
        12,
    )
    assert (bar.name, bar.arch, bar.registers, bar.smem, bar.spills) == ("bar()", "sm_90a", 12, 0, 0)
    assert kernel_report.warnings_in("x.cu(3): warning #177-D: variable declared but never referenced")
    assert not kernel_report.warnings_in(text)


def test_ctas_per_sm():
    assert kernel_report.ctas_per_sm("sm_90a", 128, 0, 256) == 2  # registers: 16 warps of 128
    assert kernel_report.ctas_per_sm("sm_90a", 32, 100_000, 128) == 2  # shared memory (+1 KB each)
    assert kernel_report.ctas_per_sm("sm_80", 32, 100_000, 128) == 1
    assert kernel_report.ctas_per_sm("sm_80", 16, 0, 1024) == 2  # threads


# ----------------------------------------------------------------------------------------------
# Triton: compiled through the JIT for a recorded launch
# ----------------------------------------------------------------------------------------------
HOT = re.compile(r"fwd|dkdv|dq")


@pytest.fixture(scope="module")
def triton_rows():
    pytest.importorskip("triton.backends.nvidia.compiler")
    if kernel_report.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel)")
    return kernel_report.triton_rows(["90a"], dtypes=("bf16",), jobs=2, keep_ir=True)


def _ttir_args(ttir: str, name: str) -> list[str]:
    """The kernel's TTIR arguments, each with its attributes."""
    m = re.search(rf"tt\.func public @{name}\((.*?)\)\s*(attributes|\{{)", ttir, re.S)
    return re.split(r",\s*(?=%\w+:)", m.group(1))


def test_triton_specialisation_is_the_jits(triton_rows):
    """Pointers of fresh tensors and integer arguments that are multiples of 16 carry
    tt.divisibility = 16 in the compiled kernel, other integers none, as the JIT specialises a
    launch; num_warps / num_stages are the package's config."""
    fwd = [r for r in triton_rows if r["kernel"] == "_attn_fwd"]
    assert fwd
    for r in fwd:
        # integers equal to 1 (the unbatched launch's sequence-length placeholders) are constants
        # the JIT drops from the signature, as it does in training
        runtime = [a for a in r["launch_args"] if a[1] in ("tensor", "float") or (a[1] == "int" and a[2] != 1)]
        args = _ttir_args(r["ttir"], "_attn_fwd")
        assert len(args) == len(runtime), (args, runtime)
        for (name, kind, value), arg in zip(runtime, args):
            assert re.match(rf"%({name}|arg\d+):", arg), (name, arg)  # triton names them, or numbers them in order
            divisible = kind == "tensor" and value % 16 == 0 or kind == "int" and value % 16 == 0
            assert ("tt.divisibility = 16" in arg) == divisible, (name, kind, value, arg)
        assert r["threads"] == 32 * r["config"]["num_warps"]


def test_triton_hot_kernels_do_not_spill(triton_rows):
    hot = [r for r in triton_rows if HOT.search(r["kernel"])]
    assert {r["d"] for r in hot} == set(kernel_report.triton_dims())
    for r in triton_rows:
        print(
            f"{r['kernel']} d={r['d']} {r['dtype']}: {r['registers']} regs, {r['smem']} B smem, "
            f"{r['mma']}, step {r['step_instructions']}"
        )
    spilling = [
        f"{r['kernel']} d={r['d']}: {r['spill_stores']}/{r['spill_loads']} B"
        for r in hot
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    assert all(r["hgmma"] for r in hot), "a hot kernel without wgmma on sm_90a"
    assert all(r["smem"] <= 227 * 1024 for r in triton_rows), "more shared memory than an sm_90 block can have"
