"""``transfusion ablate``: the harness (quick grid end to end, resume, argument errors) and the
Frechet distance against an independent float64 computation. No claims about the ablations."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from transfusion import ablate
from transfusion.config import UserError


def test_frechet_distance_matches_float64_oracle():
    rng = np.random.default_rng()
    for n, d in ((50, 3), (200, 8), (40, 1)):
        a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        b = rng.normal(loc=0.5, size=(n + 7, d)) @ rng.normal(size=(d, d))
        sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
        # tr((Sa Sb)^1/2) = tr((Sa^1/2 Sb Sa^1/2)^1/2), a symmetric root via eigh
        w, v = np.linalg.eigh(sa)
        ra = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
        inner = np.linalg.eigvalsh(ra @ sb @ ra)
        want = (
            ((a.mean(0) - b.mean(0)) ** 2).sum()
            + np.trace(sa)
            + np.trace(sb)
            - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
        )
        assert ablate.frechet_distance(a, b) == pytest.approx(want, rel=1e-6, abs=1e-9)
    x = rng.normal(size=(30, 4))
    assert ablate.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_variants_are_distinct_and_cover_the_groups():
    names = [v.name for v in ablate.VARIANTS]
    assert len(names) == len(set(names))
    base = ablate.baseline_config(256, 10)
    # a shared config is one run (budgeted variants: their steps follow from the budget)
    cfgs = [(ablate.variant_config(base, v, 0).to_dict(), v.budget) for v in ablate.VARIANTS]
    assert all(cfgs.count(c) == 1 for c in cfgs)
    assert base.model.patch_size == 4 and base.model.image_attention == "bidirectional"
    assert {g for v in ablate.VARIANTS for g in v.groups} == {
        "attention",
        "encoder",
        "noise_cap",
        "lambda",
        "objective",
        "chameleon",
    }
    c = ablate.variant_config(base, ablate.VARIANTS[0], 2)
    assert c.train.seed == c.data.seed == 2
    opt_in = [v.name for v in ablate.VARIANTS if not v.in_grid]  # --only or --group
    assert opt_in[:2] == ["linear_p1", "unet_p1"]
    assert sorted(opt_in[2:]) == sorted(f"{r}_{b}" for r in ("transfusion", "chameleon") for b in ablate.BUDGET_NAMES)
    demo = ablate.baseline_config(256, 10, "demo")
    assert (demo.model.dim, demo.data.docs_per_batch, base.model.dim, base.data.docs_per_batch) == (128, 64, 64, 32)


def _args(out, *extra):
    import argparse

    p = argparse.ArgumentParser()
    ablate.add_arguments(p)
    return p.parse_args(["--out", str(out), *extra])


def test_quick_grid_writes_results_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "abl"
    capsys.readouterr()
    assert ablate.run(_args(out, "--quick", "--jobs", "1", "--threads", "1", "--quiet")) == 0
    quiet = capsys.readouterr()  # --quiet: no progress, but where the results went
    assert quiet.err == "" and quiet.out.startswith("transfusion ablate: 3 runs in ")
    runs = sorted((out / "runs").glob("*.json"))
    assert [p.name for p in runs] == [f"{n}__seed0.json" for n in sorted(ablate.QUICK["variants"])]
    for p in runs:
        r = json.loads(p.read_text())
        assert r["quick"] is True and r["seed"] == 0 and r["training"]["steps"] == ablate.QUICK["steps"]
        assert r["command"] and "commit" in r["commit"] and r["wall_s"]["total"] > 0
        for s in ablate.QUICK["step_counts"]:
            g = r["metrics"]["generation"][str(s)]
            assert 0.0 <= g["accuracy"] <= 1.0 and g["fd"] >= 0.0
        assert r["metrics"]["caption_n"] == ablate.QUICK["caption_n"]
        assert r["metrics"]["text_perplexity"] > 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == set(ablate.QUICK["variants"])
    assert summary["floors"]["fd_real_train_vs_heldout"] >= 0.0
    table = (out / "summary.md").read_text()
    for group in summary["groups"]:
        assert f"## {group}" in table
        assert (out / f"{group}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| causal_p2 | 1 |" in table
    assert quiet.out.rstrip().endswith(
        f"(0 already done); results in {out}: runs/, summary.md, summary.json, {len(summary['groups'])} plots (*.png)"
    )

    # a second call finds every run done and only rewrites the table; without matplotlib it says
    # so before any run, and writes the summary without plots
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    for png in out.glob("*.png"):
        png.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert ablate.run(_args(out, "--quick", "--jobs", "1", "--threads", "1")) == 0
    cap = capsys.readouterr()
    assert cap.err.startswith(
        "transfusion ablate: note: matplotlib is not installed, so summary.md and "
        "summary.json are written without plots; pip install 'transfusion-kernels[bench]'"
    )
    assert "0 runs to do, 3 already done" in cap.err
    assert cap.out.rstrip().endswith(
        "(3 already done); results in "
        + str(out)
        + ": runs/, summary.md, summary.json; no plots (matplotlib is not installed)"
    )
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps and not list(out.glob("*.png"))

    # results made with other settings are not silently mixed in
    with pytest.raises(UserError, match="other settings"):
        ablate.run(_args(out, "--quick", "--steps", "4", "--quiet"))


def test_default_grid_and_opt_in_variants(tmp_path):
    pool, seeds, ev = ablate.plan(_args(tmp_path / "o"))
    assert [v.name for v in pool] == [v.name for v in ablate.VARIANTS if v.in_grid]
    assert seeds == [0, 1, 2] and ev["steps"] == ablate.TRAIN_STEPS and ev["caption_n"] is None
    pool, _, _ = ablate.plan(_args(tmp_path / "o", "--only", "unet_p1,baseline"))
    assert [v.name for v in pool] == ["baseline", "unet_p1"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--seeds", "0"), "--seeds must be >= 1"),
        (("--jobs", "0"), "--jobs must be >= 1"),
        (("--steps", "0"), "--steps must be >= 1"),
        (("--threads", "0"), "--threads must be >= 1"),
        (("--only", "baseline,nope"), "unknown variant nope"),
        (("--only", ","), "unknown variant"),
        (("--group", "nope"), "unknown group 'nope'"),
        (("--group", "chameleon", "--only", "baseline"), "give one of them"),
        (("--group", "chameleon", "--steps", "5"), "--steps does not apply to transfusion_1x"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, extra, match):
    with pytest.raises(UserError, match=match) as e:
        ablate.run(_args(tmp_path / "o", *extra))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    assert ablate.main(["--out", str(f), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transfusion ablate: error: --out") and "\n" not in err


COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "ablations"


def test_judge_applies_the_two_standard_error_rule():
    a, b = {"mean": 0.876, "std": 0.124, "n": 5}, {"mean": 0.743, "std": 0.015, "n": 3}
    se = ((0.124**2 / 5) + (0.015**2 / 3)) ** 0.5  # 0.0561
    r = ablate.judge(a, b, ">")
    assert r["se"] == pytest.approx(se) and r["z"] == pytest.approx(0.133 / se) and r["differs"]
    assert r["verdict"] == "agrees" and ablate.judge(a, b, "<")["verdict"] == "disagrees"
    assert ablate.judge(a, b, None)["verdict"] == "differs"
    close = {"mean": 0.85, "std": 0.124, "n": 5}
    assert ablate.judge(a, close, ">")["verdict"] == "unresolved"
    assert ablate.judge(a, close, None)["verdict"] == "within noise"
    tight = {"mean": 0.5, "std": 0.001, "n": 10}
    assert ablate.judge(tight, {"mean": 0.502, "std": 0.001, "n": 10}, "small:0.01")["verdict"] == "agrees"
    assert ablate.judge(tight, {"mean": 0.6, "std": 0.001, "n": 10}, "small:0.01")["verdict"] == "disagrees"
    assert ablate.judge(tight, close, "small:0.01")["verdict"] == "disagrees"
    assert ablate.judge(a, close, "small:0.01")["verdict"] == "unresolved"


def test_committed_verdicts_recompute_from_the_run_jsons():
    """The committed summary and docs/ablations.md state exactly the verdicts the rule gives on
    the committed runs: the text cannot say more than the numbers."""
    variants = ablate.variant_stats(ablate.load_runs(COMMITTED))
    rows = ablate.verdicts(variants)
    # every comparison of the grid has its two variants committed (the chameleon group's are
    # committed apart: test_chameleon.py)
    assert len(rows) == len([v for v in ablate.VERDICTS if v.group != "chameleon"])
    summary = json.loads((COMMITTED / "summary.json").read_text())
    assert summary["variants"] == variants
    assert [(r["what"], r["verdict"]) for r in summary["verdicts"]] == [(r["what"], r["verdict"]) for r in rows]
    table = (COMMITTED / "summary.md").read_text()
    docs = (COMMITTED.parents[2] / "docs" / "ablations.md").read_text()
    for r in rows:
        line = ablate.verdict_line(r)
        assert line in table and line in docs, line
    # the rows the issue found overstated, as the rule has them
    by = {r["what"]: r for r in rows}
    assert by["linear encoder, patch 2 vs patch 4, generation"]["differs"]
    assert by["noise cap vs none, generation (paper: under 1% apart)"]["verdict"] == "unresolved"
