"""Packaging (README, Install): the sdist holds what the build and the tests read, setup.py's build
modes, and the build record behind tk.build_info() and `transfusion --version`.

Installing the wheel and the sdist into fresh environments is .ci/package's job (minutes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Files of a checkout that the sdist leaves out: CI and git settings.
NOT_SHIPPED = (".ci/", ".gitignore")
# Files the sdist adds: metadata, and the commit it was made from.
GENERATED = ("PKG-INFO", "setup.cfg", "COMMIT", "transfusion_kernels.egg-info/")


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> dict[str, bytes]:
    """{path inside the sdist: contents} of an sdist built from this checkout."""
    if not (ROOT / ".git").exists():
        pytest.skip("compares the sdist with the files of a git checkout")
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_sdist_holds_what_cmake_reads(sdist):
    """CMakeLists.txt, every source its globs take (csrc/*.cu, *.cuh, *.h, *.cpp) and every file
    those sources include with quotes, found beside the includer or under csrc/ as the build does."""
    sources = sorted(
        str(p.relative_to(ROOT)) for ext in ("cu", "cuh", "h", "cpp") for p in (ROOT / "csrc").rglob(f"*.{ext}")
    )
    assert sources and "csrc/bindings.cpp" in sources
    missing = [f for f in ["CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", *sources] if f not in sdist]
    assert not missing, f"the sdist lacks files the build reads: {missing}; add them to MANIFEST.in"
    for src in sources:
        for inc in re.findall(rb'^\s*#\s*include\s+"([^"]+)"', sdist[src], re.M):
            here = str(Path(src).parent / inc.decode())
            assert here in sdist or f"csrc/{inc.decode()}" in sdist, f"{src} includes {inc.decode()}, not in the sdist"


def test_sdist_holds_every_file_of_the_checkout(sdist):
    """The tests, the scripts they import (scripts/kernel_report.py, scripts/sync_mutants.py), the
    benchmarks, the docs: every file of the checkout but CI's and git's, and nothing else."""
    tree = {
        p for p in git("ls-files", "--cached", "--others", "--exclude-standard").splitlines() if (ROOT / p).is_file()
    }
    expected = {p for p in tree if not p.startswith(NOT_SHIPPED)}
    shipped = {p for p in sdist if not p.startswith(GENERATED)}
    assert sorted(expected - shipped) == [], "files of the checkout missing from the sdist: add them to MANIFEST.in"
    assert sorted(shipped - expected) == [], "the sdist ships files the checkout does not track"
    assert {"scripts/kernel_report.py", "scripts/sync_mutants.py", "tests/conftest.py"} <= shipped


def test_sdist_records_its_commit(sdist):
    head = git("rev-parse", "HEAD").strip()
    assert sdist["COMMIT"].decode().strip() in (head, head + "+dirty")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[set[str], str]:
    """(paths inside a pure-Python wheel built from this checkout, its METADATA)."""
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, TRANSFUSION_BUILD_CUDA="0")
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (archive,) = out.glob("*.whl")
    with zipfile.ZipFile(archive) as whl:
        names = set(whl.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        return names, whl.read(meta).decode()


def test_wheel_depends_on_torch_and_numpy_only(wheel):
    _, meta = wheel
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = sorted(re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requires if "extra ==" not in r)
    assert core == ["numpy", "torch"], requires
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    assert {"triton", "diffusers", "transformers", "model", "bench", "test"} <= extras


def test_wheel_installs_benchmarks_under_a_collision_free_name(wheel):
    """Every package folder of the checkout is in the wheel; benchmarks/ as transfusion_kernels_bench."""
    names, _ = wheel
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"transfusion_kernels", "transfusion", "transfusion_kernels_bench"}, top
    for folder, installed in (
        ("transfusion_kernels", "transfusion_kernels"),
        ("transfusion", "transfusion"),
        ("benchmarks", "transfusion_kernels_bench"),
    ):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            assert f"{installed}/{rel}" in names, f"{folder}/{rel}: add its package to pyproject's packages list"
    assert "transfusion_kernels_bench/device_check.py" in names and "transfusion_kernels_bench/__main__.py" in names


# ---- build modes -----------------------------------------------------------------------------
FAKE_NVCC = {
    # nvcc that does not run at all (a broken toolkit)
    "broken": 'echo "nvcc: cannot find libnvvm (fake)" >&2; exit 1',
    # nvcc that reports a version but cannot compile (missing headers)
    "no-headers": 'case "$*" in *--version*) echo "Cuda compilation tools, release 13.0, V13.0.88"; exit 0;; esac\n'
    'echo "fatal error: cuda_runtime.h: No such file or directory (fake)" >&2; exit 1',
}
WARNING = "WARNING: transfusion-kernels: installing without the CUDA extension"


def build(tmp_path, nvcc: str, mode: str | None):
    """``setup.py build`` with a fake nvcc first on PATH: (process, the build record or None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvcc").write_text("#!/bin/sh\n" + FAKE_NVCC[nvcc] + "\n")
    (bin_dir / "nvcc").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRANSFUSION_BUILD_CUDA"}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    if mode is not None:
        env["TRANSFUSION_BUILD_CUDA"] = mode
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "build")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    records = list((tmp_path / "build").glob("lib*/transfusion_kernels/_build_info.json"))
    return r, json.loads(records[0].read_text()) if records else None


@pytest.mark.parametrize("nvcc", sorted(FAKE_NVCC))
def test_default_mode_warns_once_and_installs_without_an_unusable_nvcc(tmp_path, nvcc):
    r, record = build(tmp_path, nvcc, None)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count(WARNING) == 1, r.stderr[-3000:]
    assert record["cuda_extension"]["built"] is False
    reason = record["cuda_extension"]["reason"]
    assert ("cannot find libnvvm" in reason) if nvcc == "broken" else reason.startswith("the build failed: ")
    assert record["version"] and "commit" in record


@pytest.mark.parametrize("nvcc", sorted(FAKE_NVCC))
def test_build_cuda_1_fails_with_the_compilers_message(tmp_path, nvcc):
    r, _ = build(tmp_path, nvcc, "1")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert ("nvcc: cannot find libnvvm (fake)" in out) if nvcc == "broken" else ("`cmake -S` exited with code" in out)
    assert WARNING not in out


def test_build_cuda_0_never_builds(tmp_path):
    r, record = build(tmp_path, "broken", "0")
    assert r.returncode == 0 and WARNING not in r.stderr and "libnvvm" not in r.stderr
    assert record["cuda_extension"] == {"built": False, "reason": "TRANSFUSION_BUILD_CUDA=0"}


def test_build_cuda_other_values_are_refused(tmp_path):
    r, _ = build(tmp_path, "broken", "maybe")
    assert r.returncode != 0 and "TRANSFUSION_BUILD_CUDA must be 0 or 1, got 'maybe'" in r.stderr


@pytest.mark.parametrize(
    "archs,gencode",
    [
        (
            "80+PTX;90a",
            ["arch=compute_80,code=sm_80", "arch=compute_80,code=compute_80", "arch=compute_90a,code=sm_90a"],
        ),
        ("90", ["arch=compute_90,code=sm_90"]),
    ],
)
def test_cmake_targets_embed_ptx_where_asked(tmp_path, archs, gencode):
    """The default targets embed compute_80 PTX (newer GPUs run the mma.sync kernels) beside the
    sm_80 and sm_90a SASS; the build info names them as the backends read them."""
    import shutil

    import pybind11

    from benchmarks.toolchain import find_nvcc

    if find_nvcc() is None or shutil.which("cmake") is None or shutil.which("ninja") is None:
        pytest.skip("configuring the CUDA build needs nvcc, cmake and ninja")
    build = tmp_path / "cmake"
    r = subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build),
            "-G",
            "Ninja",
            f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTK_CUDA_ARCHS={archs}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    commands = subprocess.run(["ninja", "-C", str(build), "-t", "commands"], capture_output=True, text=True).stdout
    kernel = next(line for line in commands.splitlines() if "timestep.cu" in line and "-gencode" in line)
    assert sorted(re.findall(r"-gencode=(\S+)", kernel)) == sorted(gencode)
    assert f'TK_CUDA_ARCHS=\\"{archs.replace(";", ",")}\\"' in commands


def test_cmake_refuses_an_unknown_target(tmp_path):
    import shutil

    if shutil.which("cmake") is None:
        pytest.skip("needs cmake")
    r = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "cmake"), "-G", "Ninja", "-DTK_CUDA_ARCHS=90a+PTX"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and "'90a+PTX' is not a target such as 80, 90a or 80+PTX" in r.stdout + r.stderr


def _fake_wheel(folder: Path, commit: str) -> bytes:
    """A wheel in ``folder`` holding a stand-in extension module and its build record."""
    import sysconfig

    folder.mkdir()
    module = b"stand-in for a compiled extension"
    record = {
        "version": "0.1.0",
        "commit": commit,
        "cuda_extension": {"built": True, "archs": ["sm_80+PTX", "sm_90a"], "cuda_version": "13.0.88"},
    }
    with zipfile.ZipFile(folder / "transfusion_kernels-0.1.0-cp311-cp311-linux_x86_64.whl", "w") as whl:
        whl.writestr(f"transfusion_kernels/_C{sysconfig.get_config_var('EXT_SUFFIX')}", module)
        whl.writestr("transfusion_kernels/_build_info.json", json.dumps(record))
    return module


def _build_from(tmp_path, folder: Path):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFUSION_BUILD_CUDA"}
    env["TRANSFUSION_EXTENSION_FROM"] = str(folder)
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "build")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_extension_from_a_wheel_of_this_commit_is_reused(tmp_path):
    """TRANSFUSION_EXTENSION_FROM: the build copies the module and its record out of the wheel
    (CI compiles the extension once, in .ci/package) instead of compiling."""
    import sysconfig

    if not (ROOT / ".git").exists():
        pytest.skip("needs the checkout's commit")
    head = git("rev-parse", "HEAD").strip()
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    module = _fake_wheel(tmp_path / "wheel", head + ("+dirty" if dirty else ""))
    r = _build_from(tmp_path, tmp_path / "wheel")
    assert r.returncode == 0, r.stderr[-3000:]
    (lib,) = (tmp_path / "build").glob("lib*/transfusion_kernels")
    assert (lib / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").read_bytes() == module
    record = json.loads((lib / "_build_info.json").read_text())
    assert record["cuda_extension"]["archs"] == ["sm_80+PTX", "sm_90a"] and record["cuda_extension"]["built"]
    assert "cmake" not in r.stdout + r.stderr and WARNING not in r.stderr


def test_extension_from_a_wheel_of_another_commit_is_refused(tmp_path):
    _fake_wheel(tmp_path / "wheel", "0123abc")
    r = _build_from(tmp_path, tmp_path / "wheel")
    assert r.returncode != 0 and "was built from commit 0123abc" in r.stderr


# ---- what the install reports ----------------------------------------------------------------
def test_build_info_and_version_show_the_record(monkeypatch, capsys):
    import transfusion_kernels as tk
    from transfusion.cli import main
    from transfusion_kernels import backends

    monkeypatch.setattr(backends, "build_record", lambda: {"commit": "abc123"})
    monkeypatch.setattr(backends, "load_extension", lambda: (None, "the extension is not built: because"))
    assert tk.build_info() == {
        "version": tk.__version__,
        "commit": "abc123",
        "cuda_extension": {"built": False, "reason": "the extension is not built: because"},
    }
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == (
        f"transfusion-kernels {tk.__version__} (commit abc123)\n"
        "no CUDA extension: the extension is not built: because\n"
    )


def test_build_info_of_a_built_extension():
    import transfusion_kernels as tk

    ext, _ = tk.backends.load_extension()
    if ext is None:
        pytest.skip("the extension is not built here")
    cuda = tk.build_info()["cuda_extension"]
    assert (
        cuda["built"]
        and cuda["archs"] == list(ext.build_info()["archs"])
        and re.fullmatch(r"\d+\.\d+\.\d+", cuda["cuda_version"])
    )


def test_missing_extension_reason_quotes_the_install(monkeypatch):
    from transfusion_kernels import backends

    monkeypatch.setattr(backends, "EXTENSION", "transfusion_kernels._C_not_built")
    monkeypatch.setattr(backends, "_EXTENSIONS", {})
    monkeypatch.setattr(
        backends, "build_record", lambda: {"cuda_extension": {"built": False, "reason": "nvcc was not found"}}
    )
    ext, reason = backends.extension_status("transfusion_kernels._C_not_built")
    assert ext is None and reason.endswith("; the install said: nvcc was not found")


def test_bench_results_default_under_the_current_directory(tmp_path, monkeypatch):
    import transfusion.cli as cli
    from benchmarks.common import results_path

    monkeypatch.chdir(tmp_path)
    assert Path(results_path("x")).parent.parent == tmp_path / "benchmarks" / "results"
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: calls.append(kw) or 0)
    assert cli.main(["bench", "--smoke"]) == 0
    assert "cwd" not in calls[0]  # the driver runs in the current directory


# ---- a feature whose extra is missing says which extra to install ----------------------------
def _run_without(module: str, code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where ``module`` cannot be imported or found."""
    hide = (
        f"import importlib.util, sys; sys.modules[{module!r}] = None; real = importlib.util.find_spec; "
        f"importlib.util.find_spec = lambda name, *a: None if name == {module!r} else real(name, *a)\n"
    )
    return subprocess.run([sys.executable, "-c", hide + code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "module,code,extra",
    [
        ("sentencepiece", "import transfusion.cli", "model"),
        ("diffusers", "import transfusion_kernels.integrations.diffusers", "diffusers"),
        (
            "transformers",
            "from transfusion_kernels.integrations import transformers as t; t.register()",
            "transformers",
        ),
    ],
)
def test_missing_extra_is_named_in_one_line(module, code, extra):
    r = _run_without(module, code)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and f"pip install 'transfusion-kernels[{extra}]'" in last, r.stderr[-2000:]


def test_missing_triton_is_named_by_the_backend():
    r = _run_without("triton", "import transfusion_kernels as tk; print(tk.available_backends('cpu')['triton'].reason)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pip install 'transfusion-kernels[triton]'" in r.stdout
