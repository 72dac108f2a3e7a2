"""Per-row coefficients of the flow-matching ops for the affine-step kernel (float32 ``[R, 6]``,
the contract in ``transfusion_kernels.diffusion``), computed in float64 with plain torch ops so
they trace. A sigma is a python float (every row) or a float tensor of shape ``[]`` or ``[R]``.
"""

import numbers

import torch

# Python-float coefficients per (kind, values, rows, device): a sampling loop pays a lookup per
# step, not a host-to-device copy. Bounded; cleared when full.
_MEMO: dict = {}
_MEMO_SIZE = 1024


def check_sigma(value, name: str, R: int):
    """A real in [0, 1] -> float, or a float tensor of shape [] / [R] -> float64 tensor [1] or [R].
    A tensor's range is checked where it lies (one host sync when that is a GPU), not under
    torch.compile; ``check_sigma_range`` does it for several tensors with one sync."""
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a python float or a floating-point tensor, got {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != R):
            raise ValueError(
                f"{name} must be a python float or a float tensor of shape [{R}] (one per row of the sample), "
                f"got shape {tuple(value.shape)}"
            )
        return value.detach().double().reshape(-1)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a python float in [0, 1] or a float tensor, got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_sigma_range(named: dict) -> None:
    """The [0, 1] check of the tensor sigmas in ``named`` (name -> checked value): one host sync."""
    tensors = {n: v for n, v in named.items() if isinstance(v, torch.Tensor)}
    if not tensors or torch.compiler.is_compiling():
        return
    bad = [((v < 0) | (v > 1) | v.isnan()).any() for v in tensors.values()]
    on = next((b.device for b in bad if b.device.type != "cpu"), torch.device("cpu"))
    flags = torch.stack([b.to(on) for b in bad]).tolist()
    for name, b in zip(tensors, flags):
        if b:
            raise ValueError(f"{name} must be in [0, 1] in every row")


def coef_rows(kind: str, columns, R: int, device) -> torch.Tensor:
    """float32 [R, 6] from six columns, each a float or a float64 tensor of [1] or [R] rows."""
    if all(not isinstance(c, torch.Tensor) for c in columns):
        key = (kind, tuple(columns), R, device)
        if not torch.compiler.is_compiling():
            hit = _MEMO.get(key)
            if hit is not None:
                return hit
        coef = torch.tensor([columns], dtype=torch.float64).to(device, torch.float32).expand(R, 6).contiguous()
        if not torch.compiler.is_compiling():
            if len(_MEMO) >= _MEMO_SIZE:
                _MEMO.clear()
            _MEMO[key] = coef
        return coef
    cols = [
        c.to(device) if isinstance(c, torch.Tensor) else torch.full((1,), c, dtype=torch.float64, device=device)
        for c in columns
    ]
    return torch.stack(torch.broadcast_tensors(*cols), dim=1).float().expand(R, 6).contiguous()


def add_noise_coef(sigmas, R, device):
    """x_t = (1 - s) x0 + s eps: c3 = 1 - s, c5 = s."""
    s = check_sigma(sigmas, "sigmas", R)
    check_sigma_range({"sigmas": s})
    return coef_rows("add_noise", [0.0, 0.0, 0.0, 1.0 - s, 0.0, s], R, device)


def euler_coef(sigma, sigma_next, R, device, stochastic: bool, guidance_scale):
    """Deterministic: prev = sample + (s_next - s) v (c3 = 1, c4 = ds). Stochastic: x0 = sample - s v,
    prev = (1 - s_next) x0 + s_next eps (c0 = 1, c1 = -s, c2 = 1 - s_next, c5 = s_next).

    Classifier-free guidance in the deterministic step: v = u + g (c - u) = g c + (1 - g) u is
    linear in the two model outputs, so the unconditional output u goes through the kernel's
    noise slot: c4 = ds * g on the conditional output, c5 = ds * (1 - g) on u."""
    s = check_sigma(sigma, "sigma", R)
    s_next = check_sigma(sigma_next, "sigma_next", R)
    check_sigma_range({"sigma": s, "sigma_next": s_next})
    if stochastic:
        return coef_rows("stochastic", [1.0, -s, 1.0 - s_next, 0.0, 0.0, s_next], R, device)
    ds = s_next - s
    if guidance_scale is None:
        return coef_rows("euler", [0.0, 0.0, 0.0, 1.0, ds, 0.0], R, device)
    g = guidance_scale
    return coef_rows("euler_cfg", [0.0, 0.0, 0.0, 1.0, ds * g, ds * (1.0 - g)], R, device)
