"""The benchmark driver's smoke mode writes JSON, summary.md and plots (harness check only)."""

import json

from benchmarks.__main__ import main


def test_driver_smoke_writes_results(tmp_path):
    assert main(["--smoke", "--only", "model", "--root", str(tmp_path)]) == 0
    (folder,) = tmp_path.iterdir()
    data = json.loads((folder / "model.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"tk:reference", "flex", "sdpa-dense"}
    assert all("error" not in r and r["train_tokens_per_s"] > 0 for r in data["rows"])
    # each method's losses were checked against the fp32 reference from the same weights
    assert all(r["err_lm_loss"] < 1e-4 and r["err_ddpm_loss"] < 1e-4 for r in data["rows"])
    assert data["environment"]["commit"] and data["environment"]["device"]
    summary = (folder / "summary.md").read_text()
    assert "## model" in summary and "sdpa-dense" in summary
