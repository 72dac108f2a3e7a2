"""``transfusion ablate``: the paper's ablations, small, on the digits.

Every variant of ``VARIANTS`` is the baseline config (``baseline_config``: the demo's, with a
smaller model and batch) with a few fields overridden; each is trained from scratch for the same number of steps
with each seed and scored with the same yardsticks (see ``evaluate`` and docs/ablations.md):

* generation accuracy: the demo's SVC classifies images generated from every caption template
  for every digit, at each sampling step count of ``STEP_COUNTS``;
* Frechet distance of those images to the held-out real digits, in the hidden layer of a small
  MLP trained on the real training digits (``FeatureNet``);
* captioning accuracy on the held-out digits (greedy), as the demo scores it;
* training-text perplexity: the text corpus drawn with another seed. Its sentence space is
  small (about 400 distinct lines), so every such line also occurs in the training corpus: this
  measures how well the training text is fitted, not generalisation to new sentences.

The verdicts (``VERDICTS``, ``verdicts``) compare two variants on one metric by the rule the
docs state: the difference of the means against twice its standard error.

Results: ``OUT/runs/<variant>__seed<k>.json`` per run (written atomically; a run whose file exists
is skipped, so an interrupted grid resumes), ``OUT/summary.{md,json}`` (mean and std over seeds)
and one figure per group ``OUT/<group>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion import chameleon
from transfusion.chameleon import metric_stats as _metric
from transfusion.chameleon import pm as _pm
from transfusion.config import UserError
from transfusion.outdir import check_out, write_marker


@dataclass(frozen=True)
class Variant:
    name: str
    groups: tuple[str, ...]  # the plots and tables it appears in
    overrides: dict  # "section.field" -> value, on top of the baseline config
    in_grid: bool = True  # False: run only when --only or --group names it
    # training FLOPs (transfusion/flops.py): the run's steps are this over the FLOPs of an
    # average step of its config (None: the grid's --steps)
    budget: float | None = None
    heldout_text: bool = False  # train on the corpus less HELDOUT_TEXT's lines, score on those


# One line per variant. A config shared by several groups is one variant (one run per seed).
VARIANTS = [
    Variant("baseline", ("encoder", "noise_cap", "lambda", "objective"), {}),
    Variant("linear_p2", ("attention", "encoder"), {"model.patch_size": 2}),
    Variant("causal_p2", ("attention",), {"model.patch_size": 2, "model.image_attention": "causal"}),
    # patch 1 (64 tokens per digit) costs about as much as the rest of the grid together, so it
    # is outside the default grid's time budget (docs/ablations.md, "Budget")
    Variant("linear_p1", ("encoder",), {"model.patch_size": 1}, in_grid=False),
    Variant("unet_p1", ("encoder",), {"model.image_encoder": "unet", "model.patch_size": 1}, in_grid=False),
    Variant("unet_p2", ("encoder",), {"model.image_encoder": "unet", "model.patch_size": 2}),
    Variant("unet_p4", ("encoder",), {"model.image_encoder": "unet"}),
    # the default U-Net (0.35M parameters) outweighs this transformer (0.26M); the paper's is
    # about 4% of its transformer. Channels (8, 16): 27k parameters, a tenth of the transformer
    Variant("unet_small_p4", ("encoder",), {"model.image_encoder": "unet", "model.unet_channels": [8, 16]}),
    # 999 = the last timestep: image-first pairs are noised over the whole schedule
    Variant("no_cap", ("noise_cap",), {"data.image_first_max_timestep": 999}),
    Variant("lambda_0.5", ("lambda",), {"train.diffusion_weight": 0.5}),
    Variant("lambda_5", ("lambda",), {"train.diffusion_weight": 5.0}),
    Variant("flow", ("objective",), {"model.objective": "flow"}),  # sampled with Euler steps
]

# Transfusion against a Chameleon-style discrete-token model at matched compute (docs/ablations.md,
# "Transfusion vs Chameleon at matched compute"): the baseline (continuous 4x4 patches, 4 per
# digit) and the same transformer on k-means codes of 2x2 patches (16 per digit, 256 codes: a
# codebook whose reconstructions the SVC classifies as well as the originals), each at the same
# FLOP budgets, 1 : 3 : 9, sized from measured step times so that the 18 runs take about half an
# hour as two one-thread jobs (the committed run took 54 minutes on a busier machine).
DISCRETE = {"model.image_recipe": "discrete", "model.image_codes": 256, "model.patch_size": 2}
BUDGETS = (1.2e11, 3.6e11, 1.08e12)
BUDGET_NAMES = ("1x", "3x", "9x")
VARIANTS += [
    Variant(f"{name}_{tag}", ("chameleon",), overrides, in_grid=False, budget=b, heldout_text=True)
    for b, tag in zip(BUDGETS, BUDGET_NAMES)
    for name, overrides in (("transfusion", {}), ("chameleon", DISCRETE))
]
QUICK_BUDGET_SCALE = 1 / 150  # --quick: the budgets scaled down to a few steps each
HELDOUT_FRACTION = 0.2  # of the text generator's distinct lines, held out of training (heldout_text)

TRAIN_STEPS = 1200  # per run, every variant (chosen to fit the grid's time budget: docs/ablations.md)
SEEDS = 3
STEP_COUNTS = (5, 10, 25)  # sampling steps (DDIM; Euler for flow) at which generation is scored
CFG_SCALE = 3.0
# The training corpus is drawn with seed 0; these lines with seed 1 (all of them occur in training:
# the generator has about 400 distinct lines, so no unseen ones can be drawn).
TEXT_SEED = 1
TEXT_LINES = 1000
FD_FLOOR_DRAWS = 5

# --quick: the harness end to end in seconds; no claims
QUICK = dict(
    variants=("baseline", "causal_p2", "unet_p4"), steps=3, step_counts=(2, 4), templates=1, caption_n=20, text_lines=40
)


def baseline_config(vocab_size: int, steps: int, model: str = "small"):
    """The demo's config (linear 4x4 patches: 4 tokens per 8x8 digit, v-prediction); ``small``
    (the grid's default) with a smaller model (dim 64) and batch (32 documents) so the grid fits
    its budget on two CPU cores, ``demo`` as the CPU demo trains it (dim 128, 64 documents)."""
    from transfusion.config import demo_config

    cfg = demo_config(vocab_size, steps)
    if model == "small":
        cfg.model = dataclasses.replace(cfg.model, dim=64, n_heads=4, n_kv_heads=None)
        cfg.data = dataclasses.replace(cfg.data, docs_per_batch=32)
    return cfg


def variant_config(base, variant: Variant, seed: int):
    """``base`` with the variant's overrides; ``seed`` seeds the initialisation and the batches."""
    from transfusion.config import Config

    parts = {"model": dict(base.model.__dict__), "data": dict(base.data.__dict__), "train": dict(base.train.__dict__)}
    for key, value in variant.overrides.items():
        section, name = key.split(".")
        if name not in parts[section]:
            raise KeyError(f"variant {variant.name}: {key} is not a config field")
        parts[section][name] = value
    parts["data"]["seed"] = parts["train"]["seed"] = seed
    if parts["model"]["image_recipe"] == "discrete":  # the codes follow the text vocabulary
        parts["model"]["vocab_size"] += parts["model"]["image_codes"]
    return Config.from_dict(parts)


def heldout_text_lines() -> list[str]:
    """``HELDOUT_FRACTION`` of the distinct lines the training corpus's generator makes (seed 0,
    as ``prepare`` draws the corpus), drawn with seed 0, sorted: the ``heldout_text`` variants are
    trained on the corpus without them and scored on them (arithmetic facts and counting lines
    the model has not seen)."""
    import random

    from transfusion.data import text_corpus

    distinct = sorted(set(text_corpus(0)))
    return sorted(random.Random(0).sample(distinct, round(HELDOUT_FRACTION * len(distinct))))


_CODEBOOKS = {}


def codebook(data_dir, size: int, patch: int, seed: int):
    """The k-means codebook of the prepared training latents (fitted once per process)."""
    from transfusion.codebook import fit_codebook

    key = (str(data_dir), size, patch, seed)
    if key not in _CODEBOOKS:
        _CODEBOOKS[key] = fit_codebook(_yardsticks(data_dir).prepared.train_latents, size, patch, seed)
    return _CODEBOOKS[key]


# -- yardsticks ------------------------------------------------------------------------------


class FeatureNet:
    """The Frechet distance's feature space: the 32-unit tanh hidden layer of an MLP classifier
    (scikit-learn, fixed seed) trained on the real training digits' 8x8 pixels scaled to [0, 1]."""

    def __init__(self, train_images, train_labels):
        from sklearn.neural_network import MLPClassifier

        from transfusion.data import to_pixels8

        self.clf = MLPClassifier(hidden_layer_sizes=(32,), activation="tanh", max_iter=600, random_state=0)
        self.clf.fit(to_pixels8(train_images) / 16.0, np.asarray(train_labels))

    def features(self, images) -> np.ndarray:
        from transfusion.data import to_pixels8

        return np.tanh(to_pixels8(images) / 16.0 @ self.clf.coefs_[0] + self.clf.intercepts_[0])

    def accuracy(self, images, labels) -> float:
        from transfusion.data import to_pixels8

        return float((self.clf.predict(to_pixels8(images) / 16.0) == np.asarray(labels)).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[n, d]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``."""
    from scipy.linalg import sqrtm

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = sqrtm(sa @ sb)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * np.real(root)))


class Yardsticks:
    """Everything a run is scored against, built once per process from the prepared data."""

    def __init__(self, prepared):
        from sklearn.svm import SVC

        from transfusion.data import text_corpus, to_pixels8

        self.prepared = prepared
        self.svc = SVC(gamma=0.001).fit(to_pixels8(prepared.train_images), prepared.train_labels.numpy())
        self.features = FeatureNet(prepared.train_images, prepared.train_labels)
        self.heldout_features = self.features.features(prepared.test_images)
        self.text_lines = text_corpus(TEXT_SEED, TEXT_LINES)

    def floors(self, per_digit: int) -> dict:
        """The Frechet distance of real digits to the held-out ones: the whole training split, and
        draws of ``per_digit`` training digits per class (the generated set's size)."""
        p = self.prepared
        train_f = self.features.features(p.train_images)
        labels = p.train_labels.numpy()
        rng = np.random.default_rng(0)
        draws = []
        from transfusion.data import to_pixels8

        for _ in range(FD_FLOOR_DRAWS):
            idx = np.concatenate([rng.choice(np.flatnonzero(labels == d), per_digit, replace=False) for d in range(10)])
            draws.append(frechet_distance(train_f[idx], self.heldout_features))
        return {
            "fd_real_train_vs_heldout": frechet_distance(train_f, self.heldout_features),
            "fd_real_subset_vs_heldout_mean": float(np.mean(draws)),
            "fd_real_subset_vs_heldout_std": float(np.std(draws)),
            "fd_subset_per_digit": per_digit,
            "fd_subset_draws": FD_FLOOR_DRAWS,
            "svc_accuracy_on_heldout": float(
                (self.svc.predict(to_pixels8(p.test_images)) == p.test_labels.numpy()).mean()
            ),
            "feature_net_accuracy_on_heldout": self.features.accuracy(p.test_images, p.test_labels),
        }


def generate_images(model, tokenizer, prompts, steps: int):
    """Images for ``prompts`` (one each, guided): the one place evaluation samples images, so the
    sampler can follow the model's training objective."""
    import torch

    from transfusion.objective import SAMPLERS
    from transfusion.sample import SampleConfig, generate

    # DDIM, or Euler for a flow model; a discrete model ignores both (its codes are sampled one by
    # one at temperature 1, guided alike)
    sampler = SAMPLERS[model.cfg.objective][0]
    scfg = SampleConfig(steps=steps, sampler=sampler, cfg_scale=CFG_SCALE, image_size=(8, 8), max_new_tokens=0, seed=0)
    return torch.stack([r["images"][0] for r in generate(model, tokenizer, prompts, scfg, open_image=True)])


def text_perplexity(model, tokenizer, lines, batch_docs: int = 128) -> float:
    """exp(mean next-token cross-entropy) over ``[BOS] line [EOS]`` documents."""
    import torch

    from transfusion.data import pack_documents
    from transfusion.train import loss_terms

    total, count = 0.0, 0
    sched = model.schedule()
    with torch.no_grad():
        for i in range(0, len(lines), batch_docs):
            batch = pack_documents(
                [[tokenizer.encode(t)] for t in lines[i : i + batch_docs]],
                tokenizer,
                model.cfg.patch_size,
                model.cfg.num_train_timesteps,
            )
            n = int((batch.labels != -100).sum())
            lm, _ = loss_terms(model, batch, sched)
            total += float(lm) * n
            count += n
    return math.exp(total / count)


def evaluate(
    model,
    tokenizer,
    ys: Yardsticks,
    step_counts,
    templates: int,
    caption_n: int | None,
    text_lines: int | None,
    heldout_text: list[str] | None = None,
) -> dict:
    """All yardsticks for one trained model (see the module docstring). A discrete model's images
    are sampled once, under the key ``"ar"`` (autoregressive) in place of the sampling step
    counts. ``heldout_text``: lines left out of its training corpus, scored as
    ``heldout_text_perplexity`` (and left out of the training-text lines)."""
    from transfusion.data import CAPTION_TEMPLATES, WORDS, parse_digit, to_pixels8
    from transfusion.sample import SampleConfig, caption

    model.eval()
    p = ys.prepared
    digits = [d for d in range(10) for _ in range(templates)]
    prompts = [CAPTION_TEMPLATES[j].format(word=WORDS[d], num=d) for d in range(10) for j in range(templates)]
    out = {"generation": {}, "timings_s": {}}
    for steps in ("ar",) if model.cfg.discrete_images else step_counts:
        t = time.perf_counter()
        gen = generate_images(model, tokenizer, prompts, 1 if steps == "ar" else steps)
        pred = ys.svc.predict(to_pixels8(gen))
        out["generation"][str(steps)] = {
            "accuracy": float((pred == np.array(digits)).mean()),
            "fd": frechet_distance(ys.features.features(gen), ys.heldout_features),
        }
        out["timings_s"][f"generate_{steps}"] = time.perf_counter() - t
    t = time.perf_counter()
    x, y = p.test_latents, p.test_labels
    if caption_n is not None:
        x, y = x[:caption_n], y[:caption_n]
    caps = caption(model, tokenizer, x, SampleConfig(max_new_tokens=12))
    out["caption_accuracy"] = float(np.mean([parse_digit(c) == int(v) for c, v in zip(caps, y)]))
    out["caption_n"] = len(caps)
    out["caption_examples"] = [{"label": int(v), "caption": c} for c, v in list(zip(caps, y))[:5]]
    out["timings_s"]["caption"] = time.perf_counter() - t
    t = time.perf_counter()
    lines = ys.text_lines
    if heldout_text is not None:
        held = set(heldout_text)
        lines = [s for s in lines if s not in held]
        out["heldout_text_perplexity"] = text_perplexity(model, tokenizer, heldout_text[:text_lines])
        out["heldout_text_lines"] = len(heldout_text[:text_lines])
    lines = lines[:text_lines]
    out["text_perplexity"] = text_perplexity(model, tokenizer, lines)
    out["text_lines"] = len(lines)
    out["timings_s"]["perplexity"] = time.perf_counter() - t
    out["generated_per_digit"] = templates
    return out


# -- one run ---------------------------------------------------------------------------------

_YARDSTICKS = {}


def _yardsticks(data_dir) -> Yardsticks:
    from transfusion.prepare import load_prepared

    key = str(data_dir)
    if key not in _YARDSTICKS:
        _YARDSTICKS[key] = Yardsticks(load_prepared(data_dir))
    return _YARDSTICKS[key]


def run_one(task: dict) -> dict:
    """Train one variant with one seed, evaluate it, write its JSON atomically; return it."""
    import torch

    from transfusion.config import Config
    from transfusion.data import MixedBatches
    from transfusion.model import TransfusionModel
    from transfusion.train import Trainer

    if task["threads"]:
        torch.set_num_threads(task["threads"])
    t0 = time.perf_counter()
    ys = _yardsticks(task["data"])
    p = ys.prepared
    cfg = Config.from_dict(task["config"])
    torch.manual_seed(cfg.train.seed)
    model = TransfusionModel(cfg.model, backend=cfg.train.backend)
    image_tokens = None
    if cfg.model.discrete_images:
        m = cfg.model
        model.codebook.copy_(codebook(task["data"], m.image_codes, m.patch_size, m.codebook_seed))
        image_tokens = model.image_tokens(p.train_latents)
    held = heldout_text_lines() if task["heldout_text"] else None
    corpus = training_corpus(p, held)
    batches = MixedBatches(
        p.train_latents,
        p.train_labels,
        corpus,
        p.tokenizer,
        cfg.data,
        cfg.model.patch_size,
        cfg.model.num_train_timesteps,
        image_tokens=image_tokens,
    )
    trainer = Trainer(model, cfg, p.tokenizer, batches)
    t = time.perf_counter()
    hist = trainer.fit(progress=False)
    train_s = time.perf_counter() - t
    tail = hist[-max(1, len(hist) // 10) :]
    t = time.perf_counter()
    metrics = evaluate(
        model, p.tokenizer, ys, task["step_counts"], task["templates"], task["caption_n"], task["text_lines"], held
    )
    result = {
        "variant": task["variant"],
        "groups": task["groups"],
        "seed": task["seed"],
        "overrides": task["overrides"],
        "config": task["config"],
        "metrics": metrics,
        "training": {
            "steps": trainer.step,
            "final_lm_loss": float(np.mean([h["lm_loss"] for h in tail])),
            "final_ddpm_loss": float(np.mean([h["ddpm_loss"] for h in tail])),
            "tokens_per_step": float(np.mean([h["tokens"] for h in hist])) if hist else 0.0,
            "parameters": sum(q.numel() for q in model.parameters()),
            # every step's count (transfusion/flops.py, the formula); None for the U-Net encoder
            "flops": None if any(h["flops"] is None for h in hist) else float(sum(h["flops"] for h in hist)),
            "flops_formula": "6 * (P_layers * tokens + d * V * logits + 2 * p * d * image_tokens "
            "+ (f * d + d * d) * images) + 12 * L * d_attn * attention_pairs (transfusion/flops.py)",
            "budget": task["budget"],
            "corpus_lines": len(corpus),
        },
        "wall_s": {"train": train_s, "evaluate": time.perf_counter() - t, "total": time.perf_counter() - t0},
        "threads": torch.get_num_threads(),
        "quick": task["quick"],
        "commit": task["commit"],
        "command": task["command"],
        "versions": versions(),
    }
    write_json_atomic(Path(task["path"]), result)
    return result


def versions() -> dict:
    """The libraries a run's numbers depend on: torch (training, sampling) and scikit-learn (the
    SVC and the feature network of the yardsticks)."""
    import platform

    import scipy
    import sklearn
    import torch

    return {
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# -- the grid ----------------------------------------------------------------------------------


def git_commit() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "transfusion"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "transfusion_dirty": None}
    return {"commit": head, "transfusion_dirty": bool(dirty)}


def plan(args) -> tuple[list[Variant], list[int], dict]:
    """The variants, seeds and evaluation settings the arguments ask for (UserError if wrong)."""
    names = [v.name for v in VARIANTS]
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    check_out(args.out, "ablate", True, legacy=lambda d: (d / "runs").is_dir(), flag=False)
    pool = [v for v in VARIANTS if (v.name in QUICK["variants"] if args.quick else v.in_grid)]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown or not wanted:
            raise UserError(
                f"--only: unknown variant {', '.join(unknown) or repr(args.only)}; choose from {', '.join(names)}"
            )
        pool = [v for v in VARIANTS if v.name in wanted]
    if args.group:
        groups = sorted({g for v in VARIANTS for g in v.groups})
        if args.only:
            raise UserError(f"--group {args.group} and --only both choose the runs; give one of them")
        if args.group not in groups:
            raise UserError(f"--group: unknown group {args.group!r}; choose from {', '.join(groups)}")
        pool = [v for v in VARIANTS if args.group in v.groups]
    budgeted = [v.name for v in pool if v.budget is not None]
    if budgeted and args.steps is not None:
        raise UserError(
            f"--steps does not apply to {', '.join(budgeted)}: their steps follow from their FLOP budgets; "
            "leave --steps out"
        )
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else SEEDS)))
    ev = (
        dict(
            steps=QUICK["steps"],
            step_counts=QUICK["step_counts"],
            templates=QUICK["templates"],
            caption_n=QUICK["caption_n"],
            text_lines=QUICK["text_lines"],
        )
        if args.quick
        else dict(steps=TRAIN_STEPS, step_counts=STEP_COUNTS, templates=10, caption_n=None, text_lines=None)
    )
    if args.steps is not None:
        ev["steps"] = args.steps
    return pool, seeds, ev


def training_corpus(prepared, held: list[str] | None) -> list[str]:
    """The prepared corpus, less the ``held`` lines (``heldout_text`` variants)."""
    if held is None:
        return prepared.corpus
    drop = set(held)
    return [s for s in prepared.corpus if s not in drop]


_STEP_FLOPS = {}


def mean_step_flops(cfg, prepared, corpus, n: int = 64) -> float:
    """The mean training FLOPs (transfusion/flops.py) of the first ``n`` batches of a run's
    stream (once per model and data config: the budgets of a recipe share it). The counts depend
    only on the documents' lengths, so a discrete run's image codes are stood in for by one code
    of the right number per patch."""
    import torch

    from transfusion.data import MixedBatches
    from transfusion.flops import batch_counts, training_flops

    key = json.dumps([cfg.model.__dict__, cfg.data.__dict__, len(corpus), n], sort_keys=True, default=list)
    if key in _STEP_FLOPS:
        return _STEP_FLOPS[key]
    m = cfg.model
    tokens = None
    if m.discrete_images:
        s = prepared.train_latents.shape
        tokens = torch.full((s[0], (s[2] // m.patch_size) * (s[3] // m.patch_size)), m.text_vocab_size)
    b = MixedBatches(
        prepared.train_latents,
        prepared.train_labels,
        corpus,
        prepared.tokenizer,
        cfg.data,
        m.patch_size,
        m.num_train_timesteps,
        image_tokens=tokens,
    )
    _STEP_FLOPS[key] = float(
        np.mean([training_flops(m, batch_counts(b.batch(i), m.bidirectional_images)) for i in range(n)])
    )
    return _STEP_FLOPS[key]


def _cost(v: Variant, base) -> float:
    """Rough relative training cost: runs go cheapest first, so an interrupted grid has whole
    groups done before the costly patch-1 runs (and the small budgets before the large ones)."""
    if v.budget is not None:
        return v.budget / BUDGETS[0]
    k = v.overrides.get("model.patch_size", base.model.patch_size)
    return (64 / k**2) * (2.0 if v.overrides.get("model.image_encoder", base.model.image_encoder) == "unet" else 1.0)


def run(args) -> int:
    pool, seeds, ev = plan(args)
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    import torch
    from tqdm.auto import tqdm

    from transfusion.prepare import load_prepared, prepare

    out = Path(args.out)
    try:  # checked before the first run: a grid is long, and the plots come last
        import matplotlib  # noqa: F401

        no_plots = None
    except ImportError:
        no_plots = (
            "matplotlib is not installed, so summary.md and summary.json are written without plots; "
            "pip install 'transfusion-kernels[bench]' and run the same command again to draw them "
            "(finished runs are kept)"
        )
        print(f"transfusion ablate: note: {no_plots}", file=sys.stderr, flush=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_marker(out, "ablate")
    data_dir = out / "data"
    prepared = (
        load_prepared(data_dir)
        if (data_dir / "prepare.json").is_file()
        else prepare(data_dir, image_size=8, vocab_size=256, seed=0, made_by="ablate")
    )
    base = baseline_config(prepared.tokenizer.vocab_size, ev["steps"], args.model)
    threads = args.threads or 1
    commit = git_commit()
    as_module = Path(sys.argv[0]).name == "ablate.py"
    command = shlex.join((["python", "-m", "transfusion.ablate"] if as_module else ["transfusion"]) + sys.argv[1:])
    tasks, skipped = [], 0
    held = heldout_text_lines()
    scale = QUICK_BUDGET_SCALE if args.quick else 1.0
    for v in sorted(pool, key=lambda v: _cost(v, base)):
        for seed in seeds:
            config = variant_config(base, v, seed)
            budget = None if v.budget is None else v.budget * scale
            if budget is not None:
                corpus = training_corpus(prepared, held if v.heldout_text else None)
                config.train.steps = max(1, round(budget / mean_step_flops(config, prepared, corpus)))
            cfg = json.loads(config.to_json())  # as stored: lists, not tuples
            path = out / "runs" / f"{v.name}__seed{seed}.json"
            if path.is_file():
                try:
                    old = json.loads(path.read_text())
                except (OSError, ValueError) as e:
                    raise UserError(f"{path} is not a readable result ({e}); delete it to rerun that run") from e
                if old.get("config") != cfg or old.get("quick") != args.quick:
                    raise UserError(
                        f"{path} was made with other settings (config or --quick); "
                        "pass a new --out, or delete that file to rerun it"
                    )
                skipped += 1
                continue
            tasks.append(
                {
                    "variant": v.name,
                    "groups": list(v.groups),
                    "overrides": v.overrides,
                    "seed": seed,
                    "config": cfg,
                    "path": str(path),
                    "data": str(data_dir),
                    "threads": threads,
                    "step_counts": list(ev["step_counts"]),
                    "templates": ev["templates"],
                    "caption_n": ev["caption_n"],
                    "text_lines": ev["text_lines"],
                    "quick": args.quick,
                    "commit": commit,
                    "command": command,
                    "budget": budget,
                    "heldout_text": v.heldout_text,
                }
            )
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(
        f"ablate: {len(tasks)} runs to do, {skipped} already done; "
        + ("steps from the FLOP budgets; " if any(v.budget for v in pool) else f"{ev['steps']} training steps each; ")
        + f"{args.jobs} jobs x {threads} threads"
    )
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(tasks), desc="ablate", unit="run", disable=args.quiet or not sys.stderr.isatty(), dynamic_ncols=True
    )
    if args.jobs == 1 or len(tasks) <= 1:
        previous = torch.get_num_threads()
        try:
            for task in tasks:
                r = run_one(task)
                bar.update(1)
                bar.set_postfix_str(f"{r['variant']} seed {r['seed']}: {r['wall_s']['total']:.0f} s")
        finally:
            torch.set_num_threads(previous)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as ex:
            for f in as_completed([ex.submit(run_one, t) for t in tasks]):
                r = f.result()
                bar.update(1)
                bar.set_postfix_str(f"{r['variant']} seed {r['seed']}: {r['wall_s']['total']:.0f} s")
    bar.close()
    elapsed = time.perf_counter() - t0
    summary = aggregate(out, _yardsticks(data_dir).floors(ev["templates"]), ev, elapsed if tasks else None, data_dir)
    write_table(out, summary)
    if no_plots is None:
        plot(out, summary)
    # printed with --quiet too: where the results went is the command's answer
    print(
        f"transfusion ablate: {len(tasks)} runs in {elapsed:.0f} s ({skipped} already done); results in {out}: "
        f"runs/, summary.md, summary.json"
        + (
            f", {len(summary['groups'])} plots (*.png)"
            if no_plots is None
            else "; no plots (matplotlib is not installed)"
        )
    )
    return 0


# -- results -------------------------------------------------------------------------------------


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def load_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def variant_stats(runs: list[dict]) -> dict:
    """Mean and std over seeds of every variant's metrics."""
    order = [v.name for v in VARIANTS]
    variants = {}
    for name in order:
        rs = [r for r in runs if r["variant"] == name]
        if not rs:
            continue
        counts = list(rs[0]["metrics"]["generation"])
        variants[name] = {
            "groups": rs[0]["groups"],
            "overrides": rs[0]["overrides"],
            "seeds": sorted(r["seed"] for r in rs),
            "generation_accuracy": {s: _stats([r["metrics"]["generation"][s]["accuracy"] for r in rs]) for s in counts},
            "fd": {s: _stats([r["metrics"]["generation"][s]["fd"] for r in rs]) for s in counts},
            "caption_accuracy": _stats([r["metrics"]["caption_accuracy"] for r in rs]),
            "text_perplexity": _stats([r["metrics"]["text_perplexity"] for r in rs]),
            **(
                {"heldout_text_perplexity": _stats([r["metrics"]["heldout_text_perplexity"] for r in rs])}
                if "heldout_text_perplexity" in rs[0]["metrics"]
                else {}
            ),
            **(
                {"train_flops": _stats([r["training"]["flops"] for r in rs])}
                if rs[0]["training"].get("flops") is not None
                else {}
            ),
            "train_s": _stats([r["wall_s"]["train"] for r in rs]),
            "run_s": _stats([r["wall_s"]["total"] for r in rs]),
            "tokens_per_step": rs[0]["training"]["tokens_per_step"],
            "train_steps": rs[0]["training"]["steps"],
            "quick": rs[0]["quick"],
            "commits": sorted({r["commit"]["commit"] or "" for r in rs}),
            "commands": sorted({r["command"] for r in rs}),
        }
    return variants


def tokenizer_ceiling(data_dir) -> dict:
    """The discrete recipe's tokenizer (``DISCRETE``'s codebook, seed 0) scored on the held-out
    digits: ``transfusion.codebook.ceiling``."""
    from transfusion.codebook import ceiling

    ys = _yardsticks(data_dir)
    p = ys.prepared
    size, patch = DISCRETE["model.image_codes"], DISCRETE["model.patch_size"]
    cb = codebook(data_dir, size, patch, 0)
    return {
        **ceiling(cb, patch, p.train_latents, p.train_labels, p.test_latents, p.test_labels, ys.svc),
        "seed": 0,
        "method": "k-means (scikit-learn KMeans, n_init 1, max_iter 100) over the training digits' patches",
    }


def aggregate(out: Path, floors: dict, ev: dict, elapsed: float | None, data_dir=None) -> dict:
    """Mean and std over seeds of every variant's metrics and the verdicts, from the run files in
    ``out/runs``; with chameleon runs, their compute ratios and (from ``data_dir``) the
    tokenizer's ceiling."""
    runs = load_runs(out)
    variants = variant_stats(runs)
    groups = {}
    for v in VARIANTS:
        if v.name in variants:
            for g in v.groups:
                groups.setdefault(g, []).append(v.name)
    summary = {
        "variants": variants,
        "groups": groups,
        "floors": floors,
        "evaluation": ev,
        "verdicts": verdicts(variants),
        "last_invocation_wall_s": elapsed,
        "runs": len(runs),
    }
    if "chameleon" in groups:
        summary["chameleon_ratios"] = chameleon.ratios(variants)
        if data_dir is not None:
            summary["tokenizer"] = tokenizer_ceiling(data_dir)
    write_json_atomic(out / "summary.json", summary)
    return summary


# -- verdicts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One comparison of variant ``a`` with ``b`` on ``metric`` (a summary key; generation and FD
    at the most sampling steps evaluated). ``expect``: the paper's claim, ``">"`` (a is higher), ``"<"`` (a is
    lower), ``"small:D"`` (the two differ by less than D), or None (no claim: only whether they
    differ)."""

    group: str
    what: str
    a: str
    b: str
    metric: str
    expect: str | None


VERDICTS = [
    Verdict(
        "attention",
        "bidirectional vs causal attention inside images, generation",
        "linear_p2",
        "causal_p2",
        "generation_accuracy",
        ">",
    ),
    Verdict(
        "attention",
        "bidirectional vs causal attention inside images, captioning",
        "linear_p2",
        "causal_p2",
        "caption_accuracy",
        ">",
    ),
    Verdict("attention", "bidirectional vs causal attention inside images, FD", "linear_p2", "causal_p2", "fd", "<"),
    Verdict(
        "encoder", "linear encoder, patch 2 vs patch 4, generation", "linear_p2", "baseline", "generation_accuracy", ">"
    ),
    Verdict(
        "encoder", "linear encoder, patch 2 vs patch 4, captioning", "linear_p2", "baseline", "caption_accuracy", ">"
    ),
    Verdict("encoder", "linear encoder, patch 2 vs patch 4, FD", "linear_p2", "baseline", "fd", "<"),
    Verdict(
        "encoder",
        "linear encoder, patch 1 vs patch 2, generation",
        "linear_p1",
        "linear_p2",
        "generation_accuracy",
        ">",
    ),
    Verdict(
        "encoder", "U-Net vs linear encoder at patch 4, generation", "unet_p4", "baseline", "generation_accuracy", ">"
    ),
    Verdict("encoder", "U-Net vs linear encoder at patch 4, FD", "unet_p4", "baseline", "fd", "<"),
    Verdict("noise_cap", "noise cap vs none, captioning", "baseline", "no_cap", "caption_accuracy", ">"),
    Verdict(
        "noise_cap",
        "noise cap vs none, generation (paper: under 1% apart)",
        "baseline",
        "no_cap",
        "generation_accuracy",
        "small:0.01",
    ),
    Verdict(
        "noise_cap",
        "noise cap vs none, training-text perplexity (paper: under 1% apart)",
        "baseline",
        "no_cap",
        "text_perplexity",
        "small:0.055",
    ),
    Verdict("lambda", "lambda 5 vs 1, generation", "lambda_5", "baseline", "generation_accuracy", None),
    Verdict("lambda", "lambda 5 vs 1, captioning", "lambda_5", "baseline", "caption_accuracy", None),
    Verdict("lambda", "lambda 5 vs 1, training-text perplexity", "lambda_5", "baseline", "text_perplexity", None),
    Verdict("lambda", "lambda 0.5 vs 1, generation", "lambda_0.5", "baseline", "generation_accuracy", None),
    Verdict("objective", "flow vs DDPM, generation", "flow", "baseline", "generation_accuracy", None),
    Verdict("objective", "flow vs DDPM, captioning", "flow", "baseline", "caption_accuracy", None),
] + [
    Verdict(
        "chameleon",
        f"continuous vs discrete images at {tag} FLOPs, {what}",
        f"transfusion_{tag}",
        f"chameleon_{tag}",
        metric,
        expect,
    )
    for tag in BUDGET_NAMES
    for what, metric, expect in (
        ("generation", "generation_accuracy", ">"),
        ("FD", "fd", "<"),
        ("captioning", "caption_accuracy", ">"),
        ("held-out text perplexity", "heldout_text_perplexity", "<"),
    )
]


def judge(a: dict, b: dict, expect: str | None) -> dict:
    """The stated rule: a and b (mean, std, n) differ when the difference of the means is more
    than twice its standard error sqrt(s_a^2/n_a + s_b^2/n_b); otherwise they are within noise.
    Against a claim: "agrees" / "disagrees" when they differ in / against its direction, and
    "unresolved" when within noise; a "small:D" claim agrees only when the whole 2-SE interval of
    the difference lies within D, disagrees when it lies wholly outside, else is unresolved."""
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    z = diff / se if se > 0 else (math.inf if diff else 0.0) * (1 if diff >= 0 else -1)
    differs = abs(diff) > 2 * se
    if expect is None:
        verdict = "differs" if differs else "within noise"
    elif expect.startswith("small:"):
        bound = float(expect.split(":")[1])
        verdict = (
            "agrees" if abs(diff) + 2 * se < bound else "disagrees" if abs(diff) - 2 * se > bound else "unresolved"
        )
    else:
        verdict = "unresolved" if not differs else ("agrees" if (diff > 0) == (expect == ">") else "disagrees")
    return {"diff": diff, "se": se, "z": z, "differs": differs, "verdict": verdict}


def verdicts(variants: dict) -> list[dict]:
    """Every ``VERDICTS`` row whose two variants have results, judged by ``judge``."""
    rows = []
    for v in VERDICTS:
        if v.a in variants and v.b in variants:
            a, b = _metric(variants[v.a], v.metric), _metric(variants[v.b], v.metric)
            rows.append({**dataclasses.asdict(v), "a_stats": a, "b_stats": b, **judge(a, b, v.expect)})
    return rows


def verdict_line(r: dict) -> str:
    """A verdict as one table row (summary.md and docs/ablations.md quote it verbatim)."""
    fmt = ".2f" if r["metric"].startswith(("fd", "text", "heldout")) else ".3f"
    claim = {">": "higher", "<": "lower", None: "(no claim)"}.get(
        r["expect"]
    ) or f"within {float(r['expect'].split(':')[1]):g}"
    z = "inf" if math.isinf(r["z"]) else f"{r['z']:+.1f}"
    return (
        f"| {r['group']} | {r['what']} | {r['a']} {_pm(r['a_stats'], fmt)} (n={r['a_stats']['n']}) | "
        f"{r['b']} {_pm(r['b_stats'], fmt)} (n={r['b_stats']['n']}) | {claim} | {z} | **{r['verdict']}** |"
    )


VERDICT_HEAD = [
    "| group | comparison (a vs b) | a | b | paper's claim for a | z | verdict |",
    "|---|---|---|---|---|---|---|",
]


def write_table(out: Path, summary: dict) -> None:
    """``summary.md``: one table per group, mean ± std (sample std over seeds)."""
    lines = ["# Ablations on the digits: mean ± std over seeds", ""]
    f = summary["floors"]
    lines += [
        f"Frechet distance floor (real digits vs held-out): whole training split "
        f"{f['fd_real_train_vs_heldout']:.3f}; {f['fd_subset_per_digit']} training digits per class "
        f"(the generated set's size) {f['fd_real_subset_vs_heldout_mean']:.3f} ± "
        f"{f['fd_real_subset_vs_heldout_std']:.3f} over {f['fd_subset_draws']} draws. "
        f"SVC accuracy on held-out real digits {f['svc_accuracy_on_heldout']:.3f}.",
        "",
    ]
    for group, names in summary["groups"].items():
        if group == "chameleon":  # against FLOPs, not sampling steps
            lines += chameleon.table_lines(summary)
            continue
        counts = list(summary["variants"][names[0]]["generation_accuracy"])
        head = (
            ["variant", "seeds"]
            + [f"gen acc @{s}" for s in counts]
            + [f"FD @{s}" for s in counts]
            + ["caption acc", "training-text ppl", "train s"]
        )
        lines += [f"## {group}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for n in names:
            v = summary["variants"][n]
            row = (
                [n, str(len(v["seeds"]))]
                + [_pm(v["generation_accuracy"][s], ".3f") for s in counts]
                + [_pm(v["fd"][s], ".2f") for s in counts]
                + [_pm(v["caption_accuracy"], ".3f"), _pm(v["text_perplexity"], ".3f"), _pm(v["train_s"], ".0f")]
            )
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if summary.get("verdicts"):
        lines += [
            "## Verdicts",
            "",
            "z = (mean a - mean b) / sqrt(s_a^2/n_a + s_b^2/n_b); a and b differ when |z| > 2. Against the "
            "paper's claim: agrees / disagrees when they differ in / against its direction, unresolved when "
            "within noise; a claim of a small effect agrees only when the 2-SE interval of the difference "
            "lies within it. Generation and FD at the most sampling steps evaluated.",
            "",
            *VERDICT_HEAD,
        ]
        lines += [verdict_line(r) for r in summary["verdicts"]] + [""]
    (out / "summary.md").write_text("\n".join(lines))


def plot(out: Path, summary: dict) -> None:
    """One figure per group: generation accuracy and FD against sampling steps, captioning
    accuracy and text perplexity per variant (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for group, names in summary["groups"].items():
        if group == "chameleon":  # against FLOPs, not sampling steps
            chameleon.plot(out, summary)
            continue
        fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
        for n in names:
            v = summary["variants"][n]
            xs = [int(s) for s in v["generation_accuracy"]]
            for a, key in ((ax[0], "generation_accuracy"), (ax[1], "fd")):
                a.errorbar(
                    xs,
                    [v[key][s]["mean"] for s in v[key]],
                    yerr=[v[key][s]["std"] for s in v[key]],
                    marker="o",
                    capsize=3,
                    label=n,
                )
        for a, key, title in (
            (ax[2], "caption_accuracy", "captioning accuracy (held-out)"),
            (ax[3], "text_perplexity", "training-text perplexity"),
        ):
            a.bar(
                range(len(names)),
                [summary["variants"][n][key]["mean"] for n in names],
                yerr=[summary["variants"][n][key]["std"] for n in names],
                capsize=3,
                color="C0",
            )
            a.set_xticks(range(len(names)), names, rotation=30, ha="right")
            a.set_title(title)
        ax[0].set(title="generation accuracy (SVC)", xlabel="sampling steps")
        ax[1].set(title="Frechet distance to held-out", xlabel="sampling steps")
        ax[1].axhline(summary["floors"]["fd_real_subset_vs_heldout_mean"], color="gray", ls="--", label="real floor")
        ax[0].legend(fontsize=7)
        ax[1].legend(fontsize=7)
        fig.suptitle(f"{group} (mean ± std over seeds)")
        fig.tight_layout()
        fig.savefig(out / f"{group}.png", dpi=90)
        plt.close(fig)


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(v.name for v in VARIANTS)
    parser.add_argument("--out", required=True, help="results folder (runs/, summary.md/.json, one plot per group)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny grid (few steps, one seed, few variants) to check the harness; no claims",
    )
    parser.add_argument(
        "--group",
        default=None,
        help="run the variants of one group, those outside the default grid included: e.g. chameleon "
        "(Transfusion against a discrete-token model at matched FLOP budgets)",
    )
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per variant (default {SEEDS}; --quick: 1)")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated variants to run, of: {names} (the default grid: all but "
        + ", ".join(v.name for v in VARIANTS if not v.in_grid)
        + ")",
    )
    # one thread per job: on a busy machine a multi-threaded job waits in OpenMP barriers for
    # its descheduled threads (measured 4x slower); on a quiet one, 1 job x 2 threads is faster
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per job (default 1)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per run (default {TRAIN_STEPS}; --quick: {QUICK['steps']})",
    )
    parser.add_argument(
        "--model",
        choices=("small", "demo"),
        default="small",
        help="baseline size: small (dim 64, 32 documents per batch) or the CPU demo's "
        "(dim 128, 64 documents) (default small)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="transfusion ablate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"transfusion ablate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
