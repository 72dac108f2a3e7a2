"""The triton attention backend's own machinery: block configurations (the op's cases through
other tile sizes), int64 addressing, its plan checks, the shipped and tuned config files and the
tuning script. The op's correctness on every backend is tests/attention/test_attention.py."""

import dataclasses
import json

import pytest
import torch

pytest.importorskip("triton")

import transfusion_kernels as tk  # noqa: E402
from transfusion_kernels.attention import triton as tkt  # noqa: E402
from transfusion_kernels.attention.plan import query_runs  # noqa: E402
from tests.attention.common import DEVICE, GPU, blocks, check, make_inputs, spans_mask  # noqa: E402
from tests.backend_params import poison, require  # noqa: E402
from tests.layouts import LAYOUTS, naive_dense  # noqa: E402


@pytest.fixture
def triton_kernels(monkeypatch):
    """The triton kernels can run here; every output they allocate starts as NaN."""
    require("triton")
    poison("attention", "triton", monkeypatch)


# ----------------------------------------------------------------------------------------------
# block configurations: the same masks through other tile sizes (tables change with them)
# ----------------------------------------------------------------------------------------------
CONFIGS = [
    blocks((64, 64), (64, 64), (64, 64)),  # tile edges at 63 / 64 / 65
    blocks((16, 32), (32, 16), (64, 16)),  # BN > BM, dk/dv key tile below its query step
    blocks((32, 32), (16, 128), (16, 64)),  # one dk/dv key tile spans the whole layout
]


def config_id(c):
    return "-".join(f"{k}{getattr(c, k).block_m}x{getattr(c, k).block_n}" for k in ("fwd", "dkdv", "dq"))


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_block_configs(config, triton_kernels, seed):
    cu, spans = LAYOUTS["spans_cross_tiles"]
    check("triton", spans_mask(cu, spans), d=64, dtype=torch.float16, allowed=naive_dense(cu, spans), config=config)


def test_int64_row_offsets(triton_kernels, seed, monkeypatch):
    """The int64 addressing used past 2**31 elements, forced on a small case."""
    monkeypatch.setattr(tkt, "_needs_i64", lambda *tensors: True)
    cu, spans = LAYOUTS["image_first"]
    check("triton", spans_mask(cu, spans), d=64, dtype=torch.float16, allowed=naive_dense(cu, spans))


def test_bad_tables_are_rejected(triton_kernels):
    mask = tk.HybridMask.causal(torch.tensor([0, 40], dtype=torch.int32, device=DEVICE))
    q, k, v = make_inputs(40, 40, 2, 1, 64, torch.float16)
    plan = tkt.prepare(mask, q, k)
    wrong = dataclasses.replace(plan, fwd_runs=query_runs(mask, plan.config.fwd.block_m * 2))
    with pytest.raises(ValueError, match="plan.fwd_runs must be contiguous int32"):
        tkt.forward(q, k, v, mask.starts, mask.ends, wrong, 0.125)
    with pytest.raises(ValueError, match="has 6 tensors"):
        tkt.Plan.from_op_args(plan.op_args()[0][:5], plan.op_args()[1])
    with pytest.raises(ValueError, match="head dim"):
        tkt.pick_config(512, torch.float16, torch.device(DEVICE))
    with pytest.raises(TypeError, match="float16"):
        tkt.pick_config(64, torch.int8, torch.device(DEVICE))


# ----------------------------------------------------------------------------------------------
# configs: named fields, the shipped and tuned config files, the tuning script
# ----------------------------------------------------------------------------------------------
def test_config_list_round_trip_and_validation():
    cfg = blocks((128, 64), (32, 128), (128, 64), warps=8, stages=3)
    assert cfg.to_list() == [128, 64, 8, 3, 32, 128, 8, 3, 128, 64, 8, 3]
    assert tkt.AttentionConfig.from_list(cfg.to_list()) == cfg
    with pytest.raises(ValueError, match="12 ints"):
        tkt.AttentionConfig.from_list([128, 64, 8, 3])
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        tkt.KernelConfig(64, 48, 4, 2)
    with pytest.raises(ValueError, match="warps"):
        tkt.KernelConfig(64, 64, 3, 2)


def test_shipped_configs_cover_every_gpu_case_and_are_marked_untimed():
    with open(tkt.SHIPPED_CONFIGS) as f:
        data = json.load(f)
    assert data["measured"] is False and "not measured" in data["source"]
    table = tkt.load_configs(tkt.SHIPPED_CONFIGS)
    for d in (16, 32, 64, 80, 128, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            key = (max(32, 1 << (d - 1).bit_length()), str(dtype)[6:])
            assert tkt.config_for("Some GPU", d, dtype, "sm_80") == table[("*", *key)]
            assert tkt.config_for("Some GPU", d, dtype, "sm_90") == table.get(("sm_90", *key), table[("*", *key)])
    # Hopper: dk/dv accumulates transposed over 128-query steps (fewer instructions per score
    # element, tests/test_triton_budget.py); sm_80 keeps the plain 64-key tile
    hopper = tkt.config_for("Some GPU", 128, torch.bfloat16, "sm_90").dkdv
    assert (hopper.block_m, hopper.block_n, hopper.flags & tkt.KT) == (128, 64, tkt.KT)
    assert tkt.config_for("Some GPU", 128, torch.bfloat16, "sm_80").dkdv.block_n == 64


@pytest.fixture
def fresh_config_tables(monkeypatch):
    """config_for reads the files again (the environment variable changes per test)."""
    tkt._config_tables.cache_clear()
    yield monkeypatch
    tkt._config_tables.cache_clear()


ENTRY = {  # one tuned config, as benchmarks/tune.py writes it
    "device": "Fake GPU 80GB",
    "head_dim": 128,
    "dtype": "bfloat16",
    "fwd": [64, 32, 4, 2],
    "dkdv": [16, 64, 4, 2],
    "dq": [64, 32, 4, 2],
    "candidates": [],
}


def test_tuned_file_overrides_its_device_only(tmp_path, fresh_config_tables):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"format": 1, "measured": True, "configs": [ENTRY]}))
    fresh_config_tables.setenv(tkt.TUNED_ENV, str(path))
    tuned = tkt.config_for("Fake GPU 80GB", 96, torch.bfloat16)
    assert tuned == blocks((64, 32), (16, 64), (64, 32), warps=4, stages=2)
    shipped = tkt.load_configs(tkt.SHIPPED_CONFIGS)
    assert tkt.config_for("Other GPU", 128, torch.bfloat16) == shipped[("*", 128, "bfloat16")]
    assert tkt.config_for("Fake GPU 80GB", 128, torch.float16) == shipped[("*", 128, "float16")]


@pytest.mark.parametrize(
    "content,problem",
    [
        ("{not json", "Expecting property name"),
        (
            json.dumps({"configs": [{"device": "*", "head_dim": 64, "dtype": "bfloat16", "fwd": [64, 64, 4, 2]}]}),
            "missing field 'dkdv'",
        ),
        (json.dumps({"configs": [{**ENTRY, "fwd": [64, 60, 4, 2]}]}), "block_n must be a power of two"),
    ],
    ids=["syntax", "missing", "bad_block"],
)
def test_bad_tuned_file_is_one_clear_error(tmp_path, fresh_config_tables, content, problem):
    path = tmp_path / "tuned.json"
    path.write_text(content)
    fresh_config_tables.setenv(tkt.TUNED_ENV, str(path))
    with pytest.raises(ValueError) as info:
        tkt.config_for("Fake GPU", 64, torch.bfloat16)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and problem in msg, msg


def test_tune_check_rejects_a_wrong_kernel(monkeypatch):
    """The tuning script's correctness gate fails a config whose output is off."""
    from benchmarks import tune

    mask, _ = tune._workload(64, torch.device(DEVICE), dry_run=True)
    check = tune._Check(mask, *tune._inputs(64, 2, 1, 32, torch.float16, DEVICE, seed=3), 32**-0.5, "float16")
    assert check.failures(tkt.INTERPRET_CONFIG) == []
    forward = tkt.forward
    monkeypatch.setattr(tkt, "forward", lambda *a: (lambda o, lse: (o * 1.01, lse))(*forward(*a)))
    assert any(f.startswith("out error") for f in check.failures(tkt.INTERPRET_CONFIG))


@pytest.mark.skipif(GPU, reason="the dry run is the CPU stand-in of the GPU tuning")
def test_tune_dry_run_writes_an_untimed_loadable_file(tmp_path):
    from benchmarks import tune

    out = tmp_path / "tuned.json"
    assert tune.main(["--dry-run", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["measured"] is False and "nothing timed" in data["source"]
    (entry,) = data["configs"]
    assert all("error" not in r and r["ms"] is None for r in entry["candidates"])
    assert {r["kernel"] for r in entry["candidates"]} == {"fwd", "dkdv", "dq"}
    table = tkt.load_configs(str(out))
    assert table[(entry["device"], 64, "bfloat16")].to_list() == entry["fwd"] + entry["dkdv"] + entry["dq"]
