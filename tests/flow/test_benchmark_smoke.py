"""The flow benchmark's --smoke mode runs end to end and writes its JSON (harness check), and its
correctness column compares each backend with the reference rather than with itself."""
import json
import math

import torch

from benchmarks import flow as bench

import transfusion_kernels as tk


def test_smoke_run_writes_results(tmp_path):
    rows = bench.main(["--smoke", "--no-compile", "--reps", "1", "--root", str(tmp_path)])
    (path,) = tmp_path.glob("*/flow.json")
    saved = json.loads(path.read_text())
    assert saved["environment"]["commit"] and saved["config"]["smoke"]
    assert len(saved["rows"]) == len(rows) == len(bench.SMOKE_CASES)
    fast = [b for b in ("triton", "cuda") if tk.available_backends("cpu")[b].available]
    for row in saved["rows"]:
        # a few roundings of values of size ~8 in the row's dtype (the interpreter truncates to bf16)
        tol = 16 * torch.finfo(getattr(torch, row["dtype"])).eps
        assert set(row["ops"]) == {"add_noise", "euler_step", "euler_cfg", "loss"}
        for name, op in row["ops"].items():
            impls = op["impls"]
            assert all(r["median_ms"] > 0 for r in impls.values())
            if name != "add_noise":  # diffusers / eager at the same sigmas: the same numbers
                base = impls["eager" if name == "loss" else "diffusers"]["max_abs_diff_vs_reference"]
                assert math.isfinite(base) and base <= 4 * tol, (name, base)
            for b in fast:  # a real kernel, checked against the reference with the same seed
                diff = impls[f"tk:{b}"]["max_abs_diff_vs_reference"]
                assert "note" not in impls[f"tk:{b}"] and math.isfinite(diff) and diff <= tol, (b, name, diff)
