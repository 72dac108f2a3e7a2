"""A missing optional dependency ends every command that needs it in one line, exit status 2,
naming the extra that installs it, before any work. The modules are hidden the way a missing
install looks to Python (``sys.modules[name] = None``: the import raises ImportError), in one
subprocess so that this test process keeps them."""

import json
import os
import subprocess
import sys
import textwrap

# What each command needs, written out here (not read from the CLI's own table): a command that
# gained an import without declaring it fails this test only if its message were not one line.
NEEDS = {
    "prepare": ["sentencepiece", "safetensors", "sklearn", "tqdm"],
    "train": ["sentencepiece", "safetensors", "tqdm"],
    "sample": ["sentencepiece", "safetensors", "tqdm", "PIL"],
    "caption": ["sentencepiece", "safetensors", "tqdm", "PIL"],
    "demo": ["sentencepiece", "safetensors", "sklearn", "tqdm", "PIL"],
    "ablate": ["sentencepiece", "safetensors", "sklearn", "scipy", "tqdm"],
}
PIP = {"PIL": "pillow", "sklearn": "scikit-learn"}

RUNNER = textwrap.dedent("""
    import contextlib, io, json, sys
    from transfusion.cli import main

    def hidden(name, argv):
        saved = {k: v for k, v in sys.modules.items() if k == name or k.startswith(name + ".")}
        for k in saved:
            sys.modules[k] = None
        sys.modules[name] = None
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
        finally:
            for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[k]
            sys.modules.update(saved)
        return [rc, err.getvalue()]

    cases = json.loads(sys.argv[1])
    if any(argv[:1] == ["train-vae"] for _, argv in cases):  # prepared data whose latents need diffusers
        import pathlib
        root = pathlib.Path(sys.argv[2])
        assert main(["prepare", "--out", str(root / "data"), "--vocab-size", "64"]) == 0
        info = json.loads((root / "data" / "prepare.json").read_text())
        info["latents"] = "vae"
        (root / "data" / "prepare.json").write_text(json.dumps(info))
        (root / "data" / "vae").mkdir()
    out = []
    for name, argv in cases:
        if argv[0] == "train-vae":
            argv = ["train", "--data", str(root / "data"), "--out", str(root / "run"), "--quiet"]
        out.append(hidden(name, argv))
    print(json.dumps(out))
""")


def _argv(command, tmp):
    return {
        "prepare": ["prepare", "--out", f"{tmp}/p"],
        "train": ["train", "--data", f"{tmp}/p", "--out", f"{tmp}/r"],
        "sample": ["sample", "--checkpoint", f"{tmp}/r/checkpoint", "--prompt", "a two", "--out", f"{tmp}/s"],
        "caption": ["caption", "--checkpoint", f"{tmp}/r/checkpoint", f"{tmp}/x.png"],
        "demo": ["demo", "--out", f"{tmp}/d", "--quick"],
        "ablate": ["ablate", "--out", f"{tmp}/a", "--quick"],
    }[command]


def test_each_missing_dependency_is_one_line_naming_its_extra(tmp_path):
    cases = [(name, _argv(command, tmp_path)) for command, names in NEEDS.items() for name in names]
    vae = tmp_path / "vae"
    vae.mkdir()
    cases += [
        ("diffusers", ["prepare", "--out", f"{tmp_path}/p", "--vae", str(vae)]),
        ("diffusers", ["train-vae"]),
    ]  # found only when the data says VAE latents
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRANSFUSION_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(cases), str(tmp_path / "w")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for (name, argv), (rc, err) in zip(cases, results):
        command = "train" if argv[0] == "train-vae" else argv[0]
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (name, argv, err)
        assert lines[0].startswith(
            f"transfusion {command}: error: `transfusion {command}` needs "
            f"{PIP.get(name, name)}, which is not installed: pip install 'transfusion-kernels[model]'"
        ), lines[0]
    # nothing was written: every check ran before the command's work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae", "w"]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["data"]
