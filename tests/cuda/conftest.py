"""Fixtures for the CUDA extension tests: the compiled module, built at most once per session."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
sys.path.insert(0, str(ROOT / "scripts"))
import kernel_report  # noqa: E402

NVCC = kernel_report.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")


def source_hash() -> str:
    """Same digest as CMakeLists.txt records in build_info()['source_hash']."""
    files = sorted(p.relative_to(ROOT).as_posix() for ext in ("cu", "cuh", "h", "cpp") for p in CSRC.rglob(f"*.{ext}"))
    digest = "".join(f"{f} {hashlib.sha256((ROOT / f).read_bytes()).hexdigest()}\n" for f in files)
    return hashlib.sha256(digest.encode()).hexdigest()


def _build_with_cmake(build_dir: Path):
    """Configure and build _C with warnings as errors; returns the imported module."""
    import pybind11

    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    if cmake is None or ninja is None:
        pytest.fail("cmake and ninja are needed to build the extension (pip install cmake ninja)")
    configure = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(build_dir),
        "-G",
        "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={ninja}",
        f"-DCMAKE_CUDA_COMPILER={NVCC}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        "-DTK_WERROR=ON",
    ]
    for cmd in (configure, [cmake, "--build", str(build_dir), "-j", str(min(2, os.cpu_count() or 1))]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"extension build failed: {' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    (so,) = build_dir.glob("_C*.so")
    spec = importlib.util.spec_from_file_location("_C", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def extension(tmp_path_factory):
    """The installed transfusion_kernels._C when present (pip install -e . with nvcc builds it),
    else a fresh CMake build in a temporary directory. Skips only when nvcc is absent."""
    try:
        from transfusion_kernels import _C

        return _C
    except ImportError:
        pass
    if NVCC is None:
        pytest.skip("transfusion_kernels._C is not installed and nvcc is not available to build it")
    return _build_with_cmake(tmp_path_factory.mktemp("cmake_build"))
