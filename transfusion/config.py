"""Configuration dataclasses: model, data and training. All JSON-serialisable."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class UserError(Exception):
    """A mistake the user can fix (a bad path, value or file). The command line prints its
    message as one line and exits with status 2; the message says what is wrong and what to do."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _has_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a field annotation (``int``, ``float | None``, ``tuple[int, int]``, ...);
    an int is a float, a bool is neither."""
    for t in (a.strip() for a in annotation.split("|")):
        if t == "None" and value is None:
            return True
        if t == "bool" and isinstance(value, bool):
            return True
        if t == "str" and isinstance(value, str):
            return True
        if t in ("int", "float") and isinstance(value, (int, float)) and not isinstance(value, bool):
            if t == "float" or isinstance(value, int):
                return True
        if t.startswith("tuple[") and isinstance(value, (list, tuple)):
            items = [a.strip() for a in t[len("tuple[") : -1].split(",")]
            if len(value) == len(items) and all(_has_type(v, a) for v, a in zip(value, items)):
                return True
    return False


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    ffn_hidden: int | None = None  # None: SwiGLU default 8/3 * dim rounded up to a multiple of 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # image side
    latent_channels: int = 1
    patch_size: int = 2
    image_encoder: str = "linear"  # "linear" (k x k patches through a linear layer) or "unet"
    unet_channels: tuple[int, int] = (32, 64)  # channels of the two U-Net levels
    timestep_freq_dim: int = 128
    # diffusion (the schedule the model is trained on)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # "ddpm": the paper's DDPM loss (the head predicts prediction_type); "flow": rectified flow,
    # the head predicts the velocity noise - x0 (prediction_type unused), sampled with Euler steps
    objective: str = "ddpm"
    prediction_type: str = "epsilon"  # the paper's; also "v_prediction" or "sample"
    # "bidirectional": every image attends to all of its own patches (the paper's mask);
    # "causal": no image spans, patches see only earlier patches (the ablation baseline)
    image_attention: str = "bidirectional"
    # "continuous": images as latent patches under the diffusion loss (Transfusion); "discrete":
    # images as the codes of a k-means codebook over patch_size x patch_size latent patches, ids
    # appended after the text vocabulary (vocab_size counts them), LM loss only (Chameleon-style)
    image_recipe: str = "continuous"
    image_codes: int = 0  # codebook size; discrete only
    codebook_seed: int = 0  # seed of the codebook's k-means; discrete only

    def __post_init__(self) -> None:
        self.unet_channels = tuple(self.unet_channels)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        _check(self.dim % self.n_heads == 0, f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        _check((self.dim // self.n_heads) % 2 == 0, "head dim (dim / n_heads) must be even for rotary embeddings")
        _check(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
        )
        _check(
            self.image_encoder in ("linear", "unet"),
            f"image_encoder must be 'linear' or 'unet', got {self.image_encoder!r}",
        )
        _check(self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}")
        if self.image_encoder == "unet":
            _check(len(self.unet_channels) == 2, f"unet_channels needs two entries, got {self.unet_channels}")
        _check(self.timestep_freq_dim % 2 == 0, "timestep_freq_dim must be even")
        _check(
            self.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"),
            f"unknown beta_schedule {self.beta_schedule!r}",
        )
        _check(self.objective in ("ddpm", "flow"), f"objective must be 'ddpm' or 'flow', got {self.objective!r}")
        _check(
            self.image_attention in ("bidirectional", "causal"),
            f"image_attention must be 'bidirectional' or 'causal', got {self.image_attention!r}",
        )
        _check(
            self.prediction_type in ("epsilon", "v_prediction", "sample"),
            f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {self.prediction_type!r}",
        )
        _check(
            self.image_recipe in ("continuous", "discrete"),
            f"image_recipe must be 'continuous' or 'discrete', got {self.image_recipe!r}",
        )
        if self.image_recipe == "discrete":
            _check(self.image_codes >= 2, f"the discrete image recipe needs image_codes >= 2, got {self.image_codes}")
            _check(
                self.vocab_size > self.image_codes,
                f"vocab_size ({self.vocab_size}) must count the text vocabulary and the {self.image_codes} image codes",
            )
            _check(
                self.image_encoder == "linear",
                "image_encoder 'unet' belongs to the continuous image recipe; the discrete one has no encoder",
            )
        else:
            _check(self.image_codes == 0, f"image_codes ({self.image_codes}) is for the discrete image recipe only")

    @property
    def discrete_images(self) -> bool:
        return self.image_recipe == "discrete"

    @property
    def text_vocab_size(self) -> int:
        """Ids below this are text (and special) tokens; a discrete model's image codes follow."""
        return self.vocab_size - self.image_codes

    @property
    def bidirectional_images(self) -> bool:
        return self.image_attention == "bidirectional"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2


@dataclass
class DataConfig:
    image_size: int = 8  # digits are 8x8; 16 upsamples them (bilinear)
    holdout_fraction: float = 0.2  # digits held out from training (for captioning evaluation)
    text_fraction: float = 0.25  # documents that are text only
    image_first_fraction: float = 0.2  # image-caption pairs with the image first (the paper: 20%)
    image_first_max_timestep: int = 500  # noise cap for image-first pairs (the paper: t <= 500)
    caption_dropout: float = 0.1  # caption-first pairs with the caption dropped (classifier-free guidance)
    docs_per_batch: int = 64
    latents: str = "pixel"  # "pixel" or a local folder with a diffusers AutoencoderKL
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("holdout_fraction", "text_fraction", "image_first_fraction", "caption_dropout"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"{name} must be in [0, 1], got {v}")
        _check(self.docs_per_batch >= 1, f"docs_per_batch must be >= 1, got {self.docs_per_batch}")
        _check(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    diffusion_weight: float = 1.0  # lambda in L = L_LM + lambda * L_DDPM
    ema_decay: float | None = None  # None: no EMA
    bf16: bool | None = None  # None: bf16 autocast on CUDA, fp32 elsewhere
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    backend: str | None = None  # kernel backend (None: tk default)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _check(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(
            self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
            f"ema_decay must be None or in (0, 1), got {self.ema_decay}",
        )


@dataclass
class SampleDefaults:
    """How ``sample`` denoises when the command line does not say (``--sampler``, ``--steps``);
    saved in the checkpoint with the rest of the Config."""

    sampler: str | None = None  # None: the objective's own (ddim; euler for a flow model)
    steps: int = 50

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"sample.steps must be >= 1, got {self.steps}")


# Fields added after checkpoints existed: a checkpoint without them has their defaults.
ADDED_LATER = {"ModelConfig": {"image_recipe", "image_codes", "codebook_seed"}}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleDefaults = field(default_factory=SampleDefaults)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> "Config":
        """``strict`` (checkpoints): every field of a present section must be present, and every
        section but ``sample`` (absent from older checkpoints: the defaults); otherwise missing
        fields take their defaults. Unknown sections and fields always raise."""
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "sample": SampleDefaults}
        section_of = {kind: name for name, kind in sections.items()}
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)} (expected {sorted(sections)})")

        def build(kind, sub):
            if not isinstance(sub, dict):
                raise ValueError(f"config section must be a JSON object, got {sub!r}")
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(sub) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            missing = names - set(sub) - ADDED_LATER.get(kind.__name__, set())
            if strict and missing and (sub or kind is not SampleDefaults):
                raise ValueError(f"{kind.__name__} fields missing: {sorted(missing)}")
            for f in dataclasses.fields(kind):
                if f.name in sub and not _has_type(sub[f.name], f.type):
                    raise ValueError(f"{section_of[kind]}.{f.name} must be {f.type}, got {sub[f.name]!r}")
            return kind(**sub)

        return cls(**{name: build(kind, d.get(name, {})) for name, kind in sections.items()})

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))


def paper_config(vocab_size: int) -> Config:
    """What the paper (Zhou et al., 2024) states and this config can express; the rest keeps the
    defaults. Its scale (7B parameters, 250k steps of 2M tokens, 4000 warmup steps, 256x256
    images) is not set here."""
    return Config(
        model=ModelConfig(
            vocab_size=vocab_size,
            image_encoder="unet",
            patch_size=2,  # section 4.4: U-Net down/up blocks, 2x2 latent patches
            num_train_timesteps=1000,  # section 4.1: T = 1000 training timesteps
            beta_schedule="squaredcos_cap_v2",  # section 2.2: the cosine schedule (Nichol & Dhariwal)
            prediction_type="epsilon",  # section 2.2: L_DDPM regresses the added noise
            image_attention="bidirectional",
        ),  # section 3: bidirectional within each image
        data=DataConfig(
            image_first_fraction=0.2,  # section 4.3: 80% caption first, 20% image first
            image_first_max_timestep=500,
        ),  # section 4.3 (Table 11): t <= 500 for image-first pairs
        train=TrainConfig(
            diffusion_weight=5.0,  # section 4.1: lambda = 5 in L_LM + lambda * L_DDPM
            lr=3e-4,
            min_lr_ratio=0.05,  # section 4.1: 3e-4, cosine decay to 1.5e-5
            betas=(0.9, 0.95),
            weight_decay=0.1,
            grad_clip=1.0,
        ),  # section 4.1: AdamW, clip norm 1
        sample=SampleDefaults(sampler="ddpm", steps=250),  # section 4.1: 250 DDPM steps at inference
    )


def demo_config(vocab_size: int, steps: int | None = None, backend: str | None = None) -> Config:
    return Config(
        # 4x4 patches: an 8x8 digit is 4 tokens; v-prediction (not the paper's epsilon) learns
        # the caption conditioning in far fewer steps (measured: see README)
        model=ModelConfig(
            vocab_size=vocab_size,
            dim=128,
            n_layers=4,
            n_heads=4,
            patch_size=4,
            image_encoder="linear",
            timestep_freq_dim=128,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
        ),
        data=DataConfig(
            image_size=8, docs_per_batch=64, text_fraction=0.1, image_first_fraction=0.4, caption_dropout=0.1, seed=0
        ),
        train=TrainConfig(
            steps=steps if steps is not None else 1000,
            lr=2e-3,
            warmup_steps=30,
            min_lr_ratio=0.05,
            ema_decay=None,
            seed=0,
            log_every=10,
            backend=backend,
        ),
    )
