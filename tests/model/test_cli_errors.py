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
    "--no-progress",
    "--device",
    "cpu",
]


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
    r = subprocess.run(
        [sys.executable, "-m", "transfusion", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )
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


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--tokenizer", "{notimage}"], "not a SentencePiece model"),
        (["--holdout", "0"], "--holdout"),
        (["--image-size", "0"], "--image-size must be >= 1"),
    ],
)
def test_prepare_refuses_before_writing(tmp_path, capsys, args, expect):
    (tmp_path / "notimage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    args = [a.format(notimage=tmp_path / "notimage.png") for a in args]
    assert expect in _cli(["prepare", "--out", str(tmp_path / "data"), *args], capsys)
    assert not (tmp_path / "data").exists()


def _with(base, args):
    """``base`` options with those that ``args`` sets again left out (an option takes one value)."""
    given = {a for a in args if a.startswith("--")}
    kept, i = [], 0
    while i < len(base):
        takes_value = i + 1 < len(base) and not base[i + 1].startswith("--")
        if base[i] not in given:
            kept += base[i : i + 1 + takes_value]
        i += 1 + takes_value
    return [*kept, *args]


def _train(run, out, *args):
    return ["train", "--data", str(run / "data"), "--out", str(out), *_with(TINY, args)]


@pytest.mark.parametrize(
    "config, expect",
    [
        ('{"train": {"steps": "ten"}}', "train.steps must be int, got 'ten'"),
        ('{"model": {"dim": 16.5}}', "model.dim must be int"),
        ('{"model": {"dimension": 16}}', "dimension"),
        ('{"train":\n  {"steps": 1\n}', "not valid JSON at line 3 column 2"),
    ],
)
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
    msg = _cli(
        [
            "sample",
            "--checkpoint",
            str(run / "run" / "checkpoint"),
            "--prompt",
            "a two",
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
            "--backend",
            "cuda",
        ],
        capsys,
    )
    assert "--backend cuda cannot run on cpu" in msg
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--steps", "2000"], "--steps 2000 is more than the 1000 timesteps"),
        (["--num-images", "0"], "--num-images must be >= 1, got 0"),
        (["--num-images", "-3"], "--num-images must be >= 1, got -3"),
        (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        (["--png-scale", "0"], "--png-scale must be >= 1, got 0"),
        (["--image-size", "10"], "--image-size 10 does not fit the model: it must be a multiple of 4"),
        (["--image-size", "16"], "--image-size 16: this model was trained on 8x8 images only"),
    ],
)
def test_sample_argument_errors_write_nothing(run, tmp_path, capsys, args, expect):
    argv = [
        "sample",
        "--checkpoint",
        str(run / "run" / "checkpoint"),
        "--prompt",
        "a two",
        "--out",
        str(tmp_path / "s"),
        *args,
    ]
    assert expect in _cli(argv, capsys)
    assert not (tmp_path / "s").exists()


def test_bad_checkpoints(run, tmp_path, capsys):
    msg = _cli(
        ["sample", "--checkpoint", str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path / "s")], capsys
    )
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
    f.write_text(
        json.dumps({"train": {"steps": 1, "lr": 1e-3, "betas": [0.9, 0.99]}, "model": {"dim": 16, "n_heads": 2}})
    )
    assert main(_train(run, tmp_path / "r", "--config", str(f))) == 0


def _sample(run, out, *args):
    return [
        "sample",
        *_with(
            [
                "--checkpoint",
                str(run / "run" / "checkpoint"),
                "--prompt",
                "a two",
                "--out",
                str(out),
                "--num-images",
                "1",
                "--steps",
                "2",
                "--max-new-tokens",
                "2",
                "--png-scale",
                "1",
            ],
            args,
        ),
    ]


def test_sample_refuses_a_non_empty_out_folder_before_loading(run, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "sample_000_0.png").write_bytes(b"old")
    msg = _cli(_sample(run, out, "--checkpoint", str(tmp_path / "none")), capsys)  # the checkpoint is not read
    assert msg.endswith(
        f"--out {out} is not empty: it holds an earlier `transfusion sample` output "
        "(sample_000_0.png); pass --overwrite or another --out"
    )
    assert [(p.name, p.read_bytes()) for p in out.iterdir()] == [("sample_000_0.png", b"old")]


def test_progress_bars_quiet_and_overwrite(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    capsys.readouterr()
    assert main(_sample(run, tmp_path / "piped")) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal: no bars, no escape codes
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(_sample(run, out)) == 0
    loud = capsys.readouterr()
    assert "images: 100%" in loud.err and "denoise:" in loud.err and "step/s" in loud.err
    (out / "sample_007_0.png").write_bytes(b"stale")
    assert main(_sample(run, out, "--overwrite", "--quiet")) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == loud.out  # same outputs, no bars
    assert sorted(p.name for p in out.iterdir()) == [
        ".transfusion.json",
        "grid.png",
        "sample_000_0.png",
        "samples.json",
    ]
    png = str(out / "sample_000_0.png")
    assert main(["caption", "--checkpoint", str(run / "run" / "checkpoint"), png, "--max-new-tokens", "2"]) == 0
    loud = capsys.readouterr()
    assert "caption: 100%" in loud.err
    assert (
        main(["caption", "--checkpoint", str(run / "run" / "checkpoint"), png, "--max-new-tokens", "2", "--quiet"]) == 0
    )
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == loud.out


# -- checkpoint consistency, outputs, help ----------------------------------------------------
def _leftovers(folder):
    """Temporary or half-written names under ``folder`` (what an atomic write must not leave)."""
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def _tokenizer_cases(run, tmp_path, tok):
    """Checkpoint copies whose tokenizer.model does not match their model: another tokenizer
    (a different size), a truncated file, and two whose config.json records other special ids or
    bytes (a same-size swap)."""
    src = run / "run" / "checkpoint"
    rec = json.loads((src / "config.json").read_text())["tokenizer"]
    size = rec["vocab_size"]
    cases = {}
    for name, expect in (
        ("other", f"gives {tok.vocab_size} token ids but the model was trained with {size}"),
        ("truncated", "tokenizer.model"),
        ("special", f"boi_id {rec['boi_id']} (file) vs 1 (config.json)"),
        ("bytes", "is not the tokenizer this checkpoint was saved with"),
    ):
        ck = tmp_path / name
        shutil.copytree(src, ck)
        cfg = json.loads((ck / "config.json").read_text())
        if name == "other":
            tok.save(ck / "tokenizer.model")
        elif name == "truncated":
            data = (ck / "tokenizer.model").read_bytes()
            (ck / "tokenizer.model").write_bytes(data[: len(data) // 3])
        elif name == "special":
            cfg["tokenizer"]["boi_id"] = 1
        else:
            cfg["tokenizer"]["sha256"] = "0" * 64
        (ck / "config.json").write_text(json.dumps(cfg))
        cases[name] = (ck, expect)
    return cases


def test_a_tokenizer_that_does_not_match_the_checkpoint_is_refused(run, tmp_path, tok, capsys):
    cases = _tokenizer_cases(run, tmp_path / "ck", tok)
    png = tmp_path / "x.png"
    from transfusion.image_io import save_png

    save_png(torch.zeros(1, 8, 8), png)
    ck, expect = cases.pop("other")
    msg = _subprocess(["caption", "--checkpoint", str(ck), str(png)], tmp_path)  # the real entry point
    assert expect in msg and "copy back the tokenizer.model" in msg
    for ck, expect in cases.values():
        msg = _cli(["sample", "--checkpoint", str(ck), "--prompt", "a two", "--out", str(tmp_path / "s")], capsys)
        assert expect in msg, msg
    assert not (tmp_path / "s").exists() and not _leftovers(tmp_path)
    # prepared data with another tokenizer: train refuses it before building anything
    data = tmp_path / "data"
    shutil.copytree(run / "data", data)
    tok.save(data / "tokenizer.model")
    msg = _cli(["train", "--data", str(data), "--out", str(tmp_path / "r"), *TINY], capsys)
    assert f"gives {tok.vocab_size} token ids, prepare.json says" in msg
    assert not (tmp_path / "r").exists()


def test_written_files_have_normal_permissions(run, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    assert main(_sample(run, tmp_path / "s", "--quiet")) == 0
    files = [p for d in (run / "data", run / "run", tmp_path / "s") for p in d.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".safetensors", ".json", ".model", ".png", ".jsonl"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}


def test_non_empty_output_folders_are_refused_even_with_overwrite(run, tmp_path, capsys):
    """A folder of the user's own files is never a command's output: every command refuses it,
    with --overwrite too, and says what is there."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = _subprocess(["demo", "--out", str(out), "--quick", "--overwrite"], tmp_path)  # before any work
    assert msg.endswith(
        f"--out {out} holds files `transfusion demo` did not write (keep.txt); --overwrite "
        "replaces only an earlier `transfusion demo` output, so nothing was changed: pass a new "
        "or empty --out"
    )
    for argv in (
        ["prepare", "--out", str(out)],
        ["prepare", "--out", str(out), "--overwrite"],
        _train(run, out, "--steps", "1", "--overwrite"),
        _train(run, out, "--steps", "1", "--resume"),
        _sample(run, out, "--overwrite"),
    ):
        assert "(keep.txt)" in _cli(argv, capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite of prepare's own folder replaces its content as a whole (the folder itself
    # stays, so a shell standing in it stays too)
    data = tmp_path / "data"
    assert main(["prepare", "--out", str(data), "--vocab-size", "64"]) == 0
    inode = data.stat().st_ino
    assert "pass --overwrite or another --out" in _cli(["prepare", "--out", str(data)], capsys)
    assert main(["prepare", "--out", str(data), "--vocab-size", "64", "--overwrite"]) == 0
    assert sorted(p.name for p in data.iterdir()) == [
        ".transfusion.json",
        "corpus.txt",
        "digits.safetensors",
        "prepare.json",
        "tokenizer.model",
    ]
    assert data.stat().st_ino == inode and not _leftovers(tmp_path)


def _interrupt(argv, cwd, started: str):
    """Run the command with stderr on a terminal (a pty: the progress bars show), send SIGINT
    once ``started`` shows there; (exit status, stderr)."""
    import fcntl
    import pty
    import signal
    import struct
    import termios

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRANSFUSION_DEBUG", None)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80 columns, as a terminal has
    p = subprocess.Popen(
        [sys.executable, "-m", "transfusion", *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=slave
    )
    os.close(slave)
    err, signalled = b"", False
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the command ended and closed the terminal
            chunk = b""
        if not chunk:
            break
        err += chunk
        if not signalled and started.encode() in err:
            p.send_signal(signal.SIGINT)
            signalled = True
    os.close(master)
    assert signalled, f"ended before {started!r}: {err.decode()}"
    return p.wait(timeout=60), err.decode()


def test_ctrl_c_leaves_nothing_behind(run, tmp_path, capsys, monkeypatch):
    rc, err = _interrupt(_sample(run, "s", "--steps", "1000", "--num-images", "2"), tmp_path, "denoise:")
    assert rc == 130 and "Traceback" not in err, err
    assert (
        err.strip().splitlines()[-1].split("\r")[-1]
        == "transfusion sample: interrupted; no half-written output was left"
    )
    assert list(tmp_path.iterdir()) == []
    # train (in this process: the same path, without another torch import), before its first checkpoint
    from transfusion.train import Trainer

    def stop(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", stop)
    capsys.readouterr()
    assert main(_train(run, tmp_path / "r", "--steps", "3", "--warmup-steps", "1")) == 130
    assert capsys.readouterr().err == "transfusion train: interrupted; no half-written output was left\n"
    assert list(tmp_path.iterdir()) == []


def test_closing_nested_bars_leaves_the_cursor_at_the_line_start():
    """A Ctrl-C inside the denoise bar (nested in the images bar) must not print its message mid-line,
    whichever order the bars were opened in."""
    import io

    from tqdm.auto import tqdm

    from transfusion.cli import _close_bars

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for leave in (True, False):
        term = Terminal()
        outer = tqdm(total=4, desc="images", file=term, ncols=80, leave=leave)
        inner = tqdm(total=9, desc="denoise", file=term, ncols=80, leave=False)
        outer.update(1), inner.update(2)
        _close_bars()
        assert term.getvalue().endswith(("\n", "\r")), repr(term.getvalue()[-90:])


def test_train_progress_bar_and_quiet(run, tmp_path, capsys, monkeypatch):
    argv = [a for a in _train(run, tmp_path / "r", "--steps", "2") if a != "--no-progress"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    capsys.readouterr()
    assert main(argv) == 0
    assert "train: 100%" in capsys.readouterr().err
    assert main([*argv, "--quiet", "--overwrite", "--warmup-steps", "1"]) == 0
    assert capsys.readouterr().err == ""


def test_paper_preset_and_its_sampling_defaults(run, tmp_path, capsys):
    from transfusion.checkpoint import read_config

    assert main(_train(run, tmp_path / "r", "--steps", "1", "--preset", "paper")) == 0
    cfg = read_config(tmp_path / "r" / "checkpoint")
    assert (
        cfg.train.diffusion_weight,
        cfg.model.num_train_timesteps,
        cfg.model.beta_schedule,
        cfg.model.prediction_type,
        cfg.data.image_first_fraction,
        cfg.data.image_first_max_timestep,
        cfg.model.image_attention,
        cfg.train.lr,
        cfg.train.betas,
        cfg.train.weight_decay,
    ) == (5.0, 1000, "squaredcos_cap_v2", "epsilon", 0.2, 500, "bidirectional", 3e-4, (0.9, 0.95), 0.1)
    assert (cfg.model.image_encoder, cfg.model.patch_size) == ("unet", 4)  # --patch-size 4 overrides the paper's 2
    assert (cfg.sample.sampler, cfg.sample.steps) == ("ddpm", 250)
    base = [
        "sample",
        "--checkpoint",
        str(tmp_path / "r" / "checkpoint"),
        "--prompt",
        "a two",
        "--num-images",
        "1",
        "--max-new-tokens",
        "1",
        "--png-scale",
        "1",
        "--quiet",
    ]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "tokens" not in json.loads((tmp_path / "a" / "samples.json").read_text())
    used = json.loads((tmp_path / "a" / "samples.json").read_text())["sampler"]
    assert (used["sampler"], used["steps"]) == ("ddpm", 250)
    assert main([*base, "--out", str(tmp_path / "b"), "--sampler", "ddim", "--steps", "3"]) == 0
    used = json.loads((tmp_path / "b" / "samples.json").read_text())["sampler"]
    assert (used["sampler"], used["steps"]) == ("ddim", 3)
    # a checkpoint of the default preset keeps 50 steps of its objective's own sampler (DDIM)
    assert read_config(run / "run" / "checkpoint").sample.__dict__ == {"sampler": None, "steps": 50}


def test_help_of_every_option(capsys):
    """Every option of every command says what it does, and its default when it has one; caption
    lists no diffusion options; the description is plain text; argparse errors show the
    command's usage."""
    import argparse

    from transfusion.cli import parser

    ap = parser()
    subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) == {"prepare", "train", "sample", "caption", "bench", "demo", "ablate"}
    for name, p in subs.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), f"{name} {a.option_strings or a.dest}: no help"
            if a.default not in (None, False, argparse.SUPPRESS) and not a.required:
                assert "default" in a.help, f"{name} {a.option_strings}: default {a.default!r} not in its help"
    caption = {o for a in subs["caption"]._actions for o in a.option_strings}
    assert not caption & {
        "--steps",
        "--sampler",
        "--eta",
        "--cfg-scale",
        "--clip-sample",
        "--image-size",
        "--max-images",
    }
    assert "``" not in ap.format_help()
    assert "(default: the number of cores, at most 4)" in " ".join(subs["demo"].format_help().split())
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "d", "--out", "o", "--steps", "ten"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: transfusion train ")
    assert err.strip().splitlines()[-1] == "transfusion train: error: argument --steps: invalid int value: 'ten'"
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--out", "d", "--no-such-flag"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: transfusion prepare ")
    assert err.strip().splitlines()[-1] == "transfusion prepare: error: unrecognized arguments: --no-such-flag"


def test_ablate_subcommand_errors(tmp_path, capsys):
    msg = _cli(["ablate", "--out", str(tmp_path / "a"), "--only", "nosuch"], capsys)
    assert "--only: unknown variant nosuch; choose from baseline," in msg and "flow" in msg
    assert not (tmp_path / "a").exists()


def test_caption_checks_every_file_and_inverts_a_light_background(run, tmp_path, capsys):
    from transfusion.data import load_digits_split
    from transfusion.image_io import save_png

    ck = str(run / "run" / "checkpoint")
    digit = load_digits_split(0.2, 0, 8).test_images[0]
    dark, light = tmp_path / "dark.png", tmp_path / "light.png"
    save_png(digit, dark, scale=4)
    save_png(-digit, light, scale=4)  # dark ink on white paper, as a user would draw it
    (tmp_path / "notes.txt").write_text("not an image")
    msg = _cli(
        ["caption", "--checkpoint", ck, str(dark), str(tmp_path / "notes.txt"), str(tmp_path / "gone.png")], capsys
    )
    assert "2 of 3 files cannot be read as images" in msg and "notes.txt (not an image file)" in msg
    assert "gone.png (No such file or directory)" in msg
    assert main(["caption", "--checkpoint", ck, str(dark), str(light), "--max-new-tokens", "3", "--quiet"]) == 0
    res = capsys.readouterr()
    assert res.err.strip() == (
        f"transfusion caption: note: {light} has a light background; captioned inverted "
        "(light on dark, as the model was trained)"
    )
    caps = [line.split("\t")[1] for line in res.out.strip().splitlines()]
    assert caps[0] == caps[1]


def test_prompt_repeats_and_other_options_refuse_a_second_value(run, tmp_path, capsys):
    out = tmp_path / "s"
    argv = _sample(run, out, "--num-images", "2", "--quiet") + ["--prompt", "a seven"]
    assert argv.count("--prompt") == 2
    capsys.readouterr()
    assert main(argv) == 0
    rec = json.loads((out / "samples.json").read_text())["samples"]
    assert [r["prompt"] for r in rec] == ["a two", "a two", "a seven", "a seven"]  # one set per prompt
    assert all(len(r["images"]) == 1 for r in rec)
    from PIL import Image

    with Image.open(out / "grid.png") as im:  # a row per prompt: 2 x 2 images of 8x8, 1 px padding
        assert im.size == (19, 19)
    # `caption out/*.png`: the grid is skipped, with a note
    pngs = sorted(str(p) for p in out.glob("*.png"))
    assert len(pngs) == 5
    capsys.readouterr()
    assert main(["caption", "--checkpoint", str(run / "run" / "checkpoint"), *pngs, "--max-new-tokens", "2"]) == 0
    res = capsys.readouterr()
    assert [line.split("\t")[0] for line in res.out.strip().splitlines()] == [p for p in pngs if "grid" not in p]
    assert (
        res.err.splitlines()[0]
        == f"transfusion caption: note: skipped {out / 'grid.png'}: a grid of samples, not one image"
    )
    for argv in (
        _sample(run, tmp_path / "t") + ["--steps", "5"],
        _train(run, tmp_path / "r", "--lr", "1e-3", "--lr", "2e-3"),
        ["prepare", "--out", "a", "--out", "b"],
        ["demo", "--out", "d", "--steps", "5", "--steps", "50"],
        ["bench", "--backend", "reference", "--backend", "triton"],
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "was given twice" in err and "give it once" in err, (argv, err)
    assert not (tmp_path / "t").exists() and not (tmp_path / "r").exists()


def test_resume_cuts_metrics_back_and_ctrl_c_names_the_checkpoint(run, tmp_path, capsys, monkeypatch):
    import shlex

    from transfusion.train import Trainer

    r = tmp_path / "r"
    steps = lambda: [json.loads(line)["step"] for line in (r / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(_train(run, r, "--steps", "2")) == 0
    assert capsys.readouterr().err.count("warning: 2 steps is less than the 50 warmup steps") == 1
    shutil.copytree(r / "checkpoint", tmp_path / "at2")
    assert main(_train(run, r, "--steps", "3", "--resume")) == 0
    # killed after step 3 was logged but before its checkpoint: the step-2 checkpoint is what is left
    shutil.rmtree(r / "checkpoint")
    shutil.copytree(tmp_path / "at2", r / "checkpoint")
    assert steps() == [2, 3]  # logged every 10 steps and at the last
    assert main(_train(run, r, "--steps", "3", "--resume")) == 0
    assert steps() == [2, 3]  # step 3 once, from the resumed run

    # Ctrl-C after a checkpoint: the line names it and the command that continues the run
    real_step, calls = Trainer.train_step, []

    def stop_at_third(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", stop_at_third)
    r2 = tmp_path / "r2"
    capsys.readouterr()
    assert main(_train(run, r2, "--steps", "4", "--save-every", "1", "--warmup-steps", "1")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    argv = _train(run, r2, "--steps", "4", "--save-every", "1", "--warmup-steps", "1", "--resume")
    assert err == [
        f"transfusion train: interrupted; kept the checkpoint of step 2 in {r2 / 'checkpoint'}; "
        f"continue with: {shlex.join(['transfusion', *argv])}"
    ]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(shlex.split(err[0].split("continue with: ")[1])[1:]) == 0
    assert [json.loads(line)["step"] for line in (r2 / "metrics.jsonl").read_text().splitlines()] == [4]
