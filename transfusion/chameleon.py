"""The ``chameleon`` group of ``transfusion ablate``: Transfusion (continuous patches, diffusion
loss) against the same transformer trained Chameleon-style (discrete codes, LM loss only) at the
same FLOP budgets. Its results: the yardsticks against training FLOPs, the compute ratio at which
the discrete recipe reaches Transfusion's score, and the paper's figures beside them
(docs/ablations.md, "Transfusion vs Chameleon")."""

from __future__ import annotations

import math
from pathlib import Path

# (summary key, title, higher is better, the paper's figure for the compute ratio)
METRICS = (
    (
        "generation_accuracy",
        "generation accuracy (SVC)",
        True,
        "text-to-image: Transfusion beats Chameleon at less than 1/3 of its FLOPs",
    ),
    ("fd", "Frechet distance to held-out", False, "FID: about 2x lower than Chameleon's at equal FLOPs"),
    ("caption_accuracy", "captioning accuracy (held-out)", True, "image-to-text: parity at 21.8% of the FLOPs"),
    ("heldout_text_perplexity", "held-out text perplexity", False, "text-to-text: parity at about 50-60% of the FLOPs"),
)
RECIPES = (("transfusion", "Transfusion (continuous, diffusion)"), ("chameleon", "Chameleon-style (discrete, LM only)"))


def metric_stats(v: dict, metric: str) -> dict:
    """A variant's stats of ``metric`` (a summary key); generation and FD at the most sampling
    steps evaluated (25 in the grid; a discrete model's one autoregressive pass, ``"ar"``)."""
    m = v[metric]
    return m if "mean" in m else m[max(m, key=lambda s: int(s) if s.isdigit() else 0)]


def pm(s: dict, fmt: str) -> str:
    """``mean ± std`` (the mean alone for one seed)."""
    return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}" if s["n"] > 1 else f"{s['mean']:{fmt}}"


def curve(variants: dict, recipe: str, metric: str) -> list[tuple[float, dict]]:
    """``(mean training FLOPs, metric stats)`` of a recipe's budgets that have results, by FLOPs."""
    pts = [
        (v["train_flops"]["mean"], metric_stats(v, metric))
        for name, v in variants.items()
        if name.startswith(recipe + "_") and "chameleon" in v["groups"]
    ]
    return sorted(pts, key=lambda p: p[0])


def flops_to_reach(points: list[tuple[float, float]], target: float, higher: bool) -> tuple[str, float]:
    """Where the curve ``[(flops, mean score)]`` (FLOPs increasing) first reaches ``target``:
    ``("=", flops)`` by log-linear interpolation between the two budgets around the crossing,
    ``("<=", smallest budget)`` when it is there already, ``(">", largest budget)`` when it never
    gets there within the budgets."""

    def ok(s):
        return s >= target if higher else s <= target

    if ok(points[0][1]):
        return "<=", points[0][0]
    for (f0, s0), (f1, s1) in zip(points, points[1:]):
        if ok(s1):
            x = math.log(f0) + (target - s0) / (s1 - s0) * (math.log(f1) - math.log(f0))
            return "=", math.exp(x)
    return ">", points[-1][0]


def ratios(variants: dict) -> dict:
    """Per metric and Transfusion budget: the discrete recipe's FLOPs to reach Transfusion's
    mean score, and Transfusion's FLOPs as a fraction of them (``relation``: "=" measured,
    "<" an upper bound when the discrete recipe does not get there within its budgets, ">=" a
    lower bound when its smallest budget already does)."""
    out = {}
    for metric, _, higher, paper in METRICS:
        t, c = curve(variants, "transfusion", metric), curve(variants, "chameleon", metric)
        if not t or not c:
            continue
        rows = []
        for ft, st in t:
            how, fc = flops_to_reach([(f, s["mean"]) for f, s in c], st["mean"], higher)
            rows.append(
                {
                    "transfusion_flops": ft,
                    "transfusion_score": st["mean"],
                    "discrete_flops": fc,
                    "ratio": ft / fc,
                    "relation": {"=": "=", "<=": ">=", ">": "<"}[how],
                }
            )
        out[metric] = {"paper": paper, "rows": rows}
    return out


def ratio_text(row: dict) -> str:
    r = row["ratio"]
    if row["relation"] == "=":
        return f"{r:.2f}"
    if row["relation"] == "<":
        return f"< {r:.2f} (the discrete recipe does not reach it within its budgets)"
    return f">= {r:.2f} (its smallest budget already does)"


def table_lines(summary: dict) -> list[str]:
    """The group's section of summary.md."""
    variants = {n: summary["variants"][n] for n in summary["groups"]["chameleon"]}
    lines = ["## chameleon", ""]
    tok = summary.get("tokenizer")
    if tok:
        lines += [
            f"Discrete tokenizer: k-means, {tok['codebook_size']} codes over {tok['patch_size']}x{tok['patch_size']} "
            f"patches ({tok['patch_grid'][0]}x{tok['patch_grid'][1]} codes per digit), fitted on the training digits. "
            f"On the {tok['n_heldout']} held-out digits: reconstruction MSE {tok['reconstruction_mse']:.4f} "
            f"(pixels in [-1, 1]); SVC accuracy {tok['svc_accuracy_on_reconstructions']:.3f} on the "
            f"reconstructions, {tok['svc_accuracy_on_originals']:.3f} on the originals (the discrete recipe's ceiling).",
            "",
        ]
    head = [
        "variant",
        "seeds",
        "steps",
        "training FLOPs",
        "gen acc",
        "FD",
        "caption acc",
        "held-out text ppl",
        "training-text ppl",
        "train s",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, v in variants.items():
        row = [
            n,
            str(len(v["seeds"])),
            str(v["train_steps"]),
            f"{v['train_flops']['mean']:.3g}",
            pm(metric_stats(v, "generation_accuracy"), ".3f"),
            pm(metric_stats(v, "fd"), ".2f"),
            pm(v["caption_accuracy"], ".3f"),
            pm(v["heldout_text_perplexity"], ".2f"),
            pm(v["text_perplexity"], ".3f"),
            pm(v["train_s"], ".0f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Compute ratio: Transfusion's training FLOPs over the discrete recipe's FLOPs to reach the same mean "
        "score (log-linear between its budgets); below 1, Transfusion needs less compute.",
        "",
        "| yardstick | Transfusion budget (FLOPs) | Transfusion score | ratio | paper |",
        "|---|---|---|---|---|",
    ]
    return lines + ratio_lines(summary) + [""]


def ratio_lines(summary: dict) -> list[str]:
    """The compute-ratio table's rows (summary.md and docs/ablations.md quote them verbatim)."""
    fmt = {"fd": ".2f", "heldout_text_perplexity": ".2f"}
    return [
        f"| {metric} | {r['transfusion_flops']:.3g} | {r['transfusion_score']:{fmt.get(metric, '.3f')}} | "
        f"{ratio_text(r)} | {m['paper']} |"
        for metric, m in summary.get("chameleon_ratios", {}).items()
        for r in m["rows"]
    ]


def plot(out: Path, summary: dict) -> None:
    """``chameleon.png``: each yardstick against training FLOPs, both recipes on one axis (error
    bars: std over seeds), the real-digit FD floor and the tokenizer's ceiling as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = {n: summary["variants"][n] for n in summary["groups"]["chameleon"]}
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    for a, (metric, title, _, _) in zip(ax, METRICS):
        for i, (recipe, label) in enumerate(RECIPES):
            pts = curve(variants, recipe, metric)
            if pts:
                a.errorbar(
                    [f for f, _ in pts],
                    [s["mean"] for _, s in pts],
                    yerr=[s["std"] for _, s in pts],
                    marker="o",
                    capsize=3,
                    color=f"C{i}",
                    label=label,
                )
        a.set_xscale("log")
        ticks = [f for f, _ in curve(variants, "transfusion", metric)]
        a.set_xticks(ticks, [f"{f:.2g}" for f in ticks])
        a.minorticks_off()
        a.set(title=title, xlabel="training FLOPs")
    ax[1].axhline(summary["floors"]["fd_real_subset_vs_heldout_mean"], color="gray", ls="--", label="real floor")
    tok = summary.get("tokenizer")
    if tok:
        ax[0].axhline(tok["svc_accuracy_on_reconstructions"], color="C1", ls=":", label="discrete ceiling")
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    fig.suptitle("Transfusion vs Chameleon-style discrete tokens at matched training FLOPs (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out / "chameleon.png", dpi=90)
    plt.close(fig)
