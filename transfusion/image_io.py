"""Image files: PNG in and out, and a grid of images, all in the model's [-1, 1] range."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from transfusion.prepare import resize_images


def save_png(img, path, scale: int = 1) -> None:
    """Save an image in [-1, 1] (``[C, H, W]``, C = 1 or 3) as PNG, upscaled by ``scale`` (nearest)."""
    x = ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    arr = x[0] if x.shape[0] == 1 else np.transpose(x[:3], (1, 2, 0))
    Image.fromarray(arr).save(path)


def image_grid(images, ncol: int, pad: int = 1):
    """``[N, C, H, W]`` (same size) -> one ``[C, H', W']`` grid in [-1, 1], padded with -1."""
    n, c, h, w = images.shape
    nrow = (n + ncol - 1) // ncol
    grid = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), -1.0)
    for i, x in enumerate(images):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x
    return grid


def load_png(path, size: int, channels: int):
    im = Image.open(path).convert("L" if channels == 1 else "RGB")
    x = torch.tensor(np.asarray(im), dtype=torch.float32) / 127.5 - 1.0
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    return resize_images(x[None], size)[0]


def border_mean(img: torch.Tensor) -> float:
    """Mean of the outermost pixels of ``[C, H, W]``: the ground a drawn digit stands on."""
    m = torch.ones(img.shape[-2:], dtype=torch.bool)
    m[1:-1, 1:-1] = False
    return float(img[:, m].mean())
