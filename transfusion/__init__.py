"""A small Transfusion model (Zhou et al., 2024) on the transfusion_kernels ops.

One transformer, next-token loss on text and DDPM loss on image latents; causal attention with
bidirectional attention inside each image (``tk.hybrid_attention``); KV-cached sampling that
switches between LM mode and diffusion mode. See ``transfusion --help``.

Names are imported lazily, so ``transfusion.cli`` can set OpenMP's environment before torch loads.
"""

import importlib
import importlib.util

# The model and its CLI need the [model] extra (the kernels alone need torch only): say so in one
# line. find_spec imports nothing, so OpenMP's environment can still be set before torch loads.
_MODEL_EXTRA = {
    "diffusers": "diffusers",
    "sentencepiece": "sentencepiece",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
}
_missing = [dist for module, dist in _MODEL_EXTRA.items() if importlib.util.find_spec(module) is None]
if _missing:
    raise ImportError(f"the transfusion model needs {', '.join(_missing)}: pip install 'transfusion-kernels[model]'")

_EXPORTS = {
    "Config": "transfusion.config",
    "DataConfig": "transfusion.config",
    "ModelConfig": "transfusion.config",
    "TrainConfig": "transfusion.config",
    "KVCache": "transfusion.model",
    "TransfusionModel": "transfusion.model",
    "Tokenizer": "transfusion.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'transfusion' has no attribute {name!r}")
