"""The CUDA extension: it builds, records what it was built for, is not stale, imports without a
GPU, and its bindings reject bad arguments before touching the device. No GPU needed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig

import pytest
import torch

from tests.cuda.conftest import CSRC, NVCC, ROOT, needs_nvcc, kernel_report, source_hash


def test_build_info(extension):
    info = extension.build_info()
    assert set(info) >= {"archs", "nvcc_version", "cuda_runtime_version", "host_compiler", "build_type", "source_hash"}
    archs = os.environ.get("TRANSFUSION_CUDA_ARCHS", "80+PTX;90a").split(";")  # setup.py and CMake default
    assert info["archs"] == [f"sm_{a}" for a in archs]
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["nvcc_version"]), info
    major, minor = (int(x) for x in info["nvcc_version"].split(".")[:2])
    assert info["cuda_runtime_version"] == major * 1000 + minor * 10


def test_extension_is_built_from_current_sources(extension):
    assert extension.build_info()["source_hash"] == source_hash(), (
        "transfusion_kernels._C was built from other csrc/ sources than the ones in this checkout; "
        "rebuild it: pip install -e ."
    )


def test_import_needs_no_gpu():
    """Importing must not initialise CUDA; cuda_status() explains why kernels cannot run."""
    code = (
        "from transfusion_kernels import _C; s = _C.cuda_status(); "
        "assert _C.device_count() == s['device_count'] == 0, s; assert s['error'], s; print(s['error'])"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if "No module named 'transfusion_kernels._C'" in proc.stderr or "cannot import name '_C'" in proc.stderr:
        pytest.skip("transfusion_kernels._C is not installed (pip install -e . with nvcc on PATH)")
    assert proc.returncode == 0, proc.stderr


def test_binding_rejects_bad_arguments(extension):
    ok = dict(
        out=16,
        sample=32,
        model_output=0,
        coef=48,
        noise=0,
        noise_out=0,
        numel=12,
        rows=3,
        dtype="float16",
        seed=1,
        draw_noise=True,
        clip_range=None,
        stream=0,
    )
    bad = [
        dict(numel=10),  # rows must divide numel
        dict(rows=0),
        dict(numel=-1),
        dict(dtype="float64"),
        dict(noise=64),  # noise given and draw_noise
        dict(draw_noise=False, noise_out=64),
        dict(velocity=True, noise_out=0),  # the velocity needs somewhere to go
        dict(clip_range=-1.0),
        dict(sample=0),
    ]
    for change in bad:
        with pytest.raises(ValueError):
            extension.diffusion_affine_step(**{**ok, **change})
    extension.diffusion_affine_step(**{**ok, "numel": 0})  # nothing to do: returns without a launch
    extension.diffusion_affine_step(**{**ok, "numel": 0, "draw_noise": False, "velocity": True, "noise_out": 64})


@needs_nvcc
def test_bindings_compile_without_warnings():
    import pybind11

    cuda_includes = [f"-isystem{d}" for d in kernel_report.cuda_include_dirs(NVCC)]
    assert cuda_includes, "could not find the CUDA include directory from nvcc --dryrun"
    cmd = [
        "g++",
        "-std=c++17",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-Werror",
        f"-I{CSRC}",
        f"-isystem{pybind11.get_include()}",
        f"-isystem{sysconfig.get_paths()['include']}",
        *cuda_includes,
        str(CSRC / "bindings.cpp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cuda_backend_reports_missing_extension(monkeypatch):
    from transfusion_kernels import backends
    from transfusion_kernels.backends import BackendUnavailableError
    from transfusion_kernels.diffusion import cuda as diffusion_cuda

    monkeypatch.setattr(backends, "load_extension", lambda: (None, "the CUDA extension is not built"))
    x = torch.randn(2, 3)
    with pytest.raises(BackendUnavailableError, match="not built"):
        diffusion_cuda.affine_step(x, None, torch.zeros(2, 6), None, 0, None, False)
