"""Training: the loss falls, resumed runs follow the same curve, checkpoints round-trip."""

import json

import pytest
import torch

from transfusion.checkpoint import load_checkpoint, save_checkpoint
from transfusion.data import load_digits_split
from transfusion.train import loss_terms

from conftest import FixedBatches, digit_trainer, tiny_config


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(0.2, 0, 8)


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_loss_falls_when_overfitting_one_batch(tok, digits, encoder):
    cfg = tiny_config(tok.vocab_size, steps=40, image_encoder=encoder)
    cfg.train.warmup_steps = 1
    tr = digit_trainer(cfg, tok, digits)
    tr.batches = FixedBatches(tr.batches.batch(0))
    hist = tr.fit(progress=False)
    first, last = hist[0], hist[-1]
    assert last["lm_loss"] < 0.5 * first["lm_loss"]
    assert last["ddpm_loss"] < 0.7 * first["ddpm_loss"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)


def test_loss_is_lm_plus_lambda_ddpm(tok, digits):
    cfg = tiny_config(tok.vocab_size)
    cfg.train.diffusion_weight = 0.25
    tr = digit_trainer(cfg, tok, digits)
    b = tr.batches.batch(0)
    lm, ddpm = loss_terms(tr.model, b, tr.diff_sched)
    m = tr.train_step(b)
    assert m["lm_loss"] == pytest.approx(lm.item(), rel=1e-6)
    assert m["loss"] == pytest.approx(lm.item() + 0.25 * ddpm.item(), rel=1e-6)


def test_resume_follows_the_same_loss_curve(tok, digits, tmp_path):
    cfg = tiny_config(tok.vocab_size, steps=6)
    cfg.train.ema_decay = 0.9
    ref = digit_trainer(cfg, tok, digits)
    straight = ref.fit(progress=False)

    first = digit_trainer(cfg, tok, digits, metrics=tmp_path / "m.jsonl")
    h1 = first.fit(steps=3, checkpoint_dir=tmp_path / "ckpt", progress=False)
    second = digit_trainer(cfg, tok, digits)
    torch.manual_seed(1234)  # a different process state: everything must come from the checkpoint
    second.resume(tmp_path / "ckpt")
    assert second.step == 3 and second.batches.step == 3
    h2 = second.fit(progress=False)
    resumed = [h["loss"] for h in h1 + h2]
    assert resumed == [h["loss"] for h in straight]  # bit-identical on the CPU
    for k, v in ref.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v), k
    for k, v in ref.ema.items():
        assert torch.equal(second.ema[k], v), k
    lines = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3] and {"lm_loss", "ddpm_loss", "lr"} <= set(lines[0])


def test_checkpoint_round_trip(tok, digits, tmp_path):
    cfg = tiny_config(tok.vocab_size, steps=2, image_encoder="unet")
    cfg.train.ema_decay = 0.5
    tr = digit_trainer(cfg, tok, digits)
    tr.fit(progress=False)
    path = tr.save(tmp_path / "ck")
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "config.json",
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "tokenizer.model",
        "trainer_state.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name != "ck"]  # no temp dirs left behind
    raw, cfg2, tok2 = load_checkpoint(path, use_ema=False)
    ema, _, _ = load_checkpoint(path)
    assert cfg2.to_dict() == cfg.to_dict()
    assert tok2.encode("seven") == tok.encode("seven") and tok2.vocab_size == tok.vocab_size
    for k, v in tr.model.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v)
        assert torch.equal(ema.state_dict()[k], tr.ema[k].to(v.dtype))
    b = tr.batches.batch(0)
    tr.model.eval()
    with torch.no_grad():
        a = tr.model(b.input_ids, b.positions, b.image_index, b.mask(), b.images, b.timesteps)
        c = raw(b.input_ids, b.positions, b.image_index, b.mask(), b.images, b.timesteps)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    # overwriting an existing checkpoint keeps it complete
    tr.save(path)
    assert sorted(p.name for p in path.iterdir()) == names
    # a model-only checkpoint (no trainer state) loads too
    save_checkpoint(tmp_path / "plain", model=tr.model, config=cfg, tokenizer=tok)
    m3, _, _ = load_checkpoint(tmp_path / "plain")
    assert torch.equal(m3.state_dict()["tok_emb.weight"], tr.model.state_dict()["tok_emb.weight"])
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing")


def test_lr_schedule_warmup_then_cosine():
    from transfusion.train import lr_lambda

    f = lr_lambda(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
