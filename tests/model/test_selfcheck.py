"""``python -m transfusion_kernels.selfcheck`` says which backends ran and which did not (why,
and the command that enables them); its verdict covers only the ones that ran; stderr is empty."""

import os
import subprocess
import sys

import pytest

from transfusion_kernels.selfcheck import verdict


def _selfcheck(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "transfusion_kernels.selfcheck", "--repeats", "1", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_only_the_reference_is_not_called_agreement():
    r = _selfcheck("--no-triton-interpreter", "--device", "cpu")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert "backends that run here: reference (plain PyTorch, runs on any device)" in lines
    triton = next(l for l in lines if l.startswith("not run: triton: "))
    assert "to run it: " in triton
    assert any(l.startswith("not run: cuda: ") and "to run it: " in l for l in lines)
    assert lines[-1] == "Only the reference ran: no kernel backend was checked. Not run here: triton, cuda (see above)."
    assert "agree" not in r.stdout.lower().replace("agree with the reference", "")


def test_triton_under_the_interpreter_is_checked_and_named():
    pytest.importorskip("triton")
    r = _selfcheck("--device", "cpu")
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no library warnings
    assert r.stdout.splitlines()[-1] == "Agree with the reference: triton (9 ops). Not run here: cuda (see above)."


def test_verdict_lists_what_ran_and_what_did_not():
    assert (
        verdict({"reference": 9, "triton": 9, "cuda": 8}, [], 0, ["hybrid_attention on cuda"])
        == "Agree with the reference: triton (9 ops), cuda (8 ops). Not covered: hybrid_attention on cuda."
    )
    assert verdict({"reference": 9}, ["triton", "cuda"], 0, []).startswith("Only the reference ran")
    assert verdict({"reference": 9, "triton": 9}, ["cuda"], 2, []) == "2 mismatches. Not run here: cuda (see above)."
