"""A small Transfusion model (Zhou et al., 2024) on the transfusion_kernels ops.

One transformer, next-token loss on text and DDPM loss on image latents; causal attention with
bidirectional attention inside each image (``tk.hybrid_attention``); KV-cached sampling that
switches between LM mode and diffusion mode. See ``transfusion --help``.
"""
from transfusion.config import Config, DataConfig, ModelConfig, TrainConfig
from transfusion.model import KVCache, TransfusionModel
from transfusion.tokenizer import Tokenizer

__all__ = ["Config", "DataConfig", "KVCache", "ModelConfig", "Tokenizer", "TrainConfig", "TransfusionModel"]
