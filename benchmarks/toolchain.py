"""Locating the CUDA toolchain, without importing torch (the kernel report's workers and the
device check share it; setup.py keeps its own copy because it runs before the package exists)."""

from __future__ import annotations

import os
import shutil


def find_nvcc() -> str | None:
    """nvcc from PATH, CUDA_HOME / CUDA_PATH, or /usr/local/cuda; None if there is none."""
    candidates = [shutil.which("nvcc")]
    candidates += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for c in candidates + ["/usr/local/cuda/bin/nvcc"]:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None
