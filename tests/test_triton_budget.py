"""The Triton attention kernels' instruction budget at sm_90a, read from the SASS the JIT would
build for an H100 (scripts/kernel_report.py: a recorded launch of the package's forward and
backward, compiled through the JIT's warmup path; no GPU needed). Fails when a compiled kernel
regresses from what benchmarks/results/static/triton-sm90a.md shows:

* a wgmma split into 64x16x16 pieces, or more tensor-core MACs than the kernel's GEMMs need
  (MAC ratio above 1.0), or a register spill, at head dims 128 and 256 (bf16);
* a head-dim-256 steady step that commits an HGMMA and waits on it alone;
* a spill in the softcapped launches at head dim 256 (the most registers any launch needs);
* the forward's steady step at D = 128 above 0.28 warp-instructions per score element (0.247
  when this was written; FlashAttention-3: 0.229), or the backward's dk/dv + dq above 1.12 (the
  shipped 128-key dk/dv tile; the transposed 64-key one compiles to 0.57 + 0.30 = 0.87).

Only the gated kernels are compiled (nine, in two worker processes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import kernel_report  # noqa: E402

FWD_BUDGET = 0.28  # warp-instr/elem of the forward's steady step, D = 128
BWD_BUDGET = 0.95  # dk/dv + dq, D = 128 (1.158 before TMA in dq and the transposed dk/dv)


@pytest.fixture(scope="module")
def rows():
    pytest.importorskip("triton.backends.nvidia.compiler")
    if kernel_report.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel)")
    rows = kernel_report.triton_rows(["90a"], dims=[128, 256], dtypes=("bf16",), kernels="_attn_", jobs=2)
    return {(r["kernel"], r["d"]): r for r in rows}


def test_softcap_at_head_dim_256_does_not_spill(rows):
    softcapped = kernel_report.triton_rows(["90a"], dims=[256], dtypes=("bf16",), kernels="_attn_", softcap=30.0)
    assert {r["kernel"] for r in softcapped} == set(kernel_report.KERNEL_GEMMS)
    for r in softcapped:
        assert r["config"]["SOFTCAP"] is True
        assert r["spill_stores"] == r["spill_loads"] == 0, f"{r['kernel']} softcap: {r['spill_stores']} B spilled"
        assert "64x16x16" not in r["mma"] and (r["mac_ratio"] or 0) <= 1.0, f"{r['kernel']} softcap: {r['mma']}"


def test_every_gated_kernel_was_compiled(rows):
    assert set(rows) == {(k, d) for k in kernel_report.KERNEL_GEMMS for d in (128, 256)}


@pytest.mark.parametrize("d", [128, 256])
def test_no_split_duplicate_or_spill(rows, d):
    for name in kernel_report.KERNEL_GEMMS:
        r = rows[(name, d)]
        where = f"{name} d={d}: {r['mma']}"
        assert "64x16x16" not in r["mma"], f"{where}: a wgmma split into 64x16x16"
        assert r["mac_ratio"] is not None and r["mac_ratio"] <= 1.0, f"{where}: MAC ratio {r['mac_ratio']}"
        assert r["spill_stores"] == r["spill_loads"] == 0, f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B"


def test_no_lone_hgmma_at_head_dim_256(rows):
    for name in kernel_report.KERNEL_GEMMS:
        assert rows[(name, 256)]["steady_lone_hgmma"] == 0, f"{name}: an HGMMA committed and waited on alone"


def test_instruction_budget_at_head_dim_128(rows):
    fwd = rows[("_attn_fwd", 128)]["steady_per_element"]
    bwd = rows[("_attn_bwd_dkdv", 128)]["steady_per_element"] + rows[("_attn_bwd_dq", 128)]["steady_per_element"]
    assert fwd <= FWD_BUDGET, f"forward steady step {fwd} warp-instr/elem > {FWD_BUDGET}"
    assert bwd <= BWD_BUDGET, f"dk/dv + dq steady steps {bwd:.3f} warp-instr/elem > {BWD_BUDGET}"
