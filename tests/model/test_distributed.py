"""Data-parallel training: 2 ranks over gloo on loopback follow the single-process loss curve.

Tolerance: the ranks compute the same math as one process on different tensor shapes (half the
documents each), so float reductions run in another order; the per-step losses agree to a
relative 1e-5 (fp32 on the CPU, a few steps of AdamW).
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from transfusion.checkpoint import load_checkpoint
from transfusion.data import MixedBatches, load_digits_split, text_corpus
from transfusion.distributed import doc_range, shard_batch
from transfusion.model import TransfusionModel
from transfusion.tokenizer import Tokenizer
from transfusion.train import Trainer, loss_terms

from conftest import tiny_config

STEPS = 4
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(tok, cfg_steps=STEPS):
    digits = load_digits_split(0.2, 0, 8)
    cfg = tiny_config(tok.vocab_size, steps=cfg_steps)
    cfg.train.backend = "reference"
    cfg.train.ema_decay = 0.9
    torch.manual_seed(cfg.train.seed)
    model = TransfusionModel(cfg.model, backend="reference")
    batches = MixedBatches(
        digits.train_images[:64], digits.train_labels[:64], text_corpus(0, 100), tok, cfg.data, cfg.model.patch_size
    )
    return cfg, model, batches


def _worker(rank, world, port, root, strategy):
    import torch.distributed as dist

    from transfusion.distributed import DistributedTrainer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tok = Tokenizer.load(os.path.join(root, "tokenizer.model"))
        cfg, model, batches = _setup(tok)
        tr = DistributedTrainer(model, cfg, tok, batches, strategy=strategy)
        hist = tr.fit(checkpoint_dir=os.path.join(root, f"ckpt-{strategy}"), progress=False)
        if rank == 0:
            with open(os.path.join(root, f"hist-{strategy}.json"), "w") as f:
                json.dump(hist, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tok):
    torch.set_num_threads(1)
    cfg, model, batches = _setup(tok)
    tr = Trainer(model, cfg, tok, batches)
    hist = tr.fit(progress=False)
    return tr, hist


def _fsdp_available():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.parametrize(
    "strategy",
    [
        "ddp",
        pytest.param("fsdp", marks=pytest.mark.skipif(not _fsdp_available(), reason="torch without FSDP2 fully_shard")),
    ],
)
def test_two_ranks_match_one_process(tok, single, tmp_path, strategy):
    tok.save(tmp_path / "tokenizer.model")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), strategy), nprocs=2, join=True)
    hist = json.loads((tmp_path / f"hist-{strategy}.json").read_text())
    ref_tr, ref = single
    assert [h["step"] for h in hist] == [h["step"] for h in ref] == list(range(1, STEPS + 1))
    for key in ("loss", "lm_loss", "ddpm_loss", "grad_norm"):
        got, want = [h[key] for h in hist], [h[key] for h in ref]
        assert got == pytest.approx(want, rel=RTOL), key
    # the 2-rank checkpoint is an ordinary one: it loads in one process, with the weights and EMA
    # the single process reached. AdamW divides each gradient element by its own running RMS, so
    # an element whose gradient is at rounding level can move by a visible fraction of lr: weights
    # are held to 1e-5 absolute (lr is 3e-3, so 4 steps move a weight by up to 1.2e-2).
    raw, cfg, _ = load_checkpoint(tmp_path / f"ckpt-{strategy}", use_ema=False)
    ema, _, _ = load_checkpoint(tmp_path / f"ckpt-{strategy}")
    assert cfg.to_dict() == ref_tr.config.to_dict()
    for k, v in ref_tr.model.state_dict().items():
        torch.testing.assert_close(raw.state_dict()[k], v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ema.state_dict()[k], ref_tr.ema[k], rtol=1e-4, atol=1e-5)
    # and a single process resumes from it
    cfg2, model2, batches2 = _setup(tok, cfg_steps=STEPS + 1)
    tr2 = Trainer(model2, cfg2, tok, batches2)
    tr2.resume(tmp_path / f"ckpt-{strategy}")
    assert tr2.step == STEPS and tr2.batches.step == STEPS
    assert len(tr2.opt.state) == len(ref_tr.opt.state)
    for (_, a), (_, b) in zip(
        sorted(tr2.opt.state_dict()["state"].items()), sorted(ref_tr.opt.state_dict()["state"].items())
    ):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_shards_cover_the_global_batch(tok, world):
    """The per-rank shards hold exactly the global batch's documents, labels and images, and the
    shard-weighted losses sum to the single-process loss (the identity the ranks rely on)."""
    cfg, model, batches = _setup(tok)
    model.eval()
    sched = model.schedule()
    for step in range(3):
        g = batches.batch(step)
        lm_ref, _ = loss_terms(model, g, sched)
        n_labels = int((g.labels != -100).sum())
        docs, labels, images, lm_sum = 0, 0, [], 0.0
        for r in range(world):
            a, b = doc_range(len(g.cu_seqlens) - 1, r, world)
            local, imgs, real = shard_batch(g, a, b)
            assert real == len(imgs)
            docs += len(local.cu_seqlens) - 1
            labels += int((local.labels != -100).sum())
            images += imgs
            for i, j in enumerate(imgs):
                s, e = local.image_spans[i].tolist()
                assert (local.image_index[s:e] == i).all() and torch.equal(local.images[i], g.images[j])
            with torch.no_grad():
                lm_r, _ = loss_terms(model, local, sched)
            lm_sum += lm_r.item() * int((local.labels != -100).sum())
        assert docs == len(g.cu_seqlens) - 1 and labels == n_labels
        assert images == list(range(len(g.images)))
        assert lm_sum / n_labels == pytest.approx(lm_ref.item(), rel=1e-5)


def test_shard_pads_an_image_free_rank(tok):
    cfg, model, batches = _setup(tok)
    g = batches.batch(0)
    text_doc = next(
        d for d in range(len(g.cu_seqlens) - 1) if not (g.image_index[g.cu_seqlens[d] : g.cu_seqlens[d + 1]] >= 0).any()
    )
    local, imgs, real = shard_batch(g, text_doc, text_doc + 1, pad_image=True)
    assert real == 0 and len(imgs) >= 1 and len(local.cu_seqlens) == 3
    # the padding document adds no text target
    n0 = int(local.cu_seqlens[1])
    assert (local.labels[n0:] == -100).all()
    assert torch.equal(local.labels[:n0], g.labels[g.cu_seqlens[text_doc] : g.cu_seqlens[text_doc + 1]])


def test_more_ranks_than_documents_is_an_error():
    with pytest.raises(ValueError, match="docs_per_batch"):
        doc_range(3, 0, 4)
