"""The diffusion benchmark's --smoke mode runs end to end and writes its JSON (harness check)."""
import json

from benchmarks import diffusion as bench


def test_smoke_run_writes_results(tmp_path):
    rows = bench.main(["--smoke", "--no-compile", "--reps", "1", "--root", str(tmp_path)])
    (path,) = tmp_path.glob("*/diffusion.json")
    saved = json.loads(path.read_text())
    assert saved["environment"]["commit"] and saved["config"]["smoke"]
    assert len(saved["rows"]) == len(rows) == len(bench.SMOKE_CASES)
    for row in saved["rows"]:
        assert set(row["ops"]) == {"add_noise", "ddpm_step", "ddim_step"}
        for op in row["ops"].values():
            assert op["impls"]["tk:reference"]["max_abs_diff_vs_reference"] == 0.0
            assert all(r["median_ms"] > 0 for r in op["impls"].values())
