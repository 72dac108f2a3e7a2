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


def test_flex_baseline_marks_the_visible_blocks(monkeypatch):
    """The FlexAttention baseline the benchmarks time (torch.compile(create_block_mask) of the
    interval mask_mod, benchmarks/common.py) marks exactly the blocks that hold a visible pair."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setenv("TK_BENCH_COMPILE_BACKEND", "eager")
    import torch

    import transfusion_kernels as tk
    from benchmarks.common import compiled_create_block_mask, interval_mask_mod

    n, doc, block = 1024, 512, 128  # documents of 512 tokens, each with images of 64 and 200 patches
    cu = torch.arange(0, n + 1, doc, dtype=torch.int32)
    spans = torch.tensor([(d + o, d + o + m) for d in range(0, n, doc) for o, m in ((10, 64), (150, 200))])
    mask = tk.HybridMask.from_spans(cu, spans.int())
    bm = compiled_create_block_mask()(interval_mask_mod(mask.kv_start, mask.kv_end), None, None, n, n, BLOCK_SIZE=block)
    blocks = mask.to_dense().reshape(n // block, block, n // block, block).any(3).any(1)
    assert torch.equal(bm.to_dense()[0, 0].bool(), blocks)
