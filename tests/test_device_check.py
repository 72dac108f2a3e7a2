"""The GPU check's dry run: every step runs on the CPU through the real run's functions and
leaves results.json and summary.md that list every step, with no timing claims."""

import json
import math

from benchmarks.device_check import STEPS, main


def test_dry_run_runs_and_reports_every_step(tmp_path):
    code = main(["--dry-run", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    summary = (tmp_path / "summary.md").read_text()

    assert data["dry_run"] and data["environment"]["commit"] and data["environment"]["torch"]
    assert "--dry-run" in data["command"]
    assert list(data["steps"]) == list(STEPS)
    assert "dry run: no timings" in summary
    for name in STEPS:
        assert f"| {name} |" in summary
        assert data["steps"][name]["status"] in ("ok", "skipped", "failed", "timeout")
    # without nvcc the build fails with its reason; everything else runs on any CPU
    assert data["steps"]["build"]["status"] == "ok" or "not found" in data["steps"]["build"]["detail"]
    assert code == (0 if data["steps"]["build"]["status"] == "ok" else 1)
    assert data["steps"]["tests"]["status"] == "ok" and data["steps"]["tests"]["files"]
    assert data["steps"]["tune"]["status"] in ("ok", "skipped")

    for suite in ("attention", "timestep", "diffusion", "model"):
        step = data["steps"][suite]
        assert step["status"] == "ok", (suite, step["detail"])
        assert step["data"]["environment"]["device"] and step["data"]["rows"]
        assert all("error" not in r for r in step["data"]["rows"]), suite
        assert f"## {suite}" in summary

    rows = {r["method"]: r for r in data["steps"]["attention"]["data"]["rows"]}
    assert {"triton", "cuda", "flex", "sdpa"} <= set(rows)
    for method in ("triton", "cuda", "flex", "sdpa"):  # each checked against the fp32 reference
        assert math.isfinite(rows[method]["err_out"]) and rows[method]["err_out"] < 1e-4, method
    assert "standing in" in rows["cuda"]["note"]
    models = {r["method"] for r in data["steps"]["model"]["data"]["rows"]}
    assert {"flex", "sdpa-dense"} <= models

    # what the GPU machine sends back: a few flat files, no timing columns in a dry run
    assert all(p.is_file() for p in tmp_path.iterdir()) and len(list(tmp_path.iterdir())) <= 8
    assert "fwd_ms" not in summary and "tflops" not in summary
