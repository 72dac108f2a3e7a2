"""A discrete image tokenizer for the Chameleon-style recipe: a k-means codebook over k x k latent
patches.

``fit_codebook`` runs scikit-learn's k-means (seeded, so the same training images and seed give
the same codebook) on the patches of the training images only. An image becomes its patch grid's
codes (nearest centroid per patch, row-major, the order ``patchify`` uses); decoding puts each
code's centroid back in its place. The codebook lives in the model as a buffer, so a checkpoint
carries it with the weights.
"""

from __future__ import annotations

import numpy as np
import torch

from transfusion.image import patchify, unpatchify


def fit_codebook(latents: torch.Tensor, size: int, patch: int, seed: int = 0) -> torch.Tensor:
    """``[size, C * patch * patch]`` centroids of k-means over the patches of ``latents``
    ``[N, C, H, W]`` (the training split)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    rows = patchify(latents.float(), patch).numpy().astype(np.float64)
    if len(np.unique(rows, axis=0)) < size:
        raise ValueError(f"a codebook of {size} codes needs as many distinct patches; the images have fewer")
    # one thread: the same sums in the same order on any machine (and no OpenMP spinning on a busy one)
    with threadpool_limits(1):
        km = KMeans(size, n_init=1, max_iter=100, random_state=seed).fit(rows)
    return torch.tensor(km.cluster_centers_, dtype=torch.float32)


def encode_codes(codebook: torch.Tensor, latents: torch.Tensor, patch: int) -> torch.Tensor:
    """Codes ``[N, (H/patch) * (W/patch)]`` (long) of latents ``[N, C, H, W]``: the nearest
    centroid of each patch."""
    rows = patchify(latents.float(), patch)
    d = torch.cdist(rows, codebook.float().to(rows.device))
    return d.argmin(1).reshape(len(latents), -1)


def decode_codes(codebook: torch.Tensor, codes: torch.Tensor, shape, patch: int) -> torch.Tensor:
    """Latents ``[N, C, H, W]`` (``shape`` = ``(C, H, W)``) of codes ``[N, n]``."""
    c, h, w = shape
    rows = codebook.float()[codes.reshape(-1).to(codebook.device)]
    return unpatchify(rows, len(codes), c, h, w, patch)


def ceiling(codebook: torch.Tensor, patch: int, train_images, train_labels, test_images, test_labels, svc=None) -> dict:
    """The discrete recipe's ceiling on the held-out digits: the reconstruction error (mean
    squared, in [-1, 1] pixels) and the digit classifier's (the yardsticks' SVC, fitted on the
    real training digits; ``svc``: one already fitted so) accuracy on the reconstructions, beside
    its accuracy on the originals."""
    from sklearn.svm import SVC

    from transfusion.data import to_pixels8

    if svc is None:
        svc = SVC(gamma=0.001).fit(to_pixels8(train_images), np.asarray(train_labels))
    rec = decode_codes(codebook, encode_codes(codebook, test_images, patch), tuple(test_images.shape[1:]), patch)
    y = np.asarray(test_labels)
    return {
        "codebook_size": int(codebook.shape[0]),
        "patch_size": patch,
        "patch_grid": [int(test_images.shape[2]) // patch, int(test_images.shape[3]) // patch],
        "reconstruction_mse": float(((rec - test_images.float()) ** 2).mean()),
        "svc_accuracy_on_reconstructions": float((svc.predict(to_pixels8(rec)) == y).mean()),
        "svc_accuracy_on_originals": float((svc.predict(to_pixels8(test_images)) == y).mean()),
        "n_heldout": len(y),
    }
