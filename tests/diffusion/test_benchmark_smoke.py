"""The DDPM and flow benchmarks' --smoke mode runs end to end and writes its JSON (harness check),
and the correctness column compares each backend with the reference rather than with itself."""

import json
import math

import pytest
import torch

from benchmarks import diffusion, flow

import transfusion_kernels as tk

# suite: (module, its ops, the implementation labels per backend, ops whose baseline computes the
# same numbers as the reference: no noise drawn)
SUITES = {
    "diffusion": (diffusion, {"add_noise", "ddpm_step", "ddim_step"}, ("tk", "kernel"), {"ddim_step": "diffusers"}),
    "flow": (
        flow,
        {"add_noise", "euler_step", "euler_cfg", "loss"},
        ("tk",),
        {"euler_step": "diffusers", "euler_cfg": "diffusers", "loss": "eager"},
    ),
}


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_smoke_run_writes_results(tmp_path, suite):
    bench, ops, labels, same_numbers = SUITES[suite]
    rows = bench.main(["--smoke", "--no-compile", "--reps", "1", "--root", str(tmp_path)])
    (path,) = tmp_path.glob(f"*/{suite}.json")
    saved = json.loads(path.read_text())
    assert saved["environment"]["commit"] and saved["config"]["smoke"]
    assert len(saved["rows"]) == len(rows) == len(bench.SMOKE_CASES)
    fast = [b for b in ("triton", "cuda") if tk.available_backends("cpu")[b].available]
    for row in saved["rows"]:
        # a few roundings of values of size ~8 in the row's dtype (the interpreter truncates to bf16)
        tol = 16 * torch.finfo(getattr(torch, row["dtype"])).eps
        assert set(row["ops"]) == ops and row["copy_GBps"] > 0
        for name, op in row["ops"].items():
            impls = op["impls"]
            assert all(r["median_ms"] > 0 and r["frac_of_copy"] > 0 for r in impls.values())
            if name in same_numbers and same_numbers[name] in impls:
                base = impls[same_numbers[name]]["max_abs_diff_vs_reference"]
                assert math.isfinite(base) and base <= 4 * tol, (name, base)
            for b in fast:  # a real kernel, checked against the reference with the same seed
                for label in (f"{p}:{b}" for p in labels):
                    diff = impls[label]["max_abs_diff_vs_reference"]
                    assert "note" not in impls[label] and math.isfinite(diff) and diff <= tol, (label, name, diff)
