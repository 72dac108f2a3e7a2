"""The mask-cost benchmark (benchmarks/masks.py) runs end to end in its quick mode: its checks
hold and it writes its rows; the speeds themselves are the benchmark's to report, not a test's."""

import json

import pytest


def test_masks_benchmark_quick(tmp_path, monkeypatch):
    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setenv("TK_BENCH_COMPILE_BACKEND", "eager")  # no C++ code generation on a small CPU
    from benchmarks import masks

    assert masks.main(["--quick", "--root", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/masks.json")
    rows = json.loads(path.read_text())["rows"]
    plan, reference = rows
    assert plan["intervals"] == 3 and plan["tokens"] == 2048
    assert reference["grad_err_ours"] < 1e-4 and reference["grad_err_sdpa"] < 1e-4
    assert (path.parent / "masks.md").exists()
