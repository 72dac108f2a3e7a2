"""User mistakes on the command line end in one line, ``transfusion <command>: error: ...``, exit
status 2 and no traceback, before any work is done or any file is written. One case per command
runs ``python -m transfusion`` in a subprocess (the real entry point); the rest call ``main`` in
this process (the same code path, without a torch import per case)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from transfusion.cli import main
from transfusion.config import UserError

TINY = ["--dim", "16", "--layers", "1", "--heads", "2", "--patch-size", "4", "--docs-per-batch", "4",
        "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Prepared data and a one-step training run of a tiny model, shared by every case here."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["prepare", "--out", str(root / "data"), "--vocab-size", "64"]) == 0
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "run"), "--steps", "1", *TINY]) == 0
    return root


def _one_line_error(stderr: str, command: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith(f"transfusion {command}: error: "), stderr
    return lines[0]


def _cli(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return _one_line_error(capsys.readouterr().err, argv[0])


def _subprocess(argv, cwd) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRANSFUSION_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "transfusion", *argv], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    return _one_line_error(r.stderr, argv[0])


def test_one_case_per_command_through_the_real_entry_point(run, tmp_path):
    not_png = tmp_path / "notimage.png"
    not_png.write_text("not an image")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": {"steps": 10,}}\n')
    ck = str(run / "run" / "checkpoint")
    msg = _subprocess(["prepare", "--out", "data", "--holdout", "1.5"], tmp_path)
    assert "--holdout" in msg and "1.5" in msg
    msg = _subprocess(["train", "--data", str(run / "data"), "--out", "r", "--config", str(bad), *TINY], tmp_path)
    assert str(bad) in msg and "line 1 column 24" in msg
    msg = _subprocess(["sample", "--checkpoint", ck, "--prompt", "a two", "--out", "s", "--steps", "2000"], tmp_path)
    assert "--steps 2000" in msg and "1000" in msg
    msg = _subprocess(["caption", "--checkpoint", ck, str(not_png)], tmp_path)
    assert str(not_png) in msg and "not an image" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "notimage.png"]  # nothing written


@pytest.mark.parametrize("args, expect", [
    (["--tokenizer", "{notimage}"], "not a SentencePiece model"),
    (["--holdout", "0"], "--holdout"),
    (["--image-size", "0"], "--image-size must be >= 1"),
])
def test_prepare_refuses_before_writing(tmp_path, capsys, args, expect):
    (tmp_path / "notimage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    args = [a.format(notimage=tmp_path / "notimage.png") for a in args]
    assert expect in _cli(["prepare", "--out", str(tmp_path / "data"), *args], capsys)
    assert not (tmp_path / "data").exists()


def _train(run, out, *args):
    return ["train", "--data", str(run / "data"), "--out", str(out), *TINY, *args]


@pytest.mark.parametrize("config, expect", [
    ('{"train": {"steps": "ten"}}', "train.steps must be int, got 'ten'"),
    ('{"model": {"dim": 16.5}}', "model.dim must be int"),
    ('{"model": {"dimension": 16}}', "dimension"),
    ('{"train":\n  {"steps": 1\n}', "not valid JSON at line 3 column 2"),
])
def test_train_config_file_errors_name_the_file_and_field(run, tmp_path, capsys, config, expect):
    f = tmp_path / "c.json"
    f.write_text(config)
    msg = _cli(_train(run, tmp_path / "r", "--config", str(f)), capsys)
    assert str(f) in msg and expect in msg
    assert not (tmp_path / "r").exists()


def test_train_argument_errors_leave_no_run_folder(run, tmp_path, capsys):
    assert "--patch-size that divides 8" in _cli(_train(run, tmp_path / "r", "--patch-size", "3"), capsys)
    assert "steps must be >= 0" in _cli(_train(run, tmp_path / "r", "--steps", "-1"), capsys)
    assert "no prepare.json" in _cli(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")], capsys)
    assert "--threads must be >= 1" in _cli(_train(run, tmp_path / "r", "--threads", "0"), capsys)
    assert not (tmp_path / "r").exists()


def test_resume_with_another_shape_is_refused_before_training(run, tmp_path, capsys):
    shutil.copytree(run / "run", tmp_path / "r")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")}
    msg = _cli(_train(run, tmp_path / "r", "--resume", "--dim", "32"), capsys)
    assert "dim: 16 (checkpoint) vs 32" in msg and "--out" in msg
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")} == before
    (tmp_path / "r" / "checkpoint" / "config.json").write_text("{")
    assert "cannot resume" in _cli(_train(run, tmp_path / "r", "--resume"), capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_and_backend(run, tmp_path, capsys):
    assert "torch sees 0 CUDA devices" in _cli(_train(run, tmp_path / "r", "--device", "cuda"), capsys)
    msg = _cli(["sample", "--checkpoint", str(run / "run" / "checkpoint"), "--prompt", "a two",
                "--out", str(tmp_path / "s"), "--device", "cpu", "--backend", "cuda"], capsys)
    assert "--backend cuda cannot run on cpu" in msg
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, expect", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "2000"], "--steps 2000 is more than the 1000 timesteps"),
    (["--num-images", "0"], "--num-images must be >= 1, got 0"),
    (["--num-images", "-3"], "--num-images must be >= 1, got -3"),
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--png-scale", "0"], "--png-scale must be >= 1, got 0"),
    (["--image-size", "10"], "--image-size 10 does not fit the model: it must be a multiple of 4"),
])
def test_sample_argument_errors_write_nothing(run, tmp_path, capsys, args, expect):
    argv = ["sample", "--checkpoint", str(run / "run" / "checkpoint"), "--prompt", "a two",
            "--out", str(tmp_path / "s"), *args]
    assert expect in _cli(argv, capsys)
    assert not (tmp_path / "s").exists()


def test_bad_checkpoints(run, tmp_path, capsys):
    msg = _cli(["sample", "--checkpoint", str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path / "s")], capsys)
    assert "not a checkpoint directory" in msg and "--checkpoint" in msg
    ck = tmp_path / "ck"
    shutil.copytree(run / "run" / "checkpoint", ck)
    (ck / "ema.safetensors").unlink(missing_ok=True)
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    msg = _cli(["caption", "--checkpoint", str(ck), str(tmp_path / "missing.png")], capsys)
    assert "missing.png" in msg  # the images are checked before the checkpoint is read
    msg = _cli(["sample", "--checkpoint", str(ck), "--prompt", "a", "--out", str(tmp_path / "s")], capsys)
    assert "model.safetensors: not a safetensors file" in msg
    assert not (tmp_path / "s").exists()
    (ck / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    msg = _cli(["sample", "--checkpoint", str(ck), "--prompt", "a", "--out", str(tmp_path / "s")], capsys)
    assert "tokenizer.model: not a SentencePiece model" in msg
    assert not (tmp_path / "s").exists()


def test_debug_shows_the_traceback(run, tmp_path, monkeypatch):
    argv = ["prepare", "--out", str(tmp_path / "d"), "--holdout", "2"]
    with pytest.raises(UserError, match="--holdout"):
        main([*argv, "--debug"])
    monkeypatch.setenv("TRANSFUSION_DEBUG", "1")
    with pytest.raises(UserError, match="--holdout"):
        main(argv)


def test_valid_config_file_still_trains(run, tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"steps": 1, "lr": 1e-3, "betas": [0.9, 0.99]}, "model": {"dim": 16, "n_heads": 2}}))
    assert main(_train(run, tmp_path / "r", "--config", str(f))) == 0


def _sample(run, out, *args):
    return ["sample", "--checkpoint", str(run / "run" / "checkpoint"), "--prompt", "a two", "--out", str(out),
            "--num-images", "1", "--steps", "2", "--max-new-tokens", "2", "--png-scale", "1", *args]


def test_sample_refuses_a_non_empty_out_folder_before_loading(run, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "sample_000_0.png").write_bytes(b"old")
    msg = _cli(_sample(run, out, "--checkpoint", str(tmp_path / "none")), capsys)  # the checkpoint is not read
    assert msg.endswith(f"--out {out} is not empty; pass --overwrite or another --out")
    assert [(p.name, p.read_bytes()) for p in out.iterdir()] == [("sample_000_0.png", b"old")]


def test_progress_bars_quiet_and_overwrite(run, tmp_path, capsys):
    out = tmp_path / "s"
    capsys.readouterr()
    assert main(_sample(run, out)) == 0
    loud = capsys.readouterr()
    assert "images: 100%" in loud.err and "denoise:" in loud.err and "step/s" in loud.err
    (out / "sample_007_0.png").write_bytes(b"stale")
    assert main(_sample(run, out, "--overwrite", "--quiet")) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == loud.out  # same outputs, no bars
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "sample_000_0.png", "samples.json"]
    png = str(out / "sample_000_0.png")
    assert main(["caption", "--checkpoint", str(run / "run" / "checkpoint"), png, "--max-new-tokens", "2"]) == 0
    loud = capsys.readouterr()
    assert "caption: 100%" in loud.err
    assert main(["caption", "--checkpoint", str(run / "run" / "checkpoint"), png, "--max-new-tokens", "2", "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == loud.out
