"""The README's examples run as written: its Python blocks (in order, sharing their names), and
the shell commands CI takes from it (.ci/readme_commands.py): the install and test blocks that
.ci/run executes, and the quick demo line, run here."""

import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
commands = runpy.run_path(str(ROOT / ".ci" / "readme_commands.py"))


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_ci_runs_the_readmes_install_and_test_blocks():
    blocks = commands["blocks"]()
    assert set(blocks) >= {"install", "demo", "test"}
    assert "pip install" in blocks["install"] and "pytest" in blocks["test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_commands.py install test" in ci
    # nothing of the README's commands is copied into CI, so the two cannot drift apart
    for line in (blocks["install"] + blocks["test"]).splitlines():
        assert line.split("#")[0].strip() not in ci
    r = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_commands.py"), "install", "test"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout == blocks["install"] + blocks["test"]
    r = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_commands.py"), "instal"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "no README block marked <!-- ci: instal -->" in r.stderr


def test_the_readmes_quick_demo_runs(tmp_path):
    """The demo block's --quick line, as written (in a fresh folder): the whole pipeline in seconds."""
    lines = [line.split("#")[0].strip() for line in commands["blocks"]()["demo"].splitlines()]
    quick = shlex.split(next(line for line in lines if "--quick" in line))
    assert quick[:2] == ["transfusion", "demo"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "transfusion", *quick[1:], "--threads", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no warnings and, off a terminal, no progress bars
    out = tmp_path / quick[quick.index("--out") + 1]
    assert {"report.json", "samples_grid.png", "checkpoint", "data", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
