"""Image <-> latent maps: pixel space (identity) or a diffusers ``AutoencoderKL``.

Images are float tensors ``[B, C, H, W]`` in [-1, 1]. ``encode`` returns the latents the model
diffuses (for a VAE: the posterior mean times the scaling factor), ``decode`` inverts it.
"""

from __future__ import annotations

from pathlib import Path

import torch


class PixelLatents:
    kind = "pixel"

    def __init__(self, channels: int = 1):
        self.channels = channels
        self.downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class VAELatents:
    """A diffusers ``AutoencoderKL``: weights from a local folder (``from_pretrained``, no
    download) or a module passed in."""

    kind = "vae"

    def __init__(self, vae, scaling_factor: float | None = None, sample_posterior: bool = False):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scaling_factor = float(
            scaling_factor if scaling_factor is not None else getattr(cfg, "scaling_factor", 1.0)
        )
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.in_channels = int(cfg.in_channels)
        self.sample_posterior = sample_posterior

    @classmethod
    def from_folder(cls, folder, device="cpu", **kw) -> "VAELatents":
        from diffusers import AutoencoderKL

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: expected a diffusers AutoencoderKL folder (config.json + weights)")
        return cls(AutoencoderKL.from_pretrained(str(folder), local_files_only=True).to(device), **kw)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.shape[1] != self.in_channels:
            raise ValueError(f"the VAE takes {self.in_channels}-channel images, got shape {tuple(images.shape)}")
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if self.sample_posterior else dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    def save(self, folder) -> None:
        self.vae.save_pretrained(str(folder), safe_serialization=True)


def make_latents(spec: str, channels: int = 1, device="cpu", checkpoint_dir=None):
    """``"pixel"`` or the path of an AutoencoderKL folder; a checkpoint's own ``vae/`` copy wins."""
    if spec == "pixel":
        return PixelLatents(channels)
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "vae" / "config.json").is_file():
        return VAELatents.from_folder(Path(checkpoint_dir) / "vae", device)
    return VAELatents.from_folder(spec, device)
