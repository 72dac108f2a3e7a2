"""Draw the dense mask of each mask family in docs/masks.md into docs/img/mask_*.png.

    python scripts/mask_pictures.py [--out docs/img]

Every picture is built with the constructor the document shows, turned into a HybridMask and
drawn from its ``to_dense()``: rows are queries, columns keys, a filled cell a visible pair.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from transfusion_kernels import HybridMask  # noqa: E402
from transfusion_kernels import mask_constructors as mc  # noqa: E402


def transfusion():
    # two documents: text, a 5-patch image, text | text, a 4-patch image
    return mc.from_spans([0, 12, 20], [[3, 8], [14, 18]]), "Transfusion: from_spans"


def bagel_splits():
    # sample 0: prompt (causal), noised latents (noise), clean latents (full), answer (causal); sample 1: text, noise
    return (
        mc.from_splits([[3, 4, 4, 3], [3, 3]], [["causal", "noise", "full", "causal"], ["causal", "noise"]]),
        "BAGEL splits: from_splits",
    )


def hidden_spans():
    # prompt, noisy copy of an image (hidden), clean copy, text: later tokens never see the noisy copy
    return mc.from_spans([0, 18], [[3, 8], [8, 13]], [[3, 8]]), "Hidden spans: from_spans(hidden_spans=)"


def prefix_lm():
    # a bidirectional prefix of 6 tokens per document is an "image" span over the prefix
    return mc.from_spans([0, 10, 20], [[0, 6], [10, 16]]), "Prefix-LM: from_spans"


def sliding_window():
    window = 4
    return (
        mc.from_mask_mod(lambda b, h, q, kv: (kv <= q) & (q - kv < window), [0, 20]),
        f"Sliding window ({window}): from_mask_mod",
    )


def sink_window():
    window, sinks = 4, 2
    return (
        mc.from_mask_mod(lambda b, h, q, kv: (kv <= q) & ((q - kv < window) | (kv < sinks)), [0, 20]),
        f"{sinks} sinks + window {window}: from_mask_mod",
    )


FAMILIES = {
    "transfusion": transfusion,
    "bagel_splits": bagel_splits,
    "hidden_spans": hidden_spans,
    "prefix_lm": prefix_lm,
    "sliding_window": sliding_window,
    "sink_window": sink_window,
}


def draw(dense: torch.Tensor, title: str, path: Path) -> None:
    n_q, n_k = dense.shape
    fig, ax = plt.subplots(figsize=(3.4, 3.6), dpi=100)
    ax.imshow(dense.numpy(), cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")
    ax.set_xticks([x - 0.5 for x in range(n_k + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(n_q + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="both", length=0, labelsize=6)
    ax.set_xticks(range(0, n_k, 5))
    ax.set_yticks(range(0, n_q, 5))
    ax.set_xlabel("key", fontsize=7)
    ax.set_ylabel("query", fontsize=7)
    ax.set_title(title, fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: reruns give the same bytes
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in FAMILIES.items():
        (starts, ends, num_keys), title = build()
        mask = HybridMask.from_intervals(starts, ends, num_keys)
        path = args.out / f"mask_{name}.png"
        draw(mask.to_dense().cpu(), f"{title}  (K = {mask.num_intervals})", path)
        print(f"{path}  K = {mask.num_intervals}")


if __name__ == "__main__":
    main()
