"""Sampling: token and patch structure of generated sequences, guidance, samplers, captions."""

import pytest
import torch

from transfusion.model import TransfusionModel
from transfusion.objective import sampling_steps
from transfusion.sample import SampleConfig, caption, generate

from conftest import tiny_model_config


@pytest.fixture()
def model(tok):
    m = TransfusionModel(tiny_model_config(tok.vocab_size), backend="reference").eval()
    with torch.no_grad():
        m.image.proj_out.weight.normal_(std=0.02)
    return m


def test_sampling_steps_ddpm_trailing_spacing():
    cfg = tiny_model_config(256)
    assert sampling_steps(cfg, 4) == [(999, 999, 749), (749, 749, 499), (499, 499, 249), (249, 249, -1)]
    steps = sampling_steps(cfg, 1000)
    assert steps[0] == (999, 999, 998) and steps[-1] == (0, 0, -1) and len(steps) == 1000
    with pytest.raises(ValueError):
        sampling_steps(tiny_model_config(256, num_train_timesteps=10), 11)


@pytest.mark.parametrize("sampler,cfg_scale", [("ddim", 3.0), ("ddpm", 1.0)])
def test_generate_structure(tok, model, sampler, cfg_scale):
    """Prompt + BOI: one image of the requested size per sequence, EOI right after it, then text
    up to EOS or the token limit; prompts of different lengths in one batch."""
    scfg = SampleConfig(
        steps=3, sampler=sampler, cfg_scale=cfg_scale, image_size=(4, 6), max_new_tokens=5, temperature=1.0, seed=0
    )
    prompts = ["a handwritten seven", "two", "the digit 3, written by hand"]
    res = generate(model, tok, prompts, scfg, open_image=True)
    assert len(res) == 3
    for r in res:
        assert r["segments"][0][0] == "image"
        assert len(r["images"]) == 1 and r["images"][0].shape == (1, 4, 6)
        assert torch.isfinite(r["images"][0]).all()
        toks = r["tokens"]
        assert toks[0] == tok.eoi_id  # EOI is appended after the image
        text_toks = toks[1:]
        assert 1 <= len(text_toks) <= 5
        assert tok.boi_id not in text_toks  # max_images=1: no second image
        assert tok.pad_id not in text_toks and tok.bos_id not in text_toks and tok.eoi_id not in text_toks
        if tok.eos_id in text_toks:
            assert text_toks.index(tok.eos_id) == len(text_toks) - 1
    # seeded: the same call gives the same images
    res2 = generate(model, tok, prompts, scfg, open_image=True)
    for a, b in zip(res, res2):
        assert torch.equal(a["images"][0], b["images"][0]) and a["tokens"] == b["tokens"]


def test_model_chooses_to_open_images(tok, model):
    """Free LM mode: a sampled BOI switches the sampler to diffusion; EOI follows the image; once
    max_images is reached BOI is masked and text continues."""

    class FavourBOI(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, h):
            out = self.head(h)
            out[..., tok.boi_id] += 100.0
            return out

    model.lm_head = FavourBOI(model.lm_head)
    scfg = SampleConfig(steps=2, cfg_scale=1.0, image_size=(2, 2), max_new_tokens=6, max_images=2)
    r = generate(model, tok, ["one"], scfg)[0]
    assert [k for k, _ in r["segments"]][:2] == ["image", "image"]
    assert r["tokens"][:4] == [tok.boi_id, tok.eoi_id, tok.boi_id, tok.eoi_id]
    rest = r["tokens"][4:]
    assert tok.boi_id not in rest and len(rest) <= 4  # 6 sampled tokens in all (EOIs are appended)
    assert len(rest) == 4 or rest[-1] == tok.eos_id


def test_captioning_structure(tok, model):
    imgs = torch.randn(3, 1, 4, 4)
    caps = caption(model, tok, imgs, SampleConfig(max_new_tokens=4))
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    res = generate(model, tok, [[x] for x in imgs], SampleConfig(max_new_tokens=4, max_images=0, cfg_scale=1.0))
    assert [r["text"] for r in res] == caps
    for r in res:
        assert not r["images"] and tok.boi_id not in r["tokens"]


def test_image_prompt_then_text_then_image(tok, model):
    """Prompts mixing images and text; generation of a further image conditions on both."""
    scfg = SampleConfig(steps=2, cfg_scale=2.0, image_size=(4, 4), max_new_tokens=3)
    prompt = [torch.randn(1, 4, 4), "is a handwritten", torch.randn(1, 2, 4), "and this"]
    res = generate(model, tok, [prompt, "seven"], scfg, open_image=True)
    assert all(len(r["images"]) == 1 for r in res)


def test_sample_config_validation():
    with pytest.raises(ValueError, match="sampler"):
        SampleConfig(sampler="heun")
    with pytest.raises(ValueError, match="steps"):
        SampleConfig(steps=0)


def test_sampler_must_fit_the_objective(tok, model):
    with pytest.raises(ValueError, match="objective 'ddpm'.*'ddim' or 'ddpm'"):
        generate(model, tok, ["two"], SampleConfig(sampler="euler", steps=2), open_image=True)
    assert caption(model, tok, torch.zeros(1, 1, 4, 4), SampleConfig(sampler="euler", max_new_tokens=2)) is not None
