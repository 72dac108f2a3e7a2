"""``transfusion`` command line: prepare, train, sample, caption, bench, demo.

A mistake the user can fix (a bad path, value or file, a device or backend this machine lacks) is
raised as ``UserError`` where it is found, before any heavy work or any file is written, and
``main`` prints it as one line, ``transfusion <command>: error: ...``, with exit status 2
(``--debug`` or ``TRANSFUSION_DEBUG=1``: the traceback). Any other exception is a bug and keeps
its traceback. Ctrl-C prints ``transfusion <command>: interrupted ...`` and exits with 130 (128 +
SIGINT, the shell's convention), after the temporary outputs are removed."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

# Idle OpenMP threads that busy-wait slow a shared CPU down several-fold (measured: 2 threads
# were 10x slower than 1 under load without this). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transfusion.ablate import add_arguments as ablate_arguments
from transfusion.config import Config, UserError, demo_config, paper_config
from transfusion.outdir import check_out, subfolder_with, write_marker

BACKENDS = ("auto", "reference", "triton", "cuda")

# Optional dependencies: the import name, what pip calls it, and the extra that installs it.
EXTRAS = {
    "sentencepiece": ("sentencepiece", "model"),
    "safetensors": ("safetensors", "model"),
    "tqdm": ("tqdm", "model"),
    "PIL": ("pillow", "model"),
    "sklearn": ("scikit-learn", "model"),
    "scipy": ("scipy", "model"),
    "diffusers": ("diffusers", "model"),
    "matplotlib": ("matplotlib", "bench"),
    "triton": ("triton", "triton"),
}
# What each command imports before its work starts (checked first, so a missing one costs nothing).
NEEDS = {
    "prepare": ("sentencepiece", "safetensors", "sklearn", "tqdm"),
    "train": ("sentencepiece", "safetensors", "tqdm"),
    "sample": ("sentencepiece", "safetensors", "tqdm", "PIL"),
    "caption": ("sentencepiece", "safetensors", "tqdm", "PIL"),
    "demo": ("sentencepiece", "safetensors", "sklearn", "tqdm", "PIL"),
    "ablate": ("sentencepiece", "safetensors", "sklearn", "scipy", "tqdm"),
    "bench": (),
}


def missing_dependency(name: str) -> str:
    """The one-line fix for a missing optional module ``name``."""
    pip, extra = EXTRAS[name]
    return (
        f"{pip}, which is not installed: pip install 'transfusion-kernels[{extra}]' (in a checkout: "
        f"pip install -e '.[{extra}]')"
    )


def _check_dependencies(args) -> None:
    import importlib

    needs = list(NEEDS.get(args.cmd, ()))
    if getattr(args, "vae", None):
        needs.append("diffusers")
    for name in needs:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"`transfusion {args.cmd}` needs {missing_dependency(name)}") from e


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


def _device(name: str | None):
    """The torch device ``--device`` names (default: the GPU if one is visible), checked to exist."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _require(
            (dev.index or 0) < n,
            f"--device {name}: torch sees {n} CUDA devices here; use --device cpu, or leave --device out",
        )
    return dev


def _check_backend(name: str | None, device) -> None:
    """UserError when ``--backend`` cannot run on ``device`` here (checked before any work)."""
    if name and name != "auto":
        import transfusion_kernels as tk

        info = tk.available_backends(device)[name]
        if name == "triton" and not info.available and "not importable" in info.reason:
            raise UserError(
                f"--backend triton needs {missing_dependency('triton')}; or use --backend auto or reference"
            )
        _require(
            info.available,
            f"--backend {name} cannot run on {device.type}: {info.reason}; use --backend auto or reference",
        )


def _backend_ctx(args):
    import transfusion_kernels as tk

    return tk.use_backend(args.backend) if args.backend else contextlib.nullcontext()


def _progress(args) -> bool:
    """Progress bars: on a terminal only (a log file or pipe would get their escape codes), and
    not with --quiet."""
    return not args.quiet and sys.stderr.isatty()


def _threads(args):
    import torch

    if getattr(args, "threads", None) is not None:
        _require(args.threads >= 1, f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


# -- prepare ---------------------------------------------------------------------------------
def cmd_prepare(args) -> int:
    from transfusion.prepare import prepare

    p = prepare(
        args.out,
        image_size=args.image_size,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        vae=args.vae,
        holdout_fraction=args.holdout,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(json.dumps(p.info, indent=2))
    print(f"prepared {args.out}")
    return 0


# -- train -----------------------------------------------------------------------------------
RUN_FILES = {"checkpoint", "metrics.jsonl"}
SAMPLE_FILES = ("sample_*.png", "grid.png", "samples.json")


def _is_legacy_run(d: Path) -> bool:
    """A run folder written before output markers existed: nothing but train's own files."""
    return {p.name for p in d.iterdir()} <= RUN_FILES


def _is_legacy_samples(d: Path) -> bool:
    return all(any(p.match(g) for g in SAMPLE_FILES) for p in d.iterdir())


def cmd_train(args) -> int:
    import shutil

    from transfusion.latents import make_latents
    from transfusion.prepare import load_prepared
    from transfusion.runner import build_config, run_training, warmup_warning

    out = Path(args.out)
    _check_recipe_args(args)
    check_out(out, "train", args.overwrite or args.resume, also=", --resume", legacy=_is_legacy_run)
    if args.distributed:
        from transfusion.distributed import train as train_distributed

        return train_distributed(args, args.distributed)

    _threads(args)
    device = _device(args.device)
    _check_backend(args.backend, device)
    try:
        prepared = load_prepared(args.data)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    cfg = build_config(prepared.info, args)
    warning = warmup_warning(cfg)
    if warning:
        print(f"transfusion train: {warning}", file=sys.stderr)
    latents = None
    if prepared.info["latents"] == "vae":
        latents = make_latents(str(Path(args.data) / "vae"), device=device)
    new_folder = not out.exists()
    if args.overwrite and not args.resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # checkpoint/ is replaced at the first save
    try:
        with _backend_ctx(args):
            trainer, hist = run_training(
                prepared, cfg, out, device=device, resume=args.resume, progress=_progress(args), latents=latents
            )
    except KeyboardInterrupt:
        if not (out / "checkpoint" / "trainer_state.json").is_file():
            if new_folder:  # Ctrl-C before any checkpoint: no run folder stays behind
                shutil.rmtree(out, ignore_errors=True)
            raise
        _close_bars()
        step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
        print(
            f"transfusion train: interrupted; kept the checkpoint of step {step} in {out / 'checkpoint'}; "
            f"continue with: {resume_command(args)}",
            file=sys.stderr,
        )
        return 130
    except BaseException:  # an error before any checkpoint: no run folder stays behind
        if new_folder and not (out / "checkpoint").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    if hist:
        last = hist[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f} (lm {last['lm_loss']:.4f}, ddpm {last['ddpm_loss']:.4f})")
    print(f"checkpoint: {out / 'checkpoint'}")
    return 0


DIFFUSION_TRAIN_OPTIONS = ("objective", "diffusion_weight", "image_encoder")
DIFFUSION_SAMPLE_OPTIONS = ("steps", "sampler", "eta")


def _check_recipe_args(args) -> None:
    """UserError for options the chosen image recipe has no use for (``--image-recipe``, or the
    ``--config`` file's ``model.image_recipe``)."""
    from transfusion.runner import read_config_file

    recipe = args.image_recipe or (read_config_file(args.config).model.image_recipe if args.config else "continuous")
    if recipe != "discrete":
        _require(
            args.codebook_size is None,
            "--codebook-size applies to --image-recipe discrete only; add it or leave --codebook-size out",
        )
        return
    given = [f"--{n.replace('_', '-')}" for n in DIFFUSION_TRAIN_OPTIONS if getattr(args, n) is not None]
    _require(
        not given,
        f"{', '.join(given)} set{'s' * (len(given) == 1)} the continuous image recipe's diffusion side; "
        "the discrete recipe has none (images are codes, trained with the LM loss): leave "
        f"{'it' if len(given) == 1 else 'them'} out, or drop --image-recipe discrete",
    )
    _require(
        not args.distributed,
        "--distributed trains the continuous image recipe only; train --image-recipe discrete in one process",
    )


def resume_command(args) -> str:
    """The command line that continues this training run: the same options, --resume instead of
    --overwrite."""
    argv = [a for a in args.argv if a != "--overwrite"]
    return shlex.join(["transfusion", *argv, *([] if "--resume" in argv else ["--resume"])])


def _close_bars() -> None:
    """End the open progress bars' lines, so a message after them starts on its own line.
    Innermost first: a nested bar's close moves the cursor up to its parent's line and leaves it
    mid-line, and only the outermost bar's close returns it to the first column."""
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()))
    for bar in sorted(bars, key=lambda b: -abs(getattr(b, "pos", 0) or 0)):
        bar.close()


# -- sampling --------------------------------------------------------------------------------
def _check_sampling_args(args) -> None:
    for name, low in (
        ("steps", 1),
        ("max_new_tokens", 0),
        ("max_images", 0),
        ("image_size", 1),
        ("temperature", 0),
        ("image_temperature", 0),
        ("eta", 0),
        ("num_images", 1),
        ("png_scale", 1),
    ):
        v = getattr(args, name, None)
        _require(v is None or v >= low, f"--{name.replace('_', '-')} must be >= {low}, got {v}")


def _load(args):
    """Model, config, tokenizer, latents and device of ``--checkpoint``, after the sampling
    options are checked."""
    from transfusion.checkpoint import load_checkpoint
    from transfusion.latents import make_latents

    _threads(args)
    _check_sampling_args(args)
    device = _device(args.device)
    _check_backend(args.backend, device)
    ckpt = Path(args.checkpoint)
    inner = None if (ckpt / "config.json").is_file() else subfolder_with(ckpt, "config.json")
    _require(inner is None, f"--checkpoint {ckpt} has no config.json but {inner} does: pass --checkpoint {inner}")
    try:
        model, cfg, tok = load_checkpoint(args.checkpoint, device=device, backend=args.backend, use_ema=not args.no_ema)
        latents = make_latents(cfg.data.latents, cfg.model.latent_channels, device, checkpoint_dir=args.checkpoint)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{e}; pass --checkpoint a complete checkpoint folder (RUN/checkpoint, written by `transfusion train`)"
        ) from e
    return model, cfg, tok, latents, device


def _sample_cfg(args, cfg, latents):
    """The SampleConfig of the command line; ``--steps`` and ``--sampler`` default to the
    checkpoint's sampling defaults (``cfg.sample``), options caption lacks to SampleConfig's."""
    from transfusion.objective import SAMPLERS, check_sampler
    from transfusion.sample import SampleConfig

    base = SampleConfig()
    given = getattr(args, "_given", set())
    if cfg.model.discrete_images:
        wrong = [f"--{n.replace('_', '-')}" for n in DIFFUSION_SAMPLE_OPTIONS if n in given]
        wrong += ["--clip-sample"] if getattr(args, "clip_sample", False) else []
        _require(
            not wrong,
            f"{', '.join(wrong)}: this checkpoint's images are discrete codes sampled token by token, "
            "not denoised; leave the diffusion options out (--image-temperature sets the codes' temperature)",
        )
    else:
        _require(
            "image_temperature" not in given,
            "--image-temperature applies to a discrete-recipe checkpoint (its image codes); this one denoises "
            "its images: leave it out",
        )
    opt = {
        name: getattr(args, name, getattr(base, name))
        for name in ("eta", "cfg_scale", "max_images", "clip_sample", "image_temperature")
    }
    steps = args.steps if getattr(args, "steps", None) is not None else cfg.sample.steps
    sampler = getattr(args, "sampler", None) or cfg.sample.sampler or SAMPLERS[cfg.model.objective][0]
    if getattr(args, "sampler", None) is not None:
        try:
            check_sampler(cfg.model, sampler, "--sampler")
        except ValueError as e:
            raise UserError(str(e)) from e
    T = cfg.model.num_train_timesteps
    _require(
        steps <= T, f"--steps {steps} is more than the {T} timesteps the model was trained on; use --steps {T} or fewer"
    )
    trained = cfg.data.image_size
    size = getattr(args, "image_size", None) or trained
    lat = size // latents.downsample
    k = cfg.model.patch_size
    _require(
        size % latents.downsample == 0 and lat % k == 0,
        f"--image-size {size} does not fit the model: it must be a multiple of "
        f"{latents.downsample * k} (latent downsampling {latents.downsample} x patch size {k})",
    )
    _require(
        size == trained,
        f"--image-size {size}: this model was trained on {trained}x{trained} images only "
        f"and other sizes come out as noise; leave --image-size out (or pass {trained})",
    )
    return SampleConfig(
        steps=steps,
        sampler=sampler,
        image_size=(lat, lat),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        **opt,
    )


def cmd_sample(args) -> int:
    from transfusion.checkpoint import atomic_path

    out = Path(args.out)
    check_out(out, "sample", args.overwrite, legacy=_is_legacy_samples)
    model, cfg, tok, latents, device = _load(args)
    scfg = _sample_cfg(args, cfg, latents)
    if out.is_dir():  # --overwrite: the new files go into a temporary folder, then replace the old ones
        import shutil

        tmp = out / f".sample.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            n = _write_samples(args, model, tok, latents, device, scfg, tmp)
            for old in [p for g in SAMPLE_FILES for p in out.glob(g)]:
                old.unlink(missing_ok=True)
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        with atomic_path(out, directory=True) as tmp:
            n = _write_samples(args, model, tok, latents, device, scfg, tmp)
    print(f"wrote {n} images and samples.json to {out}")
    return 0


def _write_samples(args, model, tok, latents, device, scfg, out: Path) -> int:
    import torch

    from transfusion.image_io import image_grid, save_png
    from transfusion.sample import generate

    prompts = [prompt for prompt in args.prompt for _ in range(args.num_images)]  # one set per --prompt
    with _backend_ctx(args):
        res = generate(model, tok, prompts, scfg, open_image=not args.free, progress=_progress(args))
    records, all_imgs = [], []
    for i, r in enumerate(res):
        segs, files = [], []
        for kind, v in r["segments"]:
            if kind == "image":
                img = latents.decode(v[None].to(device))[0].cpu()
                name = f"sample_{i:03d}_{len(files)}.png"
                save_png(img, out / name, args.png_scale)
                files.append(name)
                all_imgs.append(img)
                segs.append({"image": name})
            else:
                segs.append({"text": v})
        text = " ".join(f"<image:{s['image']}>" if "image" in s else s["text"] for s in segs).strip()
        records.append({"prompt": prompts[i], "text": text, "images": files, "segments": segs})
    grid_name = None
    shapes = {tuple(x.shape) for x in all_imgs}
    if all_imgs and len(shapes) == 1:
        grid_name = "grid.png"
        # a row per prompt when each sequence made one image; else rows of up to 8
        ncol = args.num_images if len(args.prompt) > 1 and len(all_imgs) == len(records) else min(8, len(all_imgs))
        save_png(image_grid(torch.stack(all_imgs), ncol=ncol), out / grid_name, args.png_scale)
    summary = {"checkpoint": str(args.checkpoint), "sampler": scfg.__dict__, "grid": grid_name, "samples": records}
    (out / "samples.json").write_text(json.dumps(summary, indent=2))
    write_marker(out, "sample")
    for r in records:
        print(r["text"])
    return len(all_imgs)


def _is_grid(p: Path) -> bool:
    """The grid image ``sample`` or ``demo`` writes beside its samples."""
    return (p.name == "grid.png" and (p.parent / "samples.json").is_file()) or (
        p.name == "samples_grid.png" and (p.parent / "report.json").is_file()
    )


def cmd_caption(args) -> int:
    import torch

    from transfusion.image_io import border_mean, load_png
    from transfusion.sample import caption

    from PIL import Image

    grids = [p for p in args.images if _is_grid(Path(p))]
    if grids:  # `caption out/*.png` names the grid of the samples too: it is not one image
        args.images = [p for p in args.images if p not in grids]
        _require(
            bool(args.images),
            f"{', '.join(grids)}: a grid of samples, not one image, so nothing is left "
            "to caption; pass the sample_*.png files",
        )
        print(
            f"transfusion caption: note: skipped {', '.join(grids)}: a grid of samples, not one image", file=sys.stderr
        )
    bad = []
    for p in args.images:  # every file, before the model is loaded
        try:
            with Image.open(p) as im:
                im.verify()
        except OSError as e:  # missing, unreadable, or not an image (PIL.UnidentifiedImageError)
            bad.append(f"{p} ({e.strerror or 'not an image file'})")
    if bad:
        raise UserError(
            f"{len(bad)} of {len(args.images)} files cannot be read as images: {', '.join(bad)}; "
            "pass PNG or other image files (nothing was captioned)"
        )
    model, cfg, tok, latents, device = _load(args)
    scfg = _sample_cfg(args, cfg, latents)
    size = cfg.data.image_size
    imgs = torch.stack(
        [load_png(p, size, getattr(latents, "in_channels", cfg.model.latent_channels)) for p in args.images]
    )
    if latents.kind == "pixel":  # the digits are light ink on a dark ground
        for p, x in zip(args.images, imgs):
            if border_mean(x) > 0:
                x.neg_()
                print(
                    f"transfusion caption: note: {p} has a light background; captioned inverted "
                    "(light on dark, as the model was trained)",
                    file=sys.stderr,
                )
    z = latents.encode(imgs.to(device)) if latents.kind == "vae" else imgs.to(device)
    with _backend_ctx(args):
        caps = caption(model, tok, z, scfg, progress=_progress(args))
    for p, c in zip(args.images, caps):
        print(f"{p}\t{c}")
    return 0


# -- bench / demo ----------------------------------------------------------------------------
def cmd_bench(args) -> int:
    """The benchmark driver in the current directory (results go under it, or --root): the
    installed ``transfusion_kernels_bench``, or ``benchmarks`` beside this package in a checkout."""
    import importlib.util

    env = dict(os.environ)
    env["TK_BENCH_COMMAND"] = args.command  # recorded in the results as the command that made them
    if args.backend:
        env["TRANSFUSION_KERNELS_BACKEND"] = args.backend
    module = "transfusion_kernels_bench"
    checkout = Path(__file__).resolve().parent.parent
    if importlib.util.find_spec(module) is None and (checkout / "benchmarks" / "__main__.py").is_file():
        module = "benchmarks"
        env["PYTHONPATH"] = os.pathsep.join([str(checkout)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.call([sys.executable, "-m", module, *args.rest], env=env)


def cmd_demo(args) -> int:
    from transfusion.demo import run_demo

    check_out(
        args.out,
        "demo",
        args.overwrite,
        legacy=lambda d: (d / "report.json").is_file() and (d / "samples_grid.png").is_file(),
    )
    _require(args.threads is None or args.threads >= 1, f"--threads must be >= 1, got {args.threads}")
    _require(args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    report = run_demo(
        args.out,
        backend=args.backend,
        threads=args.threads,
        steps=args.steps,
        quick=args.quick,
        progress=_progress(args),
    )
    return 0 if report["passed"] or args.quick else 2


def cmd_ablate(args) -> int:
    from transfusion.ablate import run

    if args.backend:  # the grid's worker processes read it from the environment
        os.environ["TRANSFUSION_KERNELS_BACKEND"] = args.backend
    return run(args)


# -- parser ----------------------------------------------------------------------------------
DESCRIPTION = """Prepare data, train, sample and caption with a small Transfusion model, run the kernel
benchmarks, or the whole CPU demo. A mistake the user can fix is printed as one line,
'transfusion <command>: error: ...', with exit status 2 (--debug: the traceback); Ctrl-C prints
'transfusion <command>: interrupted' and exits with 130. Outputs are written under a temporary name
beside their final one and moved into place when complete, so a failed or interrupted command
leaves nothing half-written."""


def _text_args(p):
    """Options of LM-mode decoding and of loading a checkpoint (sample and caption)."""
    p.add_argument(
        "--max-new-tokens", type=int, default=32, help="most text tokens generated per sequence (default 32)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="text sampling temperature; 0: greedy (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars on stderr (shown only when stderr is a terminal)"
    )


def _diffusion_args(p):
    """Options of diffusion-mode sampling (sample only: captioning never denoises)."""
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: the checkpoint's sampling default, 50 or the paper preset's 250)",
    )
    p.add_argument(
        "--sampler",
        choices=("ddim", "ddpm", "euler"),
        default=None,
        help="denoising update: ddim or ddpm for a DDPM model, euler for a flow model (default: the "
        "checkpoint's sampling default: ddim, the paper preset's ddpm, euler for flow)",
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta; 0: deterministic (default 0)")
    p.add_argument(
        "--image-temperature",
        type=float,
        default=1.0,
        help="a discrete-recipe checkpoint's image codes are sampled at this temperature; 0: greedy (default 1)",
    )
    p.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale; 1: off (default 3)")
    p.add_argument("--clip-sample", action="store_true", help="clip the predicted clean image to [-1, 1]")
    p.add_argument("--max-images", type=int, default=1, help="most images per generated sequence (default 1)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="pixel size of generated images; must be the trained size (default: the trained size)",
    )


def _quiet(p):
    p.add_argument(
        "--quiet",
        "--no-progress",
        dest="quiet",
        action="store_true",
        help="no progress bars on stderr (shown only when stderr is a terminal; --no-progress: the same)",
    )


def _overwrite(p, what):
    p.add_argument("--overwrite", action="store_true", help=f"replace a non-empty --out ({what})")


def version_text() -> str:
    """Version, commit and the CUDA extension's archs and CUDA version (or why it is missing)."""
    import transfusion_kernels as tk

    info = tk.build_info()
    cuda = info["cuda_extension"]
    ext = (
        f"CUDA extension built for {','.join(cuda['archs'])} with CUDA {cuda['cuda_version']}"
        if cuda["built"]
        else f"no CUDA extension: {cuda['reason']}"
    )
    return f"transfusion-kernels {info['version']} (commit {info['commit'] or 'unknown'})\n{ext}"


class _StoreOnce(argparse._StoreAction):
    """The default store action, refusing a second value: ``--steps 5 --steps 50`` is a mistake
    to name, not a value to drop silently."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(
                f"{option_string} was given twice (first {getattr(namespace, self.dest)!r}, then {values!r}); "
                "give it once"
            )
        given.add(self.dest)
        setattr(namespace, self.dest, values)


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version, commit and CUDA build, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="transfusion", description=DESCRIPTION)
    ap.add_argument("--version", action=_Version)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", help="one of:")

    def add(name, help):
        p = sub.add_parser(name, help=help, description=help)
        p.register("action", None, _StoreOnce)  # every option that takes one value
        p.register("action", "store", _StoreOnce)
        p.add_argument(
            "--backend",
            choices=BACKENDS,
            default=None,
            help="kernel backend for every op (default: TRANSFUSION_KERNELS_BACKEND or auto)",
        )
        p.add_argument(
            "--debug", action="store_true", help="show the traceback of an error (also: TRANSFUSION_DEBUG=1)"
        )
        return p

    p = add("prepare", "build the digits data set and tokenizer")
    p.add_argument("--out", required=True, help="data folder to write")
    _overwrite(p, "the whole folder")
    p.add_argument("--image-size", type=int, default=8, help="pixel size of the images (default 8: the digits' own)")
    p.add_argument("--vocab-size", type=int, default=256, help="SentencePiece vocabulary to train (default 256)")
    p.add_argument("--tokenizer", default=None, help="use this SentencePiece .model instead of training one")
    p.add_argument("--vae", default=None, help="local folder with a diffusers AutoencoderKL (default: pixel space)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of digits held out of training (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, corpus and tokenizer (default 0)")
    p.set_defaults(fn=cmd_prepare)

    p = add("train", "train a model on prepared data")
    p.add_argument("--data", required=True, help="folder written by `transfusion prepare`")
    p.add_argument("--out", required=True, help="run folder: checkpoint/ and metrics.jsonl")
    _overwrite(p, "its checkpoint/ and metrics.jsonl")
    p.add_argument("--config", default=None, help="JSON config (model/data/train/sample sections) to start from")
    p.add_argument(
        "--preset",
        choices=("default", "paper", "demo"),
        default="default",
        help="starting config when no --config: the library defaults, the paper's stated values "
        "(docs/model.md), or the CPU demo's settings (default: default)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if it exists")
    presets = {"default": Config(), "paper": paper_config(1), "demo": demo_config(1)}

    def preset_default(what, section, field):
        vals = ", ".join(f"{k} {getattr(getattr(c, section), field)}" for k, c in presets.items())
        return f"{what} (default: --config's, else the preset's: {vals})"

    for name, typ, what, section, field in (
        ("steps", int, "training steps", "train", "steps"),
        ("lr", float, "peak learning rate", "train", "lr"),
        ("dim", int, "model width", "model", "dim"),
        ("layers", int, "transformer layers", "model", "n_layers"),
        ("heads", int, "attention heads", "model", "n_heads"),
        ("patch-size", int, "latent pixels per patch side; must divide the latent size", "model", "patch_size"),
        ("docs-per-batch", int, "documents per batch", "data", "docs_per_batch"),
        ("seed", int, "training seed", "train", "seed"),
        ("ema-decay", float, "keep an EMA of the weights with this decay", "train", "ema_decay"),
        ("diffusion-weight", float, "lambda in L_LM + lambda * L_DDPM", "train", "diffusion_weight"),
        ("warmup-steps", int, "linear warmup steps", "train", "warmup_steps"),
        ("save-every", int, "checkpoint every N steps; 0: only at the end", "train", "save_every"),
    ):
        p.add_argument(f"--{name}", type=typ, default=None, help=preset_default(what, section, field))
    p.add_argument(
        "--image-encoder",
        choices=("linear", "unet"),
        default=None,
        help=preset_default("patch encoder and decoder", "model", "image_encoder"),
    )
    p.add_argument(
        "--objective",
        choices=("ddpm", "flow"),
        default=None,
        help=preset_default(
            "image objective: the paper's DDPM noise prediction, or flow matching "
            "(velocity prediction, sampled with Euler steps)",
            "model",
            "objective",
        ),
    )
    p.add_argument(
        "--image-recipe",
        choices=("continuous", "discrete"),
        default=None,
        help="images as continuous latent patches with the diffusion loss (Transfusion), or as the codes of a "
        "k-means codebook over --patch-size patches of the training images, LM loss only (Chameleon-style) "
        "(default: --config's, else continuous)",
    )
    p.add_argument(
        "--codebook-size",
        type=int,
        default=None,
        help="codes of the discrete recipe's codebook, added to the vocabulary (default: --config's, else 256)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _quiet(p)
    p.add_argument(
        "--distributed",
        choices=("ddp", "fsdp"),
        default=None,
        help="data-parallel training under torchrun: torchrun --nproc-per-node N -m transfusion train ... "
        "(default: one process)",
    )
    p.set_defaults(fn=cmd_train)

    p = add("sample", "generate images (and text) from a prompt")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (RUN/checkpoint)")
    p.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="the text to continue; give it several times for several prompts (--num-images each)",
    )
    p.add_argument("--num-images", type=int, default=4, help="number of samples of each prompt (default 4)")
    p.add_argument("--out", required=True, help="folder for sample_*.png, grid.png and samples.json")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing its sample_*.png, grid.png and samples.json",
    )
    p.add_argument(
        "--free",
        action="store_true",
        help="let the model decide whether to open an image (default: BOI follows the prompt)",
    )
    p.add_argument("--png-scale", type=int, default=8, help="nearest-neighbour upscale of written PNGs (default 8)")
    _diffusion_args(p)
    _text_args(p)
    p.set_defaults(fn=cmd_sample)

    p = add("caption", "caption images")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (RUN/checkpoint)")
    p.add_argument("images", nargs="+", help="image files (PNG or any format PIL reads)")
    _text_args(p)
    p.set_defaults(fn=cmd_caption)

    p = add(
        "bench",
        "run the kernel benchmarks (python -m transfusion_kernels_bench); other arguments go to it, e.g. --smoke, "
        "--root DIR (results folder; default benchmarks/results under the current directory)",
    )
    p.add_argument("rest", nargs="*", help="arguments passed to the benchmarks")
    p.set_defaults(fn=cmd_bench)

    p = add("demo", "prepare, train, sample and evaluate on the digits data (CPU, minutes)")
    p.add_argument(
        "--out", required=True, help="folder for data/, checkpoint/, metrics.jsonl, samples_grid.png, report.json"
    )
    _overwrite(p, "the whole folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the number of cores, at most 4)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 1000; 5 with --quick)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test; quality bars not expected)")
    _quiet(p)
    p.set_defaults(fn=cmd_demo)

    p = add(
        "ablate",
        "the paper's ablations at small scale on the digits: a grid of variants x seeds, "
        "trained and scored alike (docs/ablations.md)",
    )
    ablate_arguments(p)
    p.set_defaults(fn=cmd_ablate)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and not {"-h", "--help"} & set(argv[1:]):
        # everything but --backend goes, in order, to the benchmark driver
        bp = argparse.ArgumentParser(prog="transfusion bench", add_help=False)
        bp.register("action", None, _StoreOnce)
        bp.add_argument("--backend", choices=BACKENDS, default=None)
        args, rest = bp.parse_known_args(argv[1:])
        args.rest = [a for a in rest if a != "--"]
        args.command = shlex.join(["transfusion", *argv])
        return cmd_bench(args)
    ap = parser()
    args, unknown = ap.parse_known_args(argv)
    args.argv = argv
    if unknown:  # reported by the command's own parser, with its usage
        subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices
        subs[args.cmd].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        _check_dependencies(args)
        try:
            return args.fn(args)
        except ModuleNotFoundError as e:  # an optional module only some paths import (diffusers for a VAE)
            top = (e.name or "").split(".")[0]
            if top not in EXTRAS:
                raise
            raise UserError(f"`transfusion {args.cmd}` needs {missing_dependency(top)}") from e
    except KeyboardInterrupt:
        if args.debug or os.environ.get("TRANSFUSION_DEBUG") == "1":
            raise
        _close_bars()
        print(f"transfusion {args.cmd}: interrupted; no half-written output was left", file=sys.stderr)
        return 130
    except UserError as e:
        if args.debug or os.environ.get("TRANSFUSION_DEBUG") == "1":
            raise
        msg = " ".join(str(e).split())
        print(f"transfusion {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
