"""Self-check: run every op on every backend that can run here and compare with the reference.

    python -m transfusion_kernels.selfcheck [--device cpu|cuda] [--no-triton-interpreter]

Builds a Transfusion mask for a small mixed text/image batch, runs attention (forward and
backward), the patch timestep embedding and the diffusion updates on each available backend,
and prints one row per (op, backend): max abs error against the reference and the median time.
On a CPU the Triton kernels run under the Triton interpreter (slow: shapes are kept small).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--no-triton-interpreter",
        action="store_true",
        help="on a CPU, do not run the Triton kernels under TRITON_INTERPRET=1",
    )
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def main() -> int:
    args = _parse()
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.no_triton_interpreter and "TRITON_INTERPRET" not in os.environ:
        # Triton reads the variable when the package's kernels are defined (at import): restart.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "transfusion_kernels.selfcheck", *sys.argv[1:]])
    import transfusion_kernels as tk

    torch.manual_seed(0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    # A packed batch of two documents: caption, image, caption, image / text only.
    cu = torch.tensor([0, 70, 100], dtype=torch.int32, device=device)
    spans = torch.tensor([[5, 21], [30, 62]], dtype=torch.int32, device=device)
    t0 = time.perf_counter()
    mask = tk.HybridMask.from_spans(cu, spans)
    print(
        f"mask: {mask.num_queries} tokens, {spans.shape[0]} images, {mask.visible_pairs()} visible pairs "
        f"({(time.perf_counter() - t0) * 1e3:.2f} ms to build)"
    )

    n, hq, hkv, d = mask.num_queries, 4, 2, 64
    q = torch.randn(n, hq, d, device=device, dtype=dtype)
    k = torch.randn(n, hkv, d, device=device, dtype=dtype)
    v = torch.randn(n, hkv, d, device=device, dtype=dtype)
    dout = torch.randn(n, hq, d, device=device, dtype=dtype)

    def attention_fwd_bwd(backend):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = tk.hybrid_attention(qq, kk, vv, mask, backend=backend)
        return (out, *torch.autograd.grad(out, (qq, kk, vv), dout))

    patches = int((spans[:, 1] - spans[:, 0]).sum())
    x = torch.randn(n, 128, device=device, dtype=dtype)
    image_index = torch.full((n,), -1, dtype=torch.int32, device=device)
    for m, (s, e) in enumerate(spans.tolist()):
        image_index[s:e] = m
    timesteps = torch.tensor([17, 650], device=device)
    mlp = tk.TimestepMLP(64, 96, 128).to(device)

    def patch_embedding(backend):
        return (tk.patch_timestep_embedding(x, timesteps, image_index, mlp, freq_dim=64, backend=backend),)

    sched = tk.DiffusionSchedule(num_train_timesteps=1000)
    lat = torch.randn(2, 4, 8, 8, device=device, dtype=dtype)
    eps = torch.randn_like(lat)
    noise = torch.randn_like(lat)
    rows_t = torch.tensor([999, 10], device=device)

    def add_noise(backend):
        return (tk.add_noise(lat, rows_t, sched, noise=noise, backend=backend)[0],)

    def ddpm(backend):
        return (tk.ddpm_step(eps, rows_t, lat, sched, noise=noise, backend=backend),)

    def ddim(backend):
        return (
            tk.ddim_step(eps, rows_t, lat, sched, prev_timestep=rows_t - 20, eta=0.5, noise=noise, backend=backend),
        )

    pred = torch.randn(n, 16, device=device, dtype=dtype)
    target = torch.randn(n, 16, device=device, dtype=dtype)
    x0_rows = torch.randn(n, 16, device=device, dtype=dtype)

    def loss(backend):
        return (tk.diffusion_loss(pred, target, image_index, backend=backend),)

    sigmas = torch.tensor([1.0, 0.3], device=device)

    def flow_add_noise(backend):
        return tk.flow_add_noise(lat, sigmas, noise=noise, backend=backend)

    def flow_euler(backend):
        return (
            tk.flow_euler_step(
                eps, sigmas, sigmas - 0.1, lat, guidance_scale=3.0, uncond_output=noise, backend=backend
            ),
        )

    def flow_loss(backend):
        return (tk.flow_loss(pred, target, x0_rows, image_index, backend=backend),)

    ops = [
        ("hybrid_attention fwd+bwd", attention_fwd_bwd),
        ("patch_timestep_embedding", patch_embedding),
        ("add_noise", add_noise),
        ("ddpm_step", ddpm),
        ("ddim_step", ddim),
        ("diffusion_loss", loss),
        ("flow_add_noise", flow_add_noise),
        ("flow_euler_step (guided)", flow_euler),
        ("flow_loss", flow_loss),
    ]
    backends = tk.available_backends(device)
    ran = [b for b, info in backends.items() if info.available]
    print(f"backends that run here: {', '.join(f'{b} ({backends[b].reason})' for b in ran)}")
    for b, info in backends.items():
        if not info.available:
            print(f"not run: {b}: {info.reason}; to run it: {_enable(b, info.reason, device)}")
    print(f"\n{'op':<26} {'backend':<10} {'max abs err':>12} {'median ms':>10}")
    print("-" * 62)
    failures, checked, not_covered = 0, {b: 0 for b in ran}, []
    for name, fn in ops:
        expected = fn("reference")
        for backend in ran:
            try:
                times = []
                for _ in range(args.repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    got = fn(backend)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            except tk.BackendUnavailableError as e:
                print(f"{name:<26} {backend:<10} {'not run':>12} {'':>10}  ({e})")
                not_covered.append(f"{name} on {backend}")
                continue
            # detached: the attention outputs carry autograd history, which float() would warn about
            err = max(float((g.detach().float() - e.detach().float()).abs().max()) for g, e in zip(got, expected))
            ok = err == err and err < (0.05 if dtype != torch.float32 else 2e-3)
            failures += not ok
            checked[backend] += 1
            times.sort()
            print(
                f"{name:<26} {backend:<10} {err:>12.3e} {times[len(times) // 2] * 1e3:>10.2f}"
                + ("" if ok else "  MISMATCH")
            )
    print(f"\n{patches} image patches; dtype {dtype}; device {device}.")
    print(verdict(checked, [b for b in backends if b not in ran], failures, not_covered))
    return 1 if failures else 0


def _enable(backend: str, reason: str, device) -> str:
    """The command that makes ``backend`` run, for the reason it does not."""
    if backend == "triton":
        if "not importable" in reason:
            return "pip install 'transfusion-kernels[triton]' (in a checkout: pip install -e '.[triton]')"
        if device.type == "cpu":
            return "python -m transfusion_kernels.selfcheck (without --no-triton-interpreter: Triton's CPU interpreter)"
        return "a GPU Triton supports (see the reason)"
    if backend == "cuda":
        if "not built" in reason or "does not load" in reason:
            return (
                "pip install -e . with nvcc on PATH (TRANSFUSION_BUILD_CUDA=1 makes a failed build an error), "
                "on a machine with an NVIDIA GPU, then python -m transfusion_kernels.selfcheck --device cuda"
            )
        return "python -m transfusion_kernels.selfcheck --device cuda on a machine with an NVIDIA GPU"
    return "see the reason"


def verdict(checked: dict, not_run: list, failures: int, not_covered: list) -> str:
    """The closing line: which backends were compared with the reference, and which were not."""
    kernels = [b for b in checked if b != "reference"]
    missing = f" Not run here: {', '.join(not_run)} (see above)." if not_run else ""
    gaps = f" Not covered: {', '.join(not_covered)}." if not_covered else ""
    if failures:
        return f"{failures} mismatches.{missing}{gaps}"
    if not kernels:
        return f"Only the reference ran: no kernel backend was checked.{missing}{gaps}"
    done = ", ".join(f"{b} ({checked[b]} ops)" for b in kernels)
    return f"Agree with the reference: {done}.{missing}{gaps}"


if __name__ == "__main__":
    sys.exit(main())
