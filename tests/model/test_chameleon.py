"""The Chameleon-style discrete image recipe: its tokenizer (k-means codebook), the FLOP count
against a hand count, training, guided sampling against an uncached forward, captioning,
checkpoints, the command line's recipe options and ``transfusion ablate --group chameleon
--quick``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transfusion import ablate, chameleon
from transfusion.codebook import ceiling, decode_codes, encode_codes, fit_codebook
from transfusion.data import Image, MixedBatches, load_digits_split, pack_documents, text_corpus
from transfusion.flops import batch_counts, training_flops
from transfusion.image import patchify
from transfusion.model import TransfusionModel

from conftest import tiny_config


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(0.2, 0, 8)


@pytest.fixture(scope="module")
def book(digits):
    return fit_codebook(digits.train_images, 16, 2, seed=0)


# -- tokenizer ---------------------------------------------------------------------------------


def test_codebook_is_seeded_and_codes_are_nearest_centroids(digits, book):
    assert book.shape == (16, 4)
    assert torch.equal(fit_codebook(digits.train_images, 16, 2, seed=0), book)  # same seed, same codebook
    assert not torch.equal(fit_codebook(digits.train_images, 16, 2, seed=1), book)
    x = torch.rand(5, 1, 8, 8) * 2 - 1  # fresh images
    codes = encode_codes(book, x, 2)
    rows = patchify(x, 2).numpy().astype(np.float64)
    want = ((rows[:, None, :] - book.numpy()[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    assert codes.shape == (5, 16) and np.array_equal(codes.reshape(-1).numpy(), want)
    # an image made of centroids decodes to itself
    img = decode_codes(book, codes, (1, 8, 8), 2)
    assert torch.equal(encode_codes(book, img, 2), codes)
    assert torch.equal(patchify(img, 2), book[codes.reshape(-1)])


def test_ceiling_reports_reconstruction_and_classifier(digits, book):
    c = ceiling(book, 2, digits.train_images, digits.train_labels, digits.test_images, digits.test_labels)
    assert (c["codebook_size"], c["patch_size"], c["patch_grid"], c["n_heldout"]) == (16, 2, [4, 4], 360)
    rec = decode_codes(book, encode_codes(book, digits.test_images, 2), (1, 8, 8), 2)
    assert c["reconstruction_mse"] == pytest.approx(float(((rec - digits.test_images) ** 2).mean()))
    assert 0.1 < c["svc_accuracy_on_reconstructions"] <= c["svc_accuracy_on_originals"] + 0.02


# -- FLOPs -------------------------------------------------------------------------------------

# dim 8, 2 heads of 4 (1 KV head), 2 layers, SwiGLU width 16, timestep frequencies 4, patch 2
TINY = dict(dim=8, n_heads=2, n_kv_heads=1, n_layers=2, ffn_hidden=16, timestep_freq_dim=4, patch_size=2)
# per layer: Q 8*8 + K 8*4 + V 8*4 + O 8*8 = 192, SwiGLU 3*8*16 = 384; two layers
P_LAYERS = 2 * (192 + 384)


def _docs(tok, image):
    return [[[5, 6, 7], image], [[8, 9]]]


def test_flops_match_a_hand_count_for_both_recipes(tok):
    V = tok.vocab_size
    cfg = tiny_config(V, **TINY).model
    batch = pack_documents(_docs(tok, Image(torch.zeros(1, 4, 4))), tok, 2)
    # doc 1: BOS 5 6 7 BOI p p p p EOI EOS (11 tokens), doc 2: BOS 8 9 EOS (4)
    # targets: BOS->5, 5->6, 6->7, 7->BOI, EOI->EOS; BOS->8, 8->9, 9->EOS (8)
    # pairs: 11*12/2 + 4*5/2 causal, plus 4*3/2 inside the bidirectional image
    want = {"tokens": 15, "logits": 8, "image_tokens": 4, "images": 1, "attention_pairs": 66 + 10 + 6}
    assert batch_counts(batch, True) == want
    assert batch_counts(batch, False)["attention_pairs"] == 76
    dense = batch.mask(True).to_dense()
    assert int(dense.sum()) == want["attention_pairs"]  # the kernels' mask allows exactly these
    hand = 6 * (P_LAYERS * 15 + 8 * V * 8 + 2 * 4 * 8 * 4 + (4 * 8 + 8 * 8) * 1) + 12 * 2 * 8 * 82
    assert training_flops(cfg, want) == hand

    codes = 16
    dcfg = tiny_config(V + codes, **TINY, image_recipe="discrete", image_codes=codes).model
    image = [tok.boi_id, V, V + 1, V + 2, V + 3, tok.eoi_id]
    dbatch = pack_documents(_docs(tok, image), tok, 2)
    # the same documents, the image as 4 codes: every next token is a target (10 + 3), no image spans
    dwant = {"tokens": 15, "logits": 13, "image_tokens": 0, "images": 0, "attention_pairs": 66 + 10}
    assert batch_counts(dbatch, True) == dwant
    assert training_flops(dcfg, dwant) == 6 * (P_LAYERS * 15 + 8 * (V + codes) * 13) + 12 * 2 * 8 * 76
    assert training_flops(tiny_config(V, **TINY, image_encoder="unet").model, want) is None


# -- the discrete model ------------------------------------------------------------------------


def _discrete(tok, digits, book, steps=4):
    from transfusion.train import Trainer

    cfg = tiny_config(tok.vocab_size + 16, steps=steps, image_recipe="discrete", image_codes=16)
    cfg.train.warmup_steps = 1
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, backend="reference")
    model.codebook.copy_(book)
    imgs, labels = digits.train_images[:64], digits.train_labels[:64]
    batches = MixedBatches(imgs, labels, text_corpus(0, 100), tok, cfg.data, 2, image_tokens=model.image_tokens(imgs))
    return Trainer(model, cfg, tok, batches)


def test_discrete_batches_are_tokens_trained_with_the_lm_loss(tok, digits, book):
    tr = _discrete(tok, digits, book)
    m = tr.model
    assert not hasattr(m, "image") and not hasattr(m, "t_mlp")  # no diffusion side
    b = tr.batches.batch(0)
    assert not b.images and int((b.image_index >= 0).sum()) == 0
    ids = b.input_ids
    is_code = ids >= m.cfg.text_vocab_size
    assert int(is_code.sum()) == 16 * int((ids == tok.boi_id).sum())  # 16 codes per image
    assert (b.labels >= m.cfg.text_vocab_size).any()  # codes are next-token targets
    hist = tr.fit(progress=False)
    assert all(h["ddpm_loss"] == 0.0 and np.isfinite(h["lm_loss"]) for h in hist)
    assert hist[0]["flops"] == training_flops(m.cfg, batch_counts(b, True))


def test_guided_codes_follow_an_uncached_forward(tok, digits, book):
    """Greedy codes under guidance: each is the argmax of u + s (c - u) over the code logits of
    full forwards of the conditional and the unconditional ([BOS] [BOI]) contexts."""
    from transfusion.sample import SampleConfig, generate

    model = _discrete(tok, digits, book).model.eval()
    for p in model.parameters():  # a random model whose guidance matters
        torch.nn.init.normal_(p, std=0.3)
    s, base = 3.0, model.cfg.text_vocab_size
    prompt = "a handwritten seven"
    scfg = SampleConfig(cfg_scale=s, image_temperature=0.0, max_new_tokens=0, image_size=(8, 8))
    r = generate(model, tok, [prompt], scfg, open_image=True)[0]
    codes = r["tokens"][:-1]
    assert len(codes) == 16 and r["tokens"][-1] == tok.eoi_id and all(c >= base for c in codes)

    def last_logits(ids):
        import transfusion_kernels as tk

        n = len(ids)
        mask = tk.HybridMask.from_spans(torch.tensor([0, n], dtype=torch.int32), torch.zeros(0, 2, dtype=torch.int32))
        with torch.no_grad():
            logits, _ = model(
                torch.tensor(ids), torch.arange(n), torch.full((n,), -1, dtype=torch.int32), mask, [], None
            )
        return logits[-1].double()

    cond = [tok.bos_id, *tok.encode(prompt), tok.boi_id]
    uncond = [tok.bos_id, tok.boi_id]
    for j in range(3):
        c, u = last_logits(cond + codes[:j]), last_logits(uncond + codes[:j])
        g = u[base:] + s * (c[base:] - u[base:])
        assert int(g.argmax()) + base == codes[j]
    img = r["images"][0]
    assert torch.equal(encode_codes(book, img[None], 2)[0] + base, torch.tensor(codes))


def test_discrete_checkpoint_samples_and_captions_the_same(tok, digits, book, tmp_path):
    from transfusion.checkpoint import load_checkpoint, save_checkpoint
    from transfusion.sample import SampleConfig, caption, generate

    tr = _discrete(tok, digits, book, steps=2)
    tr.fit(progress=False)
    save_checkpoint(tmp_path / "ck", model=tr.model, config=tr.config, tokenizer=tok)
    model, cfg, tok2 = load_checkpoint(tmp_path / "ck", backend="reference")
    assert cfg.model.image_recipe == "discrete" and torch.equal(model.codebook, book)
    scfg = SampleConfig(max_new_tokens=4, seed=3)
    a = generate(tr.model.eval(), tok, ["a handwritten two", "the number 5"], scfg, open_image=True)
    b = generate(model, tok2, ["a handwritten two", "the number 5"], scfg, open_image=True)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert all(torch.equal(x["images"][0], y["images"][0]) for x, y in zip(a, b))
    caps = caption(model, tok2, digits.test_images[:3], SampleConfig(max_new_tokens=5))
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)


# -- command line --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--image-recipe", "discrete", "--objective", "flow"], "--objective sets the continuous image recipe"),
        (["--image-recipe", "discrete", "--diffusion-weight", "2"], "--diffusion-weight sets the continuous"),
        (["--image-recipe", "discrete", "--distributed", "ddp"], "--distributed trains the continuous"),
        (["--codebook-size", "16"], "--codebook-size applies to --image-recipe discrete only"),
    ],
)
def test_wrong_recipe_options_are_one_line_errors(tmp_path, capsys, extra, match):
    from transfusion.cli import main

    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transfusion train: error: ") and match in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_cli_trains_samples_and_captions_a_discrete_model(tmp_path, capsys):
    from transfusion.cli import main

    d, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "--out", str(d), "--vocab-size", "64"]) == 0
    tiny = ["--dim", "16", "--layers", "1", "--heads", "2", "--docs-per-batch", "4", "--threads", "1", "--quiet"]
    argv = ["train", "--data", str(d), "--out", str(run), "--steps", "2", "--warmup-steps", "1", *tiny]
    assert main([*argv, "--image-recipe", "discrete", "--codebook-size", "32"]) == 0
    cfg = json.loads((run / "checkpoint" / "config.json").read_text())
    assert (cfg["model"]["image_recipe"], cfg["model"]["image_codes"]) == ("discrete", 32)
    assert cfg["model"]["vocab_size"] == cfg["tokenizer"]["vocab_size"] + 32
    ck = str(run / "checkpoint")
    common = ["--checkpoint", ck, "--threads", "1", "--quiet"]
    assert (
        main(["sample", *common, "--prompt", "a handwritten one", "--num-images", "2", "--out", str(tmp_path / "s")])
        == 0
    )
    assert main(["caption", *common, str(tmp_path / "s" / "sample_000_0.png")]) == 0
    capsys.readouterr()
    assert main(["sample", *common, "--prompt", "x", "--steps", "5", "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transfusion sample: error: --steps: this checkpoint's images are discrete codes")


# -- the comparison ----------------------------------------------------------------------------


def test_flops_to_reach_interpolates_and_bounds():
    pts = [(1e9, 0.2), (1e10, 0.6), (1e11, 0.8)]
    how, f = chameleon.flops_to_reach(pts, 0.4, higher=True)
    assert how == "=" and f == pytest.approx(10**9.5)
    assert chameleon.flops_to_reach(pts, 0.1, higher=True) == ("<=", 1e9)
    assert chameleon.flops_to_reach(pts, 0.9, higher=True) == (">", 1e11)
    assert chameleon.flops_to_reach([(1e9, 50.0), (1e10, 10.0)], 30.0, higher=False)[1] == pytest.approx(10**9.5)


def test_quick_comparison_writes_flops_ratios_and_verdicts(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    ablate.add_arguments(p)
    out = tmp_path / "ch"
    args = p.parse_args(["--out", str(out), "--group", "chameleon", "--quick", "--jobs", "1", "--quiet"])
    assert ablate.run(args) == 0
    runs = {r["variant"]: r for r in ablate.load_runs(out)}
    assert sorted(runs) == sorted(f"{r}_{b}" for r in ("transfusion", "chameleon") for b in ablate.BUDGET_NAMES)
    for name, r in runs.items():
        t = r["training"]
        assert t["budget"] == pytest.approx(dict(zip(ablate.BUDGET_NAMES, ablate.BUDGETS))[name.split("_")[1]] / 150)
        assert 0.5 < t["flops"] / t["budget"] < 2  # steps sized from the budget
        assert r["config"]["model"]["image_recipe"] == ("discrete" if name.startswith("chameleon") else "continuous")
        assert r["command"] and "commit" in r["commit"] and r["versions"]["torch"] and r["seed"] == 0
        assert r["metrics"]["heldout_text_perplexity"] > 1 and t["corpus_lines"] < 4000
        assert list(r["metrics"]["generation"]) == (["ar"] if name.startswith("chameleon") else ["2", "4"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["chameleon_ratios"]) == {
        "generation_accuracy",
        "fd",
        "caption_accuracy",
        "heldout_text_perplexity",
    }
    assert summary["tokenizer"]["codebook_size"] == 256 and summary["tokenizer"]["patch_grid"] == [4, 4]
    assert len([v for v in summary["verdicts"] if v["group"] == "chameleon"]) == 12
    assert (out / "chameleon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## chameleon" in (out / "summary.md").read_text()


COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "chameleon"


def test_committed_comparison_recomputes_from_the_run_jsons():
    """The committed summary and docs/ablations.md state exactly the verdicts and compute ratios
    the code gives on the committed runs, and the grid is complete (3 budgets x 3 seeds a recipe)."""
    runs = ablate.load_runs(COMMITTED)
    counts = {}
    for r in runs:
        counts[r["variant"]] = counts.get(r["variant"], 0) + 1
        assert r["training"]["flops"] > 0 and r["command"] and r["commit"]["commit"] and r["versions"]
        assert not r["quick"] and r["config"]["train"]["steps"] == r["training"]["steps"]
    assert counts == {f"{r}_{b}": 3 for r in ("transfusion", "chameleon") for b in ablate.BUDGET_NAMES}
    variants = ablate.variant_stats(runs)
    summary = json.loads((COMMITTED / "summary.json").read_text())
    assert summary["variants"] == variants
    rows = ablate.verdicts(variants)
    assert len(rows) == 12
    assert [(r["what"], r["verdict"]) for r in summary["verdicts"]] == [(r["what"], r["verdict"]) for r in rows]
    assert summary["chameleon_ratios"] == chameleon.ratios(variants)
    table = (COMMITTED / "summary.md").read_text()
    docs = (COMMITTED.parents[2] / "docs" / "ablations.md").read_text()
    for line in [ablate.verdict_line(r) for r in rows] + chameleon.ratio_lines(summary):
        assert line in table and line in docs, line
