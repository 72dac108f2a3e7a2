"""`transfusion bench` results say what produced them: a row the reference ran in place of a
backend that cannot run here is labelled so, and the recorded command is the one typed."""

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.__main__ import summarize

ROOT = Path(__file__).resolve().parents[2]


def test_stand_in_rows_name_the_reference():
    data = {
        "rows": [
            {
                "case": "c",
                "copy_GBps": 1.0,
                "ops": {
                    "add_noise": {
                        "bytes": 3 * 2**20,
                        "impls": {
                            "reference": {"median_ms": 1.0},
                            "tk:triton": {"median_ms": 1.0, "note": "reference standing in"},
                            "tk:cuda": {"median_ms": 0.5},
                        },
                    }
                },
            }
        ]
    }
    rows, cols = summarize("diffusion", data)
    assert [r["impl"] for r in rows] == ["reference", "reference, standing in for tk:triton", "tk:cuda"]
    model = {"rows": [{"method": "triton", "note": "reference standing in: no GPU"}, {"method": "reference"}]}
    assert [r["method"] for r in summarize("model", model)[0]] == ["reference, standing in for triton", "reference"]


def test_recorded_command_is_the_one_typed(monkeypatch):
    code = "from benchmarks.common import command_line; print(command_line())"
    env = dict(os.environ, TK_BENCH_COMMAND="transfusion bench --smoke")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    assert r.stdout.strip() == "transfusion bench --smoke"
    import transfusion.cli as cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: calls.append(kw["env"]["TK_BENCH_COMMAND"]) or 0)
    assert cli.main(["bench", "--smoke", "--only", "model"]) == 0
    assert calls == ["transfusion bench --smoke --only model"]
