"""A small Transfusion model (Zhou et al., 2024) on the transfusion_kernels ops.

One transformer, next-token loss on text and DDPM loss on image latents; causal attention with
bidirectional attention inside each image (``tk.hybrid_attention``); KV-cached sampling that
switches between LM mode and diffusion mode. See ``transfusion --help``.

Names are imported lazily, so ``transfusion.cli`` can set OpenMP's environment before torch loads.
"""
import importlib

_EXPORTS = {
    "Config": "transfusion.config", "DataConfig": "transfusion.config", "ModelConfig": "transfusion.config",
    "TrainConfig": "transfusion.config", "KVCache": "transfusion.model", "TransfusionModel": "transfusion.model",
    "Tokenizer": "transfusion.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'transfusion' has no attribute {name!r}")
