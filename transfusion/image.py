"""The image side of the model: latents <-> transformer vectors.

Two options, as in the paper: ``LinearPatches`` (k x k latent patches through one linear layer
each way) and ``UNetPatches`` (two timestep-conditioned U-Net levels down to the transformer
width, and the mirror up path with skip connections). Both take a list of images (each its own
size), emit patch vectors in sequence order (image by image, rows left to right, top to bottom)
and turn the transformer's outputs at those positions back into per-patch predictions
``[P, C * k * k]`` in the same order.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import transfusion_kernels as tk


def patchify(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[G, C, H, W]`` -> ``[G * (H/k) * (W/k), C * k * k]`` (row-major patches per image)."""
    g, c, h, w = x.shape
    x = x.reshape(g, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(g * (h // k) * (w // k), c * k * k)


def unpatchify(rows: torch.Tensor, g: int, c: int, h: int, w: int, k: int) -> torch.Tensor:
    """Inverse of ``patchify``."""
    x = rows.reshape(g, h // k, w // k, c, k, k).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(g, c, h, w)


def group_by_shape(images):
    """Indices of same-shaped images, in first-seen order: [(shape, [i, ...]), ...]."""
    groups: dict = {}
    for i, x in enumerate(images):
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.items())


class _Codec(nn.Module):
    """Shared bookkeeping: batch same-shaped images together and restore sequence order."""

    def __init__(self, channels: int, k: int):
        super().__init__()
        self.channels, self.k = channels, k

    def _check(self, images):
        for i, x in enumerate(images):
            if x.dim() != 3 or x.shape[0] != self.channels:
                raise ValueError(f"image {i}: expected a [C={self.channels}, H, W] latent, got {tuple(x.shape)}")
            if x.shape[1] % self.k or x.shape[2] % self.k:
                raise ValueError(f"image {i}: size {tuple(x.shape[1:])} is not divisible by patch_size={self.k}")

    def _plan(self, images):
        """Groups and, for each group, where its patch rows go in sequence order."""
        counts = [(x.shape[1] // self.k) * (x.shape[2] // self.k) for x in images]
        offsets = [0]
        for n in counts:
            offsets.append(offsets[-1] + n)
        plan = []
        for shape, idx in group_by_shape(images):
            n = counts[idx[0]]
            rows = torch.cat([torch.arange(offsets[i], offsets[i] + n) for i in idx])
            plan.append((shape, idx, rows))
        return plan, offsets[-1]


class LinearPatches(_Codec):
    def __init__(self, channels: int, k: int, dim: int):
        super().__init__(channels, k)
        self.proj_in = nn.Linear(channels * k * k, dim)
        self.proj_out = nn.Linear(dim, channels * k * k)
        self.proj_out.zero_init = True  # the model's normal init leaves it alone
        self.zero_output()

    def zero_output(self):
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def encode(self, images, timesteps):
        self._check(images)
        plan, total = self._plan(images)
        rows = None
        for shape, idx, where in plan:
            x = torch.stack([images[i] for i in idx]) if len(idx) > 1 else images[idx[0]][None]
            p = patchify(x, self.k)
            if rows is None:
                rows = p.new_empty(total, p.shape[1])
            rows[where.to(p.device)] = p
        return self.proj_in(rows), None

    def decode(self, h, images, timesteps, state):
        return self.proj_out(h)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _down(c: int, s: int) -> nn.Module:
    """Downsampling by an integer factor ``s``: a strided convolution whose odd kernel (2*(s//2)+1,
    3x3 for s=2) is centred on each output cell, so a side divisible by ``s`` shrinks exactly s-fold."""
    return nn.Conv2d(c, c, 2 * (s // 2) + 1, stride=s, padding=s // 2) if s > 1 else nn.Identity()


def down_factors(k: int) -> tuple[int, int]:
    """How the two U-Net levels split the patch size: ``(k // b, b)`` with ``b`` the largest
    divisor of ``k`` not above its square root (1 -> (1, 1), 2 -> (2, 1), 4 -> (2, 2), 8 -> (4, 2),
    3 -> (3, 1), 9 -> (3, 3))."""
    b = max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)
    return k // b, b


class UNetPatches(_Codec):
    """Level 1 at full latent resolution, level 2 after the first downsampling, the transformer's
    grid after the second; the two factors multiply to the patch size k (any k >= 1, see
    ``down_factors``), so k x k latent pixels become one transformer vector."""

    def __init__(self, channels: int, k: int, dim: int, level_channels=(32, 64), freq_dim: int = 128):
        super().__init__(channels, k)
        c1, c2 = level_channels
        self.freq_dim = freq_dim
        emb = 4 * c1
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        s1, s2 = down_factors(k)
        self.conv_in = nn.Conv2d(channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb)
        self.pool1 = _down(c1, s1)
        self.down2 = ResBlock(c1, c2, emb)
        self.pool2 = _down(c2, s2)
        self.to_dim = nn.Conv2d(c2, dim, 1)
        self.from_dim = nn.Conv2d(dim, c2, 1)
        self.up2 = ResBlock(2 * c2, c2, emb)
        self.up1 = ResBlock(c2 + c1, c1, emb)
        self.norm_out = nn.GroupNorm(min(8, c1), c1)
        self.conv_out = nn.Conv2d(c1, channels, 3, padding=1)
        self.zero_output()

    def zero_output(self):
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _emb(self, t):
        return self.t_mlp(tk.timestep_embedding(t, self.freq_dim).to(self.conv_in.weight.dtype))

    def encode(self, images, timesteps):
        self._check(images)
        plan, total = self._plan(images)
        emb = self._emb(timesteps)
        rows, state = None, []
        for shape, idx, where in plan:
            ii = torch.tensor(idx, device=timesteps.device)
            x = torch.stack([images[i] for i in idx])
            e = emb[ii]
            h1 = self.down1(self.conv_in(x), e)
            h2 = self.down2(self.pool1(h1), e)
            z = self.to_dim(self.pool2(h2))  # [G, dim, H/k, W/k]
            tok = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            if rows is None:
                rows = tok.new_empty(total, tok.shape[1])
            rows = rows.index_copy(0, where.to(tok.device), tok)
            state.append((h1, h2, e))
        return rows, (plan, state)

    def decode(self, h, images, timesteps, state):
        plan, saved = state
        out = None
        for (shape, idx, where), (h1, h2, e) in zip(plan, saved):
            g, (_, hh, ww) = len(idx), shape
            k = self.k
            z = h[where.to(h.device)].reshape(g, hh // k, ww // k, -1).permute(0, 3, 1, 2)
            u = self.from_dim(z)
            u = F.interpolate(u, size=h2.shape[-2:], mode="nearest") if u.shape[-2:] != h2.shape[-2:] else u
            u = self.up2(torch.cat([u, h2], 1), e)
            u = F.interpolate(u, size=h1.shape[-2:], mode="nearest") if u.shape[-2:] != h1.shape[-2:] else u
            u = self.up1(torch.cat([u, h1], 1), e)
            y = self.conv_out(F.silu(self.norm_out(u)))
            p = patchify(y, k)
            if out is None:
                out = p.new_zeros(h.shape[0], p.shape[1])
            out = out.index_copy(0, where.to(p.device), p)
        return out
