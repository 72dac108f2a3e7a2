"""Builds the optional CUDA extension ``transfusion_kernels._C`` (metadata: pyproject.toml).

The extension is plain CUDA C++ + pybind11 (no torch headers), configured with CMake and the
Ninja generator; see CMakeLists.txt. Whether it is built:

    TRANSFUSION_BUILD_CUDA=1   build it; fail if nvcc cannot be found
    TRANSFUSION_BUILD_CUDA=0   never build it (pure-Python install)
    unset                      build it when nvcc is found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)

Other knobs: TRANSFUSION_CUDA_ARCHS (default "80;90a"), CMAKE_BUILD_PARALLEL_LEVEL (default: the
number of CPUs), CMAKE_BUILD_TYPE (default Release).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
ENV_FLAG = "TRANSFUSION_BUILD_CUDA"


def find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def want_cuda() -> tuple[bool, str | None]:
    flag = os.environ.get(ENV_FLAG, "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False, None
    nvcc = find_nvcc()
    if flag in ("1", "true", "on", "yes"):
        if nvcc is None:
            raise RuntimeError(
                f"{ENV_FLAG}=1 but nvcc was not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin; "
                "install the CUDA toolkit or set CUDA_HOME"
            )
        return True, nvcc
    if flag:
        raise RuntimeError(f"{ENV_FLAG} must be 0 or 1, got {os.environ[ENV_FLAG]!r}")
    return nvcc is not None, nvcc


class CMakeExtension(Extension):
    def __init__(self, name: str, nvcc: str):
        super().__init__(name, sources=[])
        self.nvcc = nvcc


def _tool(name: str, module: str) -> str:
    """A build tool, preferring the PyPI package installed in the (isolated) build env."""
    try:
        mod = __import__(module)
        path = os.path.join(mod.BIN_DIR if hasattr(mod, "BIN_DIR") else mod.CMAKE_BIN_DIR, name)
        if os.path.isfile(path):
            return path
    except Exception:
        pass
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is needed to build the CUDA extension: pip install {module}")
    return found


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        cmake, ninja = _tool("cmake", "cmake"), _tool("ninja", "ninja")
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        cache = build_dir / "CMakeCache.txt"
        # A cache from another cmake (e.g. an earlier isolated build env that no longer exists)
        # cannot be reused: start over.
        if cache.exists() and f"CMAKE_COMMAND:INTERNAL={cmake}\n" not in cache.read_text():
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)

        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTK_OUTPUT_DIR={out_path.parent}",
            f"-DTK_EXT_SUFFIX={suffix}",
            f"-DTK_CUDA_ARCHS={os.environ.get('TRANSFUSION_CUDA_ARCHS', '80;90a')}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        try:
            subprocess.run(args, check=True)
            subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"building the CUDA extension failed ({e}); set {ENV_FLAG}=0 for a pure-Python install"
            ) from e
        if not out_path.exists():
            raise RuntimeError(f"the CMake build did not produce {out_path}")


build, nvcc = want_cuda()
if build:
    print(f"transfusion-kernels: building the CUDA extension with {nvcc}", file=sys.stderr)
else:
    print(f"transfusion-kernels: no CUDA extension (nvcc not found or {ENV_FLAG}=0)", file=sys.stderr)

setup(
    ext_modules=[CMakeExtension("transfusion_kernels._C", nvcc)] if build else [],
    cmdclass={"build_ext": CMakeBuild},
)
