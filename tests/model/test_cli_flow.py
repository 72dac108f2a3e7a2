"""``transfusion train --objective flow`` and ``transfusion sample`` end to end on the digits."""

import json

from transfusion.checkpoint import read_config
from transfusion.cli import main

from test_cli_errors import TINY, _cli


def test_train_and_sample_a_flow_model(tmp_path, capsys):
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "samples"
    assert main(["prepare", "--out", str(data), "--vocab-size", "64"]) == 0
    assert main(["train", "--data", str(data), "--out", str(run), "--steps", "2", "--objective", "flow", *TINY]) == 0
    ck = run / "checkpoint"
    cfg = read_config(ck)
    assert cfg.model.objective == "flow" and cfg.sample.sampler is None  # sampled with the objective's own
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(ck),
                "--prompt",
                "a handwritten two",
                "--num-images",
                "2",
                "--steps",
                "3",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads((out / "samples.json").read_text())
    assert summary["sampler"]["sampler"] == "euler" and len(summary["samples"]) == 2
    msg = _cli(
        ["sample", "--checkpoint", str(ck), "--prompt", "two", "--sampler", "ddim", "--out", str(tmp_path / "other")],
        capsys,
    )
    assert "--sampler 'ddim' does not fit objective 'flow'; use 'euler'" in msg
    assert not (tmp_path / "other").exists()


def test_a_config_whose_sampler_does_not_fit_its_objective_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["prepare", "--out", str(data), "--vocab-size", "64"]) == 0
    conf = tmp_path / "flow.json"
    conf.write_text(json.dumps({"model": {"objective": "flow"}, "sample": {"sampler": "ddpm", "steps": 10}}))
    msg = _cli(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--config", str(conf), *TINY], capsys)
    assert "sample.sampler 'ddpm' does not fit objective 'flow'" in msg
    assert not (tmp_path / "run").exists()
    # --objective on a preset whose sampler belongs to the other objective: the objective's own sampler
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "paper"),
                "--preset",
                "paper",
                "--steps",
                "1",
                "--objective",
                "flow",
                *TINY,
            ]
        )
        == 0
    )
