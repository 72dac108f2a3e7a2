"""Builds the optional CUDA extension ``transfusion_kernels._C`` (metadata: pyproject.toml).

The extension is plain CUDA C++ + pybind11 (no torch headers), configured with CMake and the
Ninja generator; see CMakeLists.txt. Whether it is built (TRANSFUSION_BUILD_CUDA):

    unset   build it when a usable nvcc is found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin);
            when none is found or the build fails, warn once and install without it
    1       build it; fail with the compiler's own message
    0       never build it (pure-Python install)

Every build writes transfusion_kernels/_build_info.json: the version, the commit, and the archs
and CUDA version of the extension or why it was not built (``tk.build_info()``,
``transfusion --version``). An sdist carries its commit in the file COMMIT.

TRANSFUSION_EXTENSION_FROM=DIR takes the extension from the one transfusion_kernels wheel in DIR
instead of compiling it (it must have been built from this commit): CI compiles the extension
once, in .ci/package, and its editable install reuses it.

Other knobs: TRANSFUSION_CUDA_ARCHS (default "80+PTX;90a": sm_80 SASS and compute_80 PTX, which
newer GPUs such as sm_100 and sm_120 run, and the sm_90a kernels for Hopper), CMAKE_BUILD_PARALLEL_LEVEL (default: the
number of CPUs), CMAKE_BUILD_TYPE (default Release).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
ENV_FLAG = "TRANSFUSION_BUILD_CUDA"
RECORD = "_build_info.json"
EXT_NAME = "transfusion_kernels._C"


def find_nvcc() -> str | None:  # as benchmarks/toolchain.py; this file runs before the package exists
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def build_mode() -> str:
    """ "1", "0" or "auto" from TRANSFUSION_BUILD_CUDA."""
    flag = os.environ.get(ENV_FLAG, "").strip().lower()
    if flag in ("1", "true", "on", "yes"):
        return "1"
    if flag in ("0", "false", "off", "no"):
        return "0"
    if flag:
        raise RuntimeError(
            f"{ENV_FLAG} must be 0 or 1, got {os.environ[ENV_FLAG]!r}; unset it to build when nvcc is found"
        )
    return "auto"


def probe_nvcc() -> tuple[str | None, str | None, str | None]:
    """(nvcc, its CUDA version, None) when a usable nvcc is found, else (nvcc or None, None, why not).
    Raises with nvcc's own message under TRANSFUSION_BUILD_CUDA=1."""
    mode = build_mode()
    if mode == "0":
        return None, None, f"{ENV_FLAG}=0"
    nvcc = find_nvcc()
    if nvcc is None:
        why = "nvcc was not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin"
        if mode == "1":
            raise RuntimeError(f"{ENV_FLAG}=1 but {why}; install the CUDA toolkit or set CUDA_HOME")
        return None, None, why
    try:
        run = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
        output, code = (run.stdout + run.stderr).strip(), run.returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        output, code = str(e), -1
    version = re.search(r"release [\d.]+, V([\d.]+)", output)
    if code == 0 and version:
        return nvcc, version.group(1), None
    why = f"{nvcc} --version failed: {output or f'exit code {code}'}"
    if mode == "1":
        raise RuntimeError(f"{ENV_FLAG}=1 but {why}")
    return nvcc, None, why


def git_commit() -> str | None:
    """HEAD of this checkout (+dirty when tracked files differ from it), or the commit an sdist
    recorded in COMMIT; None when neither is known."""
    if (ROOT / ".git").exists():
        try:
            git = ["git", "-C", str(ROOT)]
            sha = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
            dirty = subprocess.run(
                git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
            ).stdout.strip()
            return sha + ("+dirty" if dirty else "")
        except (OSError, subprocess.CalledProcessError):
            return None
    commit = ROOT / "COMMIT"
    return commit.read_text().strip() or None if commit.is_file() else None


def write_record(package_dir: Path, version: str, cuda: dict) -> None:
    """transfusion_kernels/_build_info.json: what this build made (read by tk.build_info())."""
    package_dir.mkdir(parents=True, exist_ok=True)
    record = {"version": version, "commit": git_commit(), "cuda_extension": cuda}
    (package_dir / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def warn(message: str) -> None:
    print(f"WARNING: transfusion-kernels: {message}", file=sys.stderr, flush=True)


NVCC, CUDA_VERSION, NOT_BUILT = probe_nvcc()
PREBUILT = os.environ.get("TRANSFUSION_EXTENSION_FROM", "").strip() or None


def prebuilt_extension(folder: str, module: str) -> tuple[bytes, dict]:
    """The compiled ``module`` file (e.g. transfusion_kernels/_C.cpython-311-x86_64-linux-gnu.so)
    and the build record of the one wheel in ``folder``, checked to be built from this commit."""
    wheels = sorted(Path(folder).glob("transfusion_kernels-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(
            f"TRANSFUSION_EXTENSION_FROM={folder} must hold one transfusion_kernels wheel, found {len(wheels)}"
        )
    with zipfile.ZipFile(wheels[0]) as whl:
        if module not in whl.namelist():
            raise RuntimeError(
                f"TRANSFUSION_EXTENSION_FROM: {wheels[0].name} has no {module} (built without the "
                "extension, or for another Python)"
            )
        data, record = whl.read(module), json.loads(whl.read(f"transfusion_kernels/{RECORD}"))
    if record.get("commit") != git_commit():
        raise RuntimeError(
            f"TRANSFUSION_EXTENSION_FROM: {wheels[0].name} was built from commit {record.get('commit')}, "
            f"this source tree is at {git_commit()}; build the wheel again"
        )
    return data, record


class RecordingBuildPy(build_py):
    """Writes the build record; the extension's build, when there is one, rewrites it."""

    def run(self) -> None:
        super().run()
        target = ROOT if self.editable_mode else Path(self.build_lib)
        if NOT_BUILT is not None and build_mode() != "0" and not PREBUILT:
            warn(f"installing without the CUDA extension: {NOT_BUILT}")
        write_record(
            target / "transfusion_kernels",
            self.distribution.get_version(),
            {"built": False, "reason": NOT_BUILT or "the extension's build has not run"},
        )


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
    def build_extensions(self) -> None:
        for ext in list(self.extensions):
            out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
            # An editable install builds into build_lib, then copies the module into the sources.
            record_dir = ROOT / "transfusion_kernels" if self.editable_mode else out_path.parent
            if PREBUILT:
                data, record = prebuilt_extension(PREBUILT, f"transfusion_kernels/{out_path.name}")
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_bytes(data)
                write_record(record_dir, self.distribution.get_version(), record["cuda_extension"])
                continue
            archs = os.environ.get("TRANSFUSION_CUDA_ARCHS", "80+PTX;90a")
            try:
                self.build_cmake(out_path, archs)
            except RuntimeError as e:
                if build_mode() == "1":
                    raise
                warn(f"installing without the CUDA extension: {e}")
                self.extensions.remove(ext)
                lines = str(e).splitlines()
                first_error = next((line.strip() for line in lines if "error" in line.lower()), lines[0])
                reason = f"the build failed: {first_error} (TRANSFUSION_BUILD_CUDA=1 fails with the whole message)"
                write_record(record_dir, self.distribution.get_version(), {"built": False, "reason": reason})
                continue
            write_record(
                record_dir,
                self.distribution.get_version(),
                {
                    "built": True,
                    "archs": [f"sm_{a}" for a in archs.split(";")],
                    "cuda_version": CUDA_VERSION,
                    "nvcc": NVCC,
                },
            )

    def build_cmake(self, out_path: Path, archs: str) -> None:
        import pybind11

        cmake, ninja = _tool("cmake", "cmake"), _tool("ninja", "ninja")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        cache = build_dir / "CMakeCache.txt"
        # A cache from another cmake (e.g. an earlier isolated build env that no longer exists)
        # cannot be reused: start over.
        if cache.exists() and f"CMAKE_COMMAND:INTERNAL={cmake}\n" not in cache.read_text():
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)

        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
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
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTK_OUTPUT_DIR={out_path.parent}",
            f"-DTK_EXT_SUFFIX={suffix}",
            f"-DTK_CUDA_ARCHS={archs}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        print(
            f"transfusion-kernels: building the CUDA extension with {NVCC} (CUDA {CUDA_VERSION}, archs {archs})",
            file=sys.stderr,
            flush=True,
        )
        for cmd in (configure, [cmake, "--build", str(build_dir), "-j", jobs]):
            # The output is kept: a failure is reported with the compiler's own message.
            run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            print(run.stdout, file=sys.stderr, flush=True)
            if run.returncode != 0:
                tail = "\n".join(run.stdout.strip().splitlines()[-40:])
                raise RuntimeError(
                    f"`{Path(cmd[0]).name} {cmd[1]}` exited with code {run.returncode}:\n{tail}\n"
                    f"(set {ENV_FLAG}=0 for a pure-Python install)"
                )
        if not out_path.exists():
            raise RuntimeError(f"the CMake build did not produce {out_path}")


class CommitSdist(sdist):
    """An unpacked sdist has no .git: it carries the commit it was made from in COMMIT."""

    def make_release_tree(self, base_dir, files) -> None:
        super().make_release_tree(base_dir, files)
        commit = git_commit()
        if commit:
            Path(base_dir, "COMMIT").write_text(commit + "\n")


setup(
    ext_modules=[Extension(EXT_NAME, sources=[])] if PREBUILT or (NVCC and NOT_BUILT is None) else [],
    cmdclass={"build_py": RecordingBuildPy, "build_ext": CMakeBuild, "sdist": CommitSdist},
)
