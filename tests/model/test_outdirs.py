"""No hint and no flag destroys another command's work: following the error messages from a
demo, run, samples or data folder never replaces it, and --overwrite replaces only the same
command's own earlier output (the marker file names the command)."""

import hashlib
import json

import pytest

from transfusion.cli import main
from transfusion.outdir import MARKER

TINY = [
    "--dim",
    "16",
    "--layers",
    "1",
    "--heads",
    "2",
    "--patch-size",
    "4",
    "--docs-per-batch",
    "4",
    "--quiet",
    "--device",
    "cpu",
]


def snapshot(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"transfusion {argv[0]}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A demo folder (the real --quick demo), prepared data, a training run on it, and a samples
    folder."""
    root = tmp_path_factory.mktemp("outdirs")
    demo, data, run, samples = root / "demo", root / "data", root / "run", root / "samples"
    assert main(["demo", "--out", str(demo), "--quick", "--quiet", "--threads", "1"]) == 0
    assert main(["prepare", "--out", str(data), "--vocab-size", "64"]) == 0
    assert main(["train", "--data", str(data), "--out", str(run), "--steps", "1", *TINY]) == 0
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run / "checkpoint"),
                "--prompt",
                "a two",
                "--out",
                str(samples),
                "--num-images",
                "1",
                "--steps",
                "2",
                "--max-new-tokens",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    return {"demo": demo, "train": run, "sample": samples, "prepare": data}


def test_markers_name_the_command(folders):
    for command, folder in folders.items():
        assert json.loads((folder / MARKER).read_text()) == {"written_by": f"transfusion {command}"}
    # the demo's data is the demo's: prepare --overwrite must not replace what its checkpoint was trained on
    assert json.loads((folders["demo"] / "data" / MARKER).read_text()) == {"written_by": "transfusion demo"}


def test_the_hints_from_a_demo_folder_point_inside_it(folders, tmp_path, capsys):
    demo = folders["demo"]
    before = snapshot(demo)
    msg = error(["train", "--data", str(demo), "--out", str(tmp_path / "r"), *TINY], capsys)
    assert msg.endswith(f"--data {demo} has no prepare.json but {demo / 'data'} does: pass --data {demo / 'data'}")
    msg = error(["sample", "--checkpoint", str(demo), "--prompt", "a two", "--out", str(tmp_path / "s")], capsys)
    assert msg.endswith(
        f"--checkpoint {demo} has no config.json but {demo / 'checkpoint'} does: "
        f"pass --checkpoint {demo / 'checkpoint'}"
    )
    msg = error(["caption", "--checkpoint", str(demo), str(folders["sample"] / "sample_000_0.png")], capsys)
    assert f"pass --checkpoint {demo / 'checkpoint'}" in msg
    msg = error(["caption", "--checkpoint", str(demo / "checkpoint"), str(demo / "samples_grid.png")], capsys)
    assert msg.endswith("a grid of samples, not one image, so nothing is left to caption; pass the sample_*.png files")
    # a folder with other files never gets "run prepare --out <it>"
    msg = error(["train", "--data", str(folders["train"]), "--out", str(tmp_path / "r"), *TINY], capsys)
    assert "`transfusion prepare --out DIR` with a new DIR" in msg and "--overwrite" not in msg
    assert snapshot(demo) == before and not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("owner", ["demo", "train", "sample", "prepare"])
def test_overwrite_never_replaces_another_commands_folder(folders, owner, capsys):
    """Every other command, with and without --overwrite (and train's --resume), refuses the
    folder, names its owner, and changes nothing in it."""
    out = folders[owner]
    before = snapshot(out)
    run = folders["train"]
    attempts = {
        "prepare": ["prepare", "--out", str(out), "--vocab-size", "64"],
        "train": ["train", "--data", str(folders["prepare"]), "--out", str(out), "--steps", "1", *TINY],
        "sample": [
            "sample",
            "--checkpoint",
            str(run / "checkpoint"),
            "--prompt",
            "a two",
            "--out",
            str(out),
            "--num-images",
            "1",
            "--steps",
            "2",
            "--quiet",
        ],
        "demo": ["demo", "--out", str(out), "--quick", "--quiet"],
    }
    for command, argv in attempts.items():
        if command == owner:
            msg = error(argv, capsys)  # its own folder: only with --overwrite
            assert msg.endswith("pass --overwrite or another --out") or msg.endswith(
                "pass --overwrite, --resume or another --out"
            )
            continue
        for extra in (["--overwrite"], ["--resume"] if command == "train" else [], []):
            msg = error(argv + extra, capsys)
            assert f"holds the output of `transfusion {owner}` (" in msg, msg
            assert "nothing was changed: pass a new or empty --out" in msg
    msg = error(["ablate", "--out", str(out), "--quick"], capsys)
    assert f"holds the output of `transfusion {owner}`" in msg
    assert snapshot(out) == before


def test_the_demos_data_is_not_prepares_to_replace(folders, capsys):
    data = folders["demo"] / "data"
    before = snapshot(folders["demo"])
    msg = error(["prepare", "--out", str(data), "--overwrite"], capsys)
    assert "holds the output of `transfusion demo`" in msg
    assert snapshot(folders["demo"]) == before


def test_overwrite_replaces_the_same_commands_output(folders, tmp_path, capsys):
    samples = tmp_path / "s"
    argv = [
        "sample",
        "--checkpoint",
        str(folders["train"] / "checkpoint"),
        "--prompt",
        "a three",
        "--out",
        str(samples),
        "--num-images",
        "1",
        "--steps",
        "2",
        "--max-new-tokens",
        "2",
        "--quiet",
    ]
    assert main(argv) == 0
    assert main(argv + ["--overwrite", "--seed", "1"]) == 0
    assert json.loads((samples / "samples.json").read_text())["sampler"]["seed"] == 1
