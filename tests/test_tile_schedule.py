"""benchmarks/tile_schedule.py: the list-schedule model behind the attention kernels' tile orders."""

import pytest

from benchmarks import tile_schedule as ts


def test_list_schedule_and_steps():
    assert ts.list_schedule([4, 3, 3, 2, 2], n_sms=2) == 8  # 4+2+2 | 3+3 in launch order
    assert ts.list_schedule([2, 2, 3, 3, 4], n_sms=2) == 9  # shortest first: 2+3+4 | 2+3
    assert ts.list_schedule([1, 1, 1, 1, 3], n_sms=2) == 5  # the long job last: one SM idles
    assert ts.balance([1, 1, 1, 1, 3], n_sms=2) == pytest.approx(7 / 10)
    assert ts.n_steps(0, 0, 0, 0, 64) == 0
    assert ts.n_steps(10, 200, 64, 128, 64) == 4  # masked from 0, FULL [64, 128), masked from 128 and 192
    assert ts.n_steps(100, 300, 130, 300, 64) == 4  # masked from 66, FULL from 130 and 194, masked from 258
    assert ts.n_steps(100, 300, 0, 0, 64) == 4  # no FULL step: from 100


def test_heaviest_first_balances_the_transfusion_mix():
    """8k tokens of the benchmark's Transfusion layout (documents with images) and of packed text
    documents: the longest-first order with the heads fastest keeps the SMs busier until the end
    than each kernel's order before (reversed per head for the forward and dq, block order per
    head for dk/dv)."""
    rows = ts.report(ts.workloads(8192), hq=16, hkv=4, d=128)
    assert {(r["workload"], r["kernel"]) for r in rows} == {
        (w, k) for w in ("mix", "text") for k in ("fwd (mma)", "dq", "dk/dv")
    }
    for r in rows:
        before = r["block, per head"] if r["kernel"] == "dk/dv" else r["reversed, per head"]
        assert r["heaviest, head fastest"] > max(before, 0.94), r
