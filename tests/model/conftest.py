import hashlib

import pytest
import torch

from transfusion.config import Config, DataConfig, ModelConfig, TrainConfig
from transfusion.data import tokenizer_training_text
from transfusion.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok():
    return Tokenizer.train(tokenizer_training_text(0, n=400), vocab_size=96)


def tiny_model_config(vocab_size, **kw):
    base = dict(
        vocab_size=vocab_size,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        patch_size=2,
        timestep_freq_dim=32,
        unet_channels=(8, 16),
    )
    base.update(kw)
    return ModelConfig(**base)


def tiny_config(vocab_size, steps=4, **model_kw):
    return Config(
        model=tiny_model_config(vocab_size, **model_kw),
        data=DataConfig(docs_per_batch=6, text_fraction=0.3),
        train=TrainConfig(steps=steps, lr=3e-3, warmup_steps=2, log_every=1),
    )


def digit_trainer(cfg, tok, digits, metrics=None):
    """A Trainer of a fresh reference-backend model on 64 training digits and 100 text lines."""
    from transfusion.data import MixedBatches, text_corpus
    from transfusion.model import TransfusionModel
    from transfusion.train import Trainer

    torch.manual_seed(cfg.train.seed)
    model = TransfusionModel(cfg.model, backend="reference")
    batches = MixedBatches(
        digits.train_images[:64], digits.train_labels[:64], text_corpus(0, 100), tok, cfg.data, cfg.model.patch_size
    )
    return Trainer(model, cfg, tok, batches, metrics_path=metrics)


class FixedBatches:
    """The same batch every step (overfitting checks)."""

    def __init__(self, b):
        self.b = b

    def __next__(self):
        return self.b

    def state_dict(self):
        return {}


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    # fresh inputs per test, reproducible from the test id
    torch.manual_seed(int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], 16))
    # the models here are tiny: one thread is as fast, and immune to OpenMP spin-waiting on a
    # CPU shared with other test processes (which slowed these tests down 100x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
