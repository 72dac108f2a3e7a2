"""``transfusion demo``: prepare the digits data, train a small model on the CPU, generate every
digit several times, caption held-out digits, and measure both with independent yardsticks.

* Generation: an SVC (scikit-learn, RBF kernel, gamma=0.001) fitted on the real 8x8 training
  digits classifies each generated image; the score is the fraction classified as the digit the
  prompt asked for.
* Captioning: the model captions each held-out digit (never seen in training) greedily; the score
  is the fraction of captions whose first named digit (word or numeral) is the true one.

Everything is seeded; the report records the settings, timings and both scores. The output folder
is written under a temporary name beside ``out`` and moved into place at the end, so a failed or
interrupted demo leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from transfusion.config import demo_config

SAMPLES_PER_DIGIT = 10
# Wall-clock guard for busy machines: after PROBE_STEPS timed steps, a run whose planned steps
# would not fit in TRAIN_BUDGET_S is shortened (with its cosine schedule, still in warmup); a
# run that still overruns stops at TRAIN_TIME_LIMIT_S. On a quiet 2-core CPU neither triggers.
PROBE_STEPS = 20
TRAIN_BUDGET_S = 360
TRAIN_TIME_LIMIT_S = 450
GENERATION_BAR = 0.8
CAPTION_BAR = 0.8


def run_demo(
    out,
    backend: str | None = None,
    threads: int | None = None,
    steps: int | None = None,
    quick: bool = False,
    progress: bool = True,
) -> dict:
    """Run the demo into folder ``out`` (replaced if it exists) and return the report."""
    from transfusion.checkpoint import atomic_path

    out = Path(out)
    with atomic_path(out, directory=True) as work:
        report = _run(work, out, backend, threads, steps, quick, progress)
    return report


def _run(work: Path, out: Path, backend, threads, steps, quick, progress) -> dict:
    """The demo, writing into ``work``; ``out`` (where ``work`` will be moved) names the files it reports."""
    from sklearn.svm import SVC

    import transfusion_kernels as tk
    from transfusion.checkpoint import load_checkpoint
    from transfusion.outdir import write_marker
    from transfusion.image_io import image_grid, save_png
    from transfusion.runner import build_trainer, warmup_warning
    from transfusion.data import CAPTION_TEMPLATES, WORDS, parse_digit, to_pixels8
    from transfusion.prepare import prepare
    from transfusion.sample import SampleConfig, caption, generate

    t_start = time.perf_counter()
    n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # the model is small: past a few threads, synchronisation costs more than it saves
    torch.set_num_threads(threads or max(1, min(4, n_cores)))
    if quick and steps is None:
        steps = 5
    per_digit_n = 1 if quick else SAMPLES_PER_DIGIT
    timings = {}

    t = time.perf_counter()
    print("preparing the digits data ...", flush=True)
    prepared = prepare(work / "data", image_size=8, vocab_size=256, seed=0, made_by="demo")
    timings["prepare_s"] = time.perf_counter() - t

    cfg = demo_config(prepared.tokenizer.vocab_size, steps, backend)
    planned = cfg.train.steps
    warning = None if quick else warmup_warning(cfg, f"pass --steps {cfg.train.warmup_steps} or more")
    if warning:  # --quick is a smoke test: its few steps are meant
        print(f"transfusion demo: {warning}", file=sys.stderr, flush=True)
    print(
        f"training {planned} steps on {torch.get_num_threads()} threads (time budget {TRAIN_BUDGET_S} s: "
        f"a slower machine trains fewer steps, said when decided) ...",
        flush=True,
    )
    device = torch.device("cpu")
    t = time.perf_counter()
    with tk.use_backend(backend) if backend else contextlib.nullcontext():
        trainer = build_trainer(prepared, cfg, work, device=device)
        hist = trainer.fit(steps=min(PROBE_STEPS, planned), progress=progress)
        per_step = float(np.median([h["step_time"] for h in hist[1:]])) if len(hist) > 2 else 0.0
        if per_step > 0 and planned * per_step > TRAIN_BUDGET_S:
            trainer.set_total_steps(max(len(hist), int(TRAIN_BUDGET_S / per_step)))
            print(
                f"the machine is busy: {per_step:.2f} s a step, so {planned} steps would take "
                f"{planned * per_step:.0f} s, over the {TRAIN_BUDGET_S} s budget; training {cfg.train.steps} "
                "steps instead (cosine schedule shortened to match)",
                flush=True,
            )
        limit = TRAIN_TIME_LIMIT_S - (time.perf_counter() - t)
        hist += trainer.fit(checkpoint_dir=work / "checkpoint", progress=progress, time_limit=limit)
        if trainer.step < cfg.train.steps:
            print(
                f"stopped at step {trainer.step} of {cfg.train.steps}: training reached its "
                f"{TRAIN_TIME_LIMIT_S} s time limit (the machine slowed down further)",
                flush=True,
            )
    timings["train_s"] = time.perf_counter() - t

    # evaluate the checkpoint as written (round trip through safetensors)
    model, _, tok = load_checkpoint(work / "checkpoint", device=device, backend=backend)
    scfg = SampleConfig(
        steps=25 if quick else 50, sampler="ddim", cfg_scale=3.0, image_size=(8, 8), max_new_tokens=8, seed=0
    )
    digits = [d for d in range(10) for _ in range(per_digit_n)]
    prompts = [CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)].format(word=WORDS[d], num=d) for i, d in enumerate(digits)]
    t = time.perf_counter()
    print(
        f"generating {len(prompts)} images ({scfg.sampler}, {scfg.steps} steps, guidance {scfg.cfg_scale}) ...",
        flush=True,
    )
    with tk.use_backend(backend) if backend else contextlib.nullcontext():
        res = generate(model, tok, prompts, scfg, open_image=True, progress=progress)
    timings["generate_s"] = time.perf_counter() - t
    gen = torch.stack([r["images"][0] for r in res])

    t = time.perf_counter()
    clf = SVC(gamma=0.001).fit(to_pixels8(prepared.train_images), prepared.train_labels.numpy())
    pred = clf.predict(to_pixels8(gen))
    gen_acc = float((pred == np.array(digits)).mean())
    clf_real_acc = float((clf.predict(to_pixels8(prepared.test_images)) == prepared.test_labels.numpy()).mean())
    timings["classify_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print("captioning the held-out digits ...", flush=True)
    with tk.use_backend(backend) if backend else contextlib.nullcontext():
        test_x, test_y = prepared.test_latents, prepared.test_labels
        if quick:
            test_x, test_y = test_x[:20], test_y[:20]
        caps = caption(model, tok, test_x, SampleConfig(max_new_tokens=16), progress=progress)
    named = [parse_digit(c) for c in caps]
    cap_acc = float(np.mean([n == int(y) for n, y in zip(named, test_y)]))
    timings["caption_s"] = time.perf_counter() - t

    save_png(image_grid(gen, ncol=per_digit_n), work / "samples_grid.png", scale=8)
    per_digit = {WORDS[d]: float((pred[np.array(digits) == d] == d).mean()) for d in range(10)}
    timings["total_s"] = time.perf_counter() - t_start
    last = hist[-1] if hist else {}
    report = {
        "passed": gen_acc >= GENERATION_BAR and cap_acc >= CAPTION_BAR,
        "generation_accuracy": gen_acc,
        "caption_accuracy": cap_acc,
        "generation": {
            "method": (
                "SVC(gamma=0.001) fitted on the 8x8 pixels of the real training digits "
                "(the split the model trained on) classifies each generated image; accuracy = "
                "fraction classified as the prompted digit"
            ),
            "samples_per_digit": per_digit_n,
            "prompts": "caption templates cycled per sample",
            "per_digit_accuracy": per_digit,
            "sampler": scfg.__dict__,
            "classifier_accuracy_on_real_heldout": clf_real_acc,
        },
        "captioning": {
            "method": (
                "greedy caption of each held-out digit (never trained on) from [BOS][BOI] image [EOI]; "
                "correct when the first digit the caption names (word or numeral) is the label"
            ),
            "n_heldout": len(caps),
            "examples": [{"label": int(y), "caption": c} for c, y in list(zip(caps, test_y))[:10]],
        },
        "training": {
            "steps": trainer.step,
            "planned_steps": planned,
            "scheduled_steps": cfg.train.steps,
            "shortened_for_time": cfg.train.steps < planned,
            "stopped_by_time_limit": trainer.step < cfg.train.steps,
            "budget_s": TRAIN_BUDGET_S,
            "time_limit_s": TRAIN_TIME_LIMIT_S,
            "final": last,
            "config": cfg.to_dict(),
        },
        "timings_s": timings,
        "threads": torch.get_num_threads(),
        "backend": backend or "auto",
        "checkpoint": str(out / "checkpoint"),
        "grid": str(out / "samples_grid.png"),
        "bars": {"generation": GENERATION_BAR, "captioning": CAPTION_BAR},
        "quick": quick,
    }
    (work / "report.json").write_text(json.dumps(report, indent=2))
    write_marker(work, "demo")  # replaces the marker the training wrote: the folder is the demo's
    print(
        f"\ntransfusion demo: {trainer.step} steps, {timings['total_s']:.0f} s total "
        f"(train {timings['train_s']:.0f} s, {torch.get_num_threads()} threads)"
    )
    print(
        f"  generation: {gen_acc:.1%} of {len(gen)} images classified as the prompted digit (bar {GENERATION_BAR:.0%})"
    )
    print(f"  captioning: {cap_acc:.1%} of {len(caps)} held-out digits named correctly (bar {CAPTION_BAR:.0%})")
    if trainer.step < planned:
        print(
            f"  note: the machine was busy: trained {trainer.step} of the planned {planned} steps "
            f"(time budget {TRAIN_BUDGET_S} s); the scores are for that checkpoint"
        )
    print(f"  grid: {out / 'samples_grid.png'}   report: {out / 'report.json'}   checkpoint: {out / 'checkpoint'}")
    return report
