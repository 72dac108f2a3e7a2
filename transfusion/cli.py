"""``transfusion`` command line: prepare, train, sample, caption, bench, demo.

A mistake the user can fix (a bad path, value or file, a device or backend this machine lacks) is
raised as ``UserError`` where it is found, before any heavy work or any file is written, and
``main`` prints it as one line, ``transfusion <command>: error: ...``, with exit status 2
(``--debug`` or ``TRANSFUSION_DEBUG=1``: the traceback). Any other exception is a bug and keeps
its traceback."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

# Idle OpenMP threads that busy-wait slow a shared CPU down several-fold (measured: 2 threads
# were 10x slower than 1 under load without this). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transfusion.config import UserError

BACKENDS = ("auto", "reference", "triton", "cuda")


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
        _require((dev.index or 0) < n, f"--device {name}: torch sees {n} CUDA devices here; "
                                       "use --device cpu, or leave --device out")
    return dev


def _check_backend(name: str | None, device) -> None:
    """UserError when ``--backend`` cannot run on ``device`` here (checked before any work)."""
    if name and name != "auto":
        import transfusion_kernels as tk

        info = tk.available_backends(device)[name]
        _require(info.available, f"--backend {name} cannot run on {device.type}: {info.reason}; "
                                 "use --backend auto or reference")


def _backend_ctx(args):
    import transfusion_kernels as tk

    return tk.use_backend(args.backend) if args.backend else contextlib.nullcontext()


def _threads(args):
    import torch

    if getattr(args, "threads", None) is not None:
        _require(args.threads >= 1, f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


# -- prepare ---------------------------------------------------------------------------------
def cmd_prepare(args) -> int:
    from transfusion.prepare import prepare

    p = prepare(args.out, image_size=args.image_size, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                vae=args.vae, holdout_fraction=args.holdout, seed=args.seed)
    print(json.dumps(p.info, indent=2))
    print(f"prepared {args.out}")
    return 0


# -- train -----------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from transfusion.latents import make_latents
    from transfusion.prepare import load_prepared
    from transfusion.runner import build_config, run_training

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
    latents = None
    if prepared.info["latents"] == "vae":
        latents = make_latents(str(Path(args.data) / "vae"), device=device)
    with _backend_ctx(args):
        trainer, hist = run_training(prepared, cfg, args.out, device=device, resume=args.resume,
                                     progress=not args.no_progress, latents=latents)
    if hist:
        last = hist[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f} (lm {last['lm_loss']:.4f}, ddpm {last['ddpm_loss']:.4f})")
    print(f"checkpoint: {Path(args.out) / 'checkpoint'}")
    return 0


# -- sampling --------------------------------------------------------------------------------
def _check_sampling_args(args) -> None:
    for name, low in (("steps", 1), ("max_new_tokens", 0), ("max_images", 0), ("image_size", 1),
                      ("temperature", 0), ("eta", 0), ("num_images", 1), ("png_scale", 1)):
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
    try:
        model, cfg, tok = load_checkpoint(args.checkpoint, device=device, backend=args.backend, use_ema=not args.no_ema)
        latents = make_latents(cfg.data.latents, cfg.model.latent_channels, device, checkpoint_dir=args.checkpoint)
    except (OSError, ValueError) as e:
        raise UserError(f"{e}; pass --checkpoint a complete checkpoint folder (RUN/checkpoint, "
                        "written by `transfusion train`)") from e
    return model, cfg, tok, latents, device


def _sample_cfg(args, cfg, latents):
    from transfusion.sample import SampleConfig

    T = cfg.model.num_train_timesteps
    _require(args.steps <= T, f"--steps {args.steps} is more than the {T} timesteps the model was trained on; "
                              f"use --steps {T} or fewer")
    size = args.image_size or cfg.data.image_size
    lat = size // latents.downsample
    k = cfg.model.patch_size
    _require(size % latents.downsample == 0 and lat % k == 0,
             f"--image-size {size} does not fit the model: it must be a multiple of "
             f"{latents.downsample * k} (latent downsampling {latents.downsample} x patch size {k})")
    return SampleConfig(steps=args.steps, sampler=args.sampler, eta=args.eta, cfg_scale=args.cfg_scale,
                        image_size=(lat, lat), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        seed=args.seed, max_images=args.max_images, clip_sample=args.clip_sample)


def cmd_sample(args) -> int:
    import torch

    from transfusion.image_io import image_grid, save_png
    from transfusion.sample import generate

    out = Path(args.out)
    _require(not out.exists() or out.is_dir(), f"--out {out} is a file; pass a folder")
    _require(args.overwrite or not out.is_dir() or not any(out.iterdir()),
             f"--out {out} is not empty; pass --overwrite or another --out")
    model, cfg, tok, latents, device = _load(args)
    scfg = _sample_cfg(args, cfg, latents)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("sample_*.png"), out / "grid.png", out / "samples.json"]:  # --overwrite
        old.unlink(missing_ok=True)
    prompts = [args.prompt] * args.num_images
    with _backend_ctx(args):
        res = generate(model, tok, prompts, scfg, open_image=not args.free, progress=not args.quiet)
    records, all_imgs = [], []
    for i, r in enumerate(res):
        segs, files = [], []
        for j, (kind, v) in enumerate([s for s in r["segments"]]):
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
        records.append({"prompt": args.prompt, "text": text, "images": files, "segments": segs})
    grid_name = None
    shapes = {tuple(x.shape) for x in all_imgs}
    if all_imgs and len(shapes) == 1:
        grid_name = "grid.png"
        save_png(image_grid(torch.stack(all_imgs), ncol=min(8, len(all_imgs))), out / grid_name, args.png_scale)
    summary = {"checkpoint": str(args.checkpoint), "sampler": scfg.__dict__, "grid": grid_name, "samples": records}
    (out / "samples.json").write_text(json.dumps(summary, indent=2))
    for r in records:
        print(r["text"])
    print(f"wrote {len(all_imgs)} images and samples.json to {out}")
    return 0


def cmd_caption(args) -> int:
    import torch

    from transfusion.image_io import load_png
    from transfusion.sample import caption

    from PIL import Image

    for p in args.images:  # every file, before the model is loaded
        try:
            with Image.open(p) as im:
                im.verify()
        except OSError as e:  # missing, unreadable, or not an image (PIL.UnidentifiedImageError)
            raise UserError(f"{p}: {e.strerror or 'not an image file'}; "
                            "pass PNG or other image files") from e
    model, cfg, tok, latents, device = _load(args)
    scfg = _sample_cfg(args, cfg, latents)
    size = cfg.data.image_size
    imgs = torch.stack([load_png(p, size, getattr(latents, "in_channels", cfg.model.latent_channels)) for p in args.images])
    z = latents.encode(imgs.to(device)) if latents.kind == "vae" else imgs.to(device)
    with _backend_ctx(args):
        caps = caption(model, tok, z, scfg, progress=not args.quiet)
    for p, c in zip(args.images, caps):
        print(f"{p}\t{c}")
    return 0


# -- bench / demo ----------------------------------------------------------------------------
def cmd_bench(args) -> int:
    """``python -m benchmarks`` in the current directory (results go under it, or --root): the
    installed ``benchmarks`` package, or the one beside this package in a checkout."""
    import importlib.util

    env = dict(os.environ)
    if args.backend:
        env["TRANSFUSION_KERNELS_BACKEND"] = args.backend
    checkout = Path(__file__).resolve().parent.parent
    if importlib.util.find_spec("benchmarks") is None and (checkout / "benchmarks" / "__main__.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join([str(checkout)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.rest], env=env)


def cmd_demo(args) -> int:
    from transfusion.demo import run_demo

    report = run_demo(args.out, backend=args.backend, threads=args.threads, steps=args.steps, quick=args.quick,
                      progress=not args.no_progress)
    return 0 if report["passed"] or args.quick else 2


# -- parser ----------------------------------------------------------------------------------
def _sampling_args(p):
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--clip-sample", action="store_true", help="clip the predicted clean image to [-1, 1]")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-images", type=int, default=1, help="images per generated sequence")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy text")
    p.add_argument("--image-size", type=int, default=None, help="pixel size of generated images (default: trained size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")


def version_text() -> str:
    """Version, commit and the CUDA extension's archs and CUDA version (or why it is missing)."""
    import transfusion_kernels as tk

    info = tk.build_info()
    cuda = info["cuda_extension"]
    ext = (f"CUDA extension built for {','.join(cuda['archs'])} with CUDA {cuda['cuda_version']}" if cuda["built"]
           else f"no CUDA extension: {cuda['reason']}")
    return f"transfusion-kernels {info['version']} (commit {info['commit'] or 'unknown'})\n{ext}"


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version, commit and CUDA build, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="transfusion", description=__doc__)
    ap.add_argument("--version", action=_Version)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name, help):
        p = sub.add_parser(name, help=help)
        p.add_argument("--backend", choices=BACKENDS, default=None,
                       help="kernel backend for every op (default: TRANSFUSION_KERNELS_BACKEND or auto)")
        p.add_argument("--debug", action="store_true",
                       help="show the traceback of an error (also: TRANSFUSION_DEBUG=1)")
        return p

    p = add("prepare", "build the digits data set and tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--tokenizer", default=None, help="use this SentencePiece .model instead of training one")
    p.add_argument("--vae", default=None, help="local folder with a diffusers AutoencoderKL (default: pixel space)")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_prepare)

    p = add("train", "train a model on prepared data")
    p.add_argument("--data", required=True, help="folder written by `transfusion prepare`")
    p.add_argument("--out", required=True, help="run folder: checkpoint/ and metrics.jsonl")
    p.add_argument("--config", default=None, help="JSON config (model/data/train sections) to start from")
    p.add_argument("--preset", choices=("default", "demo"), default="default",
                   help="starting config when no --config: the library defaults (the paper's choices) "
                        "or the CPU demo's settings")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if it exists")
    for name, typ in (("steps", int), ("lr", float), ("dim", int), ("layers", int), ("heads", int),
                      ("patch-size", int), ("docs-per-batch", int), ("seed", int), ("ema-decay", float),
                      ("diffusion-weight", float), ("warmup-steps", int), ("save-every", int)):
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--image-encoder", choices=("linear", "unet"), default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", choices=("ddp", "fsdp"), default=None,
                   help="data-parallel training under torchrun: torchrun --nproc-per-node N -m transfusion train ...")
    p.set_defaults(fn=cmd_train)

    p = add("sample", "generate images (and text) from a prompt")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--num-images", type=int, default=4, help="number of samples of the prompt")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing its sample_*.png, grid.png and samples.json")
    p.add_argument("--free", action="store_true", help="let the model decide whether to open an image (default: BOI follows the prompt)")
    p.add_argument("--png-scale", type=int, default=8, help="nearest-neighbour upscale of written PNGs")
    _sampling_args(p)
    p.set_defaults(fn=cmd_sample)

    p = add("caption", "caption images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    _sampling_args(p)
    p.set_defaults(fn=cmd_caption)

    p = add("bench", "run the kernel benchmarks (python -m benchmarks); other arguments go to it, e.g. --smoke, "
                     "--root DIR (results folder; default benchmarks/results under the current directory)")
    p.add_argument("rest", nargs="*", help="arguments passed to the benchmarks")
    p.set_defaults(fn=cmd_bench)

    p = add("demo", "prepare, train, sample and evaluate on the digits data (CPU, minutes)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, at most 2... see demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's setting)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test; quality bars not expected)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and not {"-h", "--help"} & set(argv[1:]):
        # everything but --backend goes, in order, to the benchmark driver
        bp = argparse.ArgumentParser(prog="transfusion bench", add_help=False)
        bp.add_argument("--backend", choices=BACKENDS, default=None)
        args, rest = bp.parse_known_args(argv[1:])
        args.rest = [a for a in rest if a != "--"]
        return cmd_bench(args)
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        if args.debug or os.environ.get("TRANSFUSION_DEBUG") == "1":
            raise
        msg = " ".join(str(e).split())
        print(f"transfusion {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
