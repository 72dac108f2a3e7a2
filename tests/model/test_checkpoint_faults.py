"""Checkpoints under faults: pickles are never loaded, bad configs are refused, a process killed
while saving leaves the previous checkpoint loadable, and a run resumed after the kill follows
the uninterrupted loss curve."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from transfusion import checkpoint as ckpt_mod
from transfusion.checkpoint import load_checkpoint, load_trainer_state, read_config
from transfusion.data import MixedBatches, load_digits_split, text_corpus
from transfusion.model import TransfusionModel
from transfusion.train import Trainer

from conftest import tiny_config

HERE = Path(__file__).resolve().parent


class _Payload:
    """Unpickling this writes a marker file: proof that a loader ran pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def _trainer(cfg, tok, digits=None):
    digits = digits or load_digits_split(0.2, 0, 8)
    torch.manual_seed(cfg.train.seed)
    model = TransfusionModel(cfg.model, backend="reference")
    batches = MixedBatches(
        digits.train_images[:64], digits.train_labels[:64], text_corpus(0, 100), tok, cfg.data, cfg.model.patch_size
    )
    return Trainer(model, cfg, tok, batches)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """A small training checkpoint, and the trainer that wrote it."""
    cfg = tiny_config(tok.vocab_size, steps=2)
    tr = _trainer(cfg, tok)
    tr.fit(progress=False)
    path = tr.save(tmp_path_factory.mktemp("faults") / "ck")
    return path, tr


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# -- pickles are never loaded ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "ema.safetensors"])
def test_pickled_tensor_file_is_rejected_without_unpickling(saved, tmp_path, name):
    ck = _copy(saved[0], tmp_path / "ck")
    marker = tmp_path / "marker"
    # a torch.save pickle (what a .pt/.bin holds) under the safetensors name, carrying a payload
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, ck / name)
    with pytest.raises(Exception):
        load_checkpoint(ck, use_ema=True)
        load_trainer_state(ck)
    assert not marker.exists(), "a checkpoint loader unpickled a file"


def test_pt_file_in_checkpoint_is_never_read(saved, tmp_path):
    """A ``.pt`` holding a non-tensor object next to the real files is ignored: load_checkpoint
    reads only the safetensors/JSON/tokenizer files it names."""
    ck = _copy(saved[0], tmp_path / "ck")
    marker = tmp_path / "marker"
    for name in ("model.pt", "pytorch_model.bin", "optimizer.pt", "training_args.bin"):
        with open(ck / name, "wb") as f:
            pickle.dump(_Payload(marker), f)
    model, _, _ = load_checkpoint(ck, use_ema=False)
    load_trainer_state(ck)
    assert not marker.exists()
    for k, v in saved[1].model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_pickle_only_checkpoint_is_rejected(saved, tmp_path):
    """A folder with config and tokenizer but weights only as a pickle does not load."""
    ck = _copy(saved[0], tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save({"x": _Payload(marker)}, ck / "model.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(ck, use_ema=False)
    assert not marker.exists()


def test_pickled_weights_error_names_the_file(saved, tmp_path):
    ck = _copy(saved[0], tmp_path / "ck")
    torch.save({"w": torch.ones(2)}, ck / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(ck, use_ema=False)


# -- the config is validated -------------------------------------------------------------------
def _edit_config(ck: Path, edit) -> None:
    d = json.loads((ck / "config.json").read_text())
    edit(d)
    (ck / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.pop("format_version"), "format"),
        (lambda d: d.update(format_version=99), "format 99"),
        (lambda d: d["model"].update(bogus=1), "unknown ModelConfig fields"),
        (lambda d: d["train"].update(unknown_knob=True), "unknown TrainConfig fields"),
        (lambda d: d["model"].update(n_heads=5), "divisible by n_heads"),
        (lambda d: d["model"].update(image_encoder="vit"), "image_encoder"),
        (lambda d: d["data"].update(text_fraction=1.5), "text_fraction"),
        (lambda d: d["train"].update(lr=-1.0), "lr"),
    ],
)
def test_bad_config_is_refused(saved, tmp_path, edit, match):
    ck = _copy(saved[0], tmp_path / "ck")
    _edit_config(ck, edit)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(ck)


def test_config_missing_or_not_json_is_refused(saved, tmp_path):
    ck = _copy(saved[0], tmp_path / "ck")
    (ck / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        load_checkpoint(ck)


def test_config_unknown_section_raises(saved, tmp_path):
    ck = _copy(saved[0], tmp_path / "ck")
    _edit_config(ck, lambda d: d.update(optimiser={"lr": 1.0}))
    with pytest.raises(ValueError, match="optimiser"):
        load_checkpoint(ck)


def test_config_missing_field_raises_value_error(saved, tmp_path):
    ck = _copy(saved[0], tmp_path / "ck")
    _edit_config(ck, lambda d: d["model"].pop("dim"))
    with pytest.raises(ValueError, match="dim"):
        load_checkpoint(ck)


# -- crashes during a save ---------------------------------------------------------------------
def test_crash_between_the_two_renames_keeps_a_checkpoint_at_the_path(saved, tmp_path, monkeypatch):
    """save_checkpoint renames the old checkpoint away, then the new one into place: after a crash
    in between, loading the path finds the previous checkpoint, and the next save cleans up."""
    path, tr = saved
    ck = _copy(path, tmp_path / "ck")
    real, calls = os.replace, []

    def dying_replace(a, b):
        calls.append((a, b))
        real(a, b)
        if len(calls) == 1:
            raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(ckpt_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        tr.save(ck)
    monkeypatch.undo()
    model, _, _ = load_checkpoint(ck)
    assert read_config(ck).model.dim == model.cfg.dim
    tr.save(ck)
    assert (ck / "config.json").is_file() and not list(tmp_path.glob("ck.old-*"))


def test_error_while_writing_removes_the_temporary_folder(saved, tmp_path, monkeypatch):
    """An exception (here Ctrl-C) while the files are written leaves the previous checkpoint as it
    was and no temporary folder; files are written with the usual permissions, not safetensors' 0600."""
    path, tr = saved
    ck = _copy(path, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()}
    real = ckpt_mod.save_file

    def dying_save(tensors, name):
        real(tensors, name)
        if name.endswith("ema.safetensors") or name.endswith("optimizer.safetensors"):
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tr.save(ck)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()} == before
    umask = os.umask(0)
    os.umask(umask)
    tr.save(ck)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in ck.iterdir()} == {
        p.name: oct(0o666 & ~umask) for p in ck.iterdir()
    }


CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from conftest import tiny_config
    from test_checkpoint_faults import _trainer
    from transfusion.tokenizer import Tokenizer
    tok = Tokenizer.load({tok!r})
    cfg = tiny_config(tok.vocab_size, steps={steps})
    cfg.train.ema_decay = 0.9
    cfg.train.save_every = 1
    tr = _trainer(cfg, tok)
    tr.fit(steps={kill_after}, checkpoint_dir={ck!r}, progress=False)
    print("trained", flush=True)
    n = 0
    while True:  # keep rewriting the same state: the kill lands inside a save
        tr.save({ck!r})
        n += 1
        print("saved", n, flush=True)
""")


def test_sigkill_during_save_then_resume_follows_the_curve(tok, tmp_path):
    steps, kill_after = 6, 3
    tok.save(tmp_path / "tok.model")
    ck = tmp_path / "run" / "checkpoint"
    code = CHILD.format(
        tests=str(HERE), tok=str(tmp_path / "tok.model"), steps=steps, kill_after=kill_after, ck=str(ck)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(HERE)
    )
    try:
        saves = 0
        deadline = time.time() + 60
        while saves < 3 and time.time() < deadline:  # a few completed rewrites, then kill mid-write
            line = proc.stdout.readline()
            if not line:
                break
            saves += line.startswith("saved")
        assert saves >= 3, proc.stderr.read()
        time.sleep(0.003 * (os.getpid() % 7))  # vary where in the save the kill lands
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    # the checkpoint at the path is whole: config, weights, EMA, trainer state at step kill_after
    model, cfg, _ = load_checkpoint(ck, use_ema=False)
    state, _, _, ema = load_trainer_state(ck)
    assert state["step"] == kill_after and ema is not None

    # resume in this process; the losses after the kill equal those of an uninterrupted run
    cfg.train.steps = steps
    straight = _trainer(cfg, tok).fit(progress=False)
    resumed = _trainer(cfg, tok)
    torch.manual_seed(4321)  # unrelated process state: everything must come from the checkpoint
    resumed.resume(ck)
    assert resumed.step == kill_after
    after = resumed.fit(progress=False)
    assert [h["step"] for h in after] == list(range(kill_after + 1, steps + 1))
    assert [h["loss"] for h in after] == [h["loss"] for h in straight[kill_after:]]  # bit-identical on the CPU
