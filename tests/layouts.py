"""Mask layouts shared by the attention tests (docs/design.md §5)."""

from __future__ import annotations

import torch


def naive_dense(cu_seqlens: list[int], spans: list[tuple[int, int]]) -> torch.Tensor:
    """The Transfusion rule by a plain double loop: the independent oracle for the masks."""
    n = cu_seqlens[-1]
    dense = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        doc_start = max(c for c in cu_seqlens[:-1] if c <= i)
        img = [s for s in spans if s[0] <= i < s[1]]
        for j in range(n):
            same_image = bool(img) and img[0][0] <= j < img[0][1]
            dense[i, j] = doc_start <= j and (j <= i or same_image)
    return dense


# name -> (cu_seqlens, image_spans)
LAYOUTS = {
    "text_only": ([0, 17], []),
    "single_token": ([0, 1], []),
    "image_only": ([0, 64], [(0, 64)]),
    "image_first": ([0, 65], [(0, 40)]),
    "image_last": ([0, 63], [(30, 63)]),
    "several_images": ([0, 129], [(3, 20), (21, 60), (64, 100)]),
    "several_documents": ([0, 40, 40, 127], [(5, 30), (41, 70), (80, 90)]),
    "spans_cross_tiles": ([0, 65, 130], [(15, 49), (63, 65), (66, 129)]),
}


def random_layout(gen: torch.Generator, n: int, max_docs: int = 4, max_images: int = 6):
    """Random documents with random non-empty images inside them."""
    cuts = sorted(
        torch.randint(0, n + 1, (torch.randint(0, max_docs, (1,), generator=gen).item(),), generator=gen).tolist()
    )
    cu = [0] + cuts + [n]
    spans = []
    for a, b in zip(cu[:-1], cu[1:]):
        pos = a
        for _ in range(torch.randint(0, max_images, (1,), generator=gen).item()):
            if b - pos < 2:
                break
            s = torch.randint(pos, b - 1, (1,), generator=gen).item()
            e = torch.randint(s + 1, b + 1, (1,), generator=gen).item()
            spans.append((s, e))
            pos = e
    return cu, spans
