"""The diffusion Triton kernels compile for sm_80 and sm_90 without a GPU, without spills.

The interpreter runs the kernels' Python; this compiles them through Triton's real pipeline
(TTIR -> PTX -> cubin with Triton's bundled ptxas), in a process without TRITON_INTERPRET."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
nvidia = pytest.importorskip("triton.backends.nvidia")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(
    not os.path.exists(os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")),
    reason="this triton has no bundled cuobjdump",
)
def test_kernels_compile_for_nvidia_targets_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run(
        [sys.executable, "-m", "tests.diffusion.compile_triton"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert {(x["kernel"], x["arch"], x["dtype"]) for x in rows} == {
        (k, a, d)
        for k in ("affine_draw", "affine_noise_in_velocity", "loss_minus")
        for a in (80, 90)
        for d in ("fp32", "bf16", "fp16")
    }
    for x in rows:
        assert x["stack_bytes"] == 0, x  # no spills
        assert x["registers"] <= 128, x  # at least 4 blocks of 128 threads per SM
