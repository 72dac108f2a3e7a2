"""tk.patch_timestep_embedding and its building blocks.

The reference backend against diffusers and a float64 oracle; input validation; torch.compile and
the custom-op registration. Then the kernel backends (triton, cuda) against the float64 oracle,
with the fp32 reference backend as the PyTorch baseline of the 2x rule (common.py): a backend
that cannot run here is skipped with the dispatcher's reason. On a CPU triton runs under the
interpreter (small shapes); with CUDA the same tests run on the GPU, plus the large GPU-only
cases at the end. Every buffer the kernels write starts NaN-filled, so an element they forget
to write fails.
"""

import math

import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels.timestep import reference
from tests.backend_params import BACKENDS, GPU, KERNEL_BACKENDS, kernels, poison, require
from tests.fuzzing import SMALL_TILES
from tests.oracles import segment_sum64
from tests.timestep.common import (
    CONFIGS,
    DEVICE,
    FLOOR,
    assert_rule,
    grad_floor,
    make_layout,
    make_mlp,
    patch_oracle,
    run,
    sinusoid64,
)

try:
    from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
except ImportError:  # the GPU images ship without diffusers: only the comparisons with it skip
    TimestepEmbedding = get_timestep_embedding = None
needs_diffusers = pytest.mark.skipif(get_timestep_embedding is None, reason="needs diffusers")


def timesteps_for(cfg, M, kind, gen):
    """Integer steps in [0, 1000), or fractional ones; in [0, 1) when the config scales by 1000."""
    if cfg[2] > 1:
        return torch.rand(M, generator=gen).to(DEVICE)
    if kind == "int64":
        return torch.randint(0, 1000, (M,), generator=gen).to(DEVICE)
    if kind == "int32":
        return torch.randint(0, 1000, (M,), generator=gen, dtype=torch.int32).to(DEVICE)
    t = torch.rand(M, generator=gen, dtype=torch.float64) * 1000
    return t.to(DEVICE, torch.float32 if kind == "float32" else torch.float64)


# ----------------------------------------------------------------------------- sinusoid


@needs_diffusers
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dim", [1, 7, 8, 33, 256])
@pytest.mark.parametrize("kind", ["int64", "int32", "float32", "float64"])
def test_timestep_embedding_equals_diffusers(cfg, dim, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    t = timesteps_for(cfg, 9, kind, gen)
    ours = tk.timestep_embedding(t, dim, *cfg)
    theirs = get_timestep_embedding(t, dim, *cfg)
    assert ours.dtype == torch.float32 and ours.shape == (9, dim)
    assert torch.equal(ours, theirs)
    if dim % 2:
        assert (ours[:, -1] == 0).all()


@needs_diffusers
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[2] <= 1])
def test_oracle_agrees_with_diffusers(cfg, seed):
    """The float64 oracle used everywhere else is the same function (fp32 argument rounding at
    t * freq <= 1000 rad bounds the difference)."""
    t = timesteps_for(cfg, 16, "float64", torch.Generator().manual_seed(seed))
    diff = (sinusoid64(t, 64, *cfg) - get_timestep_embedding(t, 64, *cfg).double()).abs().max()
    assert diff < 2e-4


@needs_diffusers
def test_timestep_embedding_defaults_are_transfusion_style():
    t = torch.tensor([3, 500])
    assert torch.equal(tk.timestep_embedding(t, 16), get_timestep_embedding(t, 16, True, 0.0))


def test_timestep_embedding_bad_input():
    with pytest.raises(ValueError, match="t must be"):
        tk.timestep_embedding(torch.zeros(2, 2), 8)
    with pytest.raises(ValueError, match="dim"):
        tk.timestep_embedding(torch.zeros(2), 0)


# ----------------------------------------------------------------------------- TimestepMLP


@needs_diffusers
def test_timestep_mlp_is_diffusers_timestep_embedding(seed):
    te = TimestepEmbedding(32, 48, out_dim=40).to(DEVICE)
    mlp = tk.TimestepMLP.from_diffusers(te)
    assert (
        set(mlp.state_dict())
        == set(te.state_dict())
        == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    )
    assert (mlp.freq_dim, mlp.hidden_dim, mlp.out_dim) == (32, 48, 40)
    s = torch.randn(5, 32, device=DEVICE)
    assert torch.equal(mlp(s), te(s))
    # a copy by default; copy=False shares the diffusers module's parameters
    with torch.no_grad():
        mlp.linear_1.weight.add_(1.0)
    assert not torch.equal(mlp(s), te(s))
    shared = tk.TimestepMLP.from_diffusers(te, copy=False)
    assert shared.linear_1.weight is te.linear_1.weight
    # and the state dict goes back the other way
    te2 = TimestepEmbedding(32, 48, out_dim=40).to(DEVICE)
    te2.load_state_dict(mlp.state_dict())
    assert torch.equal(te2(s), mlp(s))


@needs_diffusers
def test_timestep_mlp_from_diffusers_rejects_other_variants():
    with pytest.raises(ValueError, match="cond_proj"):
        tk.TimestepMLP.from_diffusers(TimestepEmbedding(8, 16, cond_proj_dim=4))
    with pytest.raises(ValueError, match="post_act"):
        tk.TimestepMLP.from_diffusers(TimestepEmbedding(8, 16, post_act_fn="silu"))
    with pytest.raises(ValueError, match="act"):
        tk.TimestepMLP.from_diffusers(TimestepEmbedding(8, 16, act_fn="gelu"))


@needs_diffusers
def test_timestep_mlp_without_bias(seed):
    te = TimestepEmbedding(16, 24, out_dim=32, sample_proj_bias=False)
    mlp = tk.TimestepMLP.from_diffusers(te)
    assert mlp.linear_1.bias is None and mlp.linear_2.bias is None
    s = torch.randn(3, 16)
    assert torch.equal(mlp(s), te(s))


# ----------------------------------------------------------------------------- patch op


def diffusers_patch(x, t, idx, te, freq_dim, cfg):
    """What a diffusers-based model does eagerly: Timesteps, TimestepEmbedding, index add."""
    s = get_timestep_embedding(t, freq_dim, *cfg)
    e = s if te is None else te(s.to(te.linear_1.weight.dtype))
    valid = (idx >= 0)[:, None]
    return x + torch.where(valid, e.to(x.dtype)[idx.long().clamp(min=0)], 0)


@needs_diffusers
@pytest.mark.parametrize("layout", ["text", "image", "several", "empty", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mlp", [True, False])
def test_patch_reference_vs_diffusers(layout, dtype, with_mlp, seed):
    gen = torch.Generator().manual_seed(seed)
    P, D, M, F, H = 150, 64, 4, 32, 48
    cfg = CONFIGS[seed % len(CONFIGS)]
    freq_dim = F if with_mlp else D
    t = timesteps_for(cfg, M, "float32", gen)
    idx = make_layout(layout, P, M, gen).to(DEVICE)
    x = torch.randn(P, D, device=DEVICE).to(dtype)
    te = TimestepEmbedding(F, H, out_dim=D).to(DEVICE) if with_mlp else None
    mlp = tk.TimestepMLP.from_diffusers(te) if with_mlp else None
    dy = torch.randn(P, D, device=DEVICE).to(dtype)

    xs = [x.clone().requires_grad_() for _ in range(3)]
    y = tk.patch_timestep_embedding(
        xs[0],
        t,
        idx,
        mlp,
        freq_dim=freq_dim,
        flip_sin_to_cos=cfg[0],
        downscale_freq_shift=cfg[1],
        scale=cfg[2],
        max_period=cfg[3],
        backend="reference",
    )
    assert y.dtype == dtype and y.shape == (P, D)
    y_d = diffusers_patch(xs[1], t, idx, te, freq_dim, cfg)
    w64 = None if te is None else [p.detach().double().requires_grad_() for p in mlp.weights()]
    y64 = patch_oracle(xs[2].double(), t, idx, w64, freq_dim, cfg)
    assert_rule("y", y, y64, y_d, FLOOR[dtype])

    ours = torch.autograd.grad(y, [xs[0], *(mlp.parameters() if mlp else [])], dy)
    theirs = torch.autograd.grad(y_d, [xs[1], *(te.parameters() if te else [])], dy)
    oracle = torch.autograd.grad(y64, [xs[2], *(w64 or [])], dy.double())
    assert torch.equal(ours[0], dy)  # dx = dy exactly
    for name, g, b, o in zip(["w1", "b1", "w2", "b2"], ours[1:], theirs[1:], oracle[1:]):
        assert g.dtype == torch.float32
        assert_rule(name, g, o, b, grad_floor(o))


@needs_diffusers
def test_patch_gradients_with_bf16_weights_and_no_bias(seed):
    gen = torch.Generator().manual_seed(seed)
    P, D, M, F, H = 90, 32, 3, 16, 24
    cfg = CONFIGS[0]
    weights = [w.requires_grad_() for w in make_mlp(F, H, D, torch.bfloat16, bias=False) if w is not None]
    w1, w2 = weights
    t = timesteps_for(cfg, M, "int64", gen)
    idx = make_layout("several", P, M, gen).to(DEVICE)
    x = torch.randn(P, D, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(P, D, device=DEVICE, dtype=torch.bfloat16)
    y = tk.patch_timestep_embedding(x, t, idx, (w1, None, w2, None), freq_dim=F, backend="reference")
    g1, g2 = torch.autograd.grad(y, [w1, w2], dy)
    assert g1.dtype == g2.dtype == torch.bfloat16
    w64 = [w.detach().double().requires_grad_() for w in (w1, w2)]
    y64 = patch_oracle(x.double(), t, idx, (w64[0], None, w64[1], None), F, cfg)
    o1, o2 = torch.autograd.grad(y64, w64, dy.double())
    # baseline: the same MLP run by PyTorch in bf16 (a bf16 diffusers module)
    wl = [w.detach().clone().requires_grad_() for w in (w1, w2)]
    s = get_timestep_embedding(t, F, *cfg).to(torch.bfloat16)
    e = torch.nn.functional.silu(s @ wl[0].t()) @ wl[1].t()
    yl = x + torch.where((idx >= 0)[:, None], e[idx.long().clamp(min=0)], 0)
    b1, b2 = torch.autograd.grad(yl, wl, dy)
    assert_rule("y", y, y64, yl, FLOOR[torch.bfloat16])
    assert_rule("w1", g1, o1, b1, grad_floor(o1))
    assert_rule("w2", g2, o2, b2, grad_floor(o2))


# ----------------------------------------------------------------------------- bad input


def _good():
    P, D, F, H = 10, 16, 8, 12  # three images (timesteps)
    return dict(
        x=torch.randn(P, D),
        timesteps=torch.tensor([1, 50, 999]),
        image_index=torch.tensor([-1, 0, 0, 1, 1, 1, -1, 2, 2, -1], dtype=torch.int32),
        mlp=make_mlp(F, H, D, device="cpu"),
        freq_dim=F,
    )


def _with(**changes):
    kw = _good()
    for k, v in changes.items():
        if k.startswith("mlp."):
            i = ["w1", "b1", "w2", "b2"].index(k[4:])
            kw["mlp"] = tuple(v if j == i else w for j, w in enumerate(kw["mlp"]))
        else:
            kw[k] = v
    return kw


BAD = {
    "index out of range": (
        _with(image_index=torch.tensor([-1, 0, 0, 1, 1, 1, -1, 3, 2, -1], dtype=torch.int32)),
        "image_index",
    ),
    "index below -1": (
        _with(image_index=torch.tensor([-2, 0, 0, 1, 1, 1, -1, 2, 2, -1], dtype=torch.int32)),
        "image_index",
    ),
    "index int64": (_with(image_index=torch.tensor([-1, 0, 0, 1, 1, 1, -1, 2, 2, -1])), "image_index"),
    "index length": (_with(image_index=torch.zeros(9, dtype=torch.int32)), "image_index"),
    "x int": (_with(x=torch.zeros(10, 16, dtype=torch.int64)), "x"),
    "x fp64": (_with(x=torch.zeros(10, 16, dtype=torch.float64)), "x"),
    "x 3-D": (_with(x=torch.zeros(1, 10, 16)), "x"),
    "timesteps 2-D": (_with(timesteps=torch.zeros(3, 1)), "timesteps"),
    "timesteps bool": (_with(timesteps=torch.zeros(3, dtype=torch.bool)), "timesteps"),
    "freq_dim != D without mlp": (_with(mlp=None, freq_dim=8), "freq_dim"),
    "freq_dim != w1": (_with(freq_dim=12), "freq_dim"),
    "w1 1-D": (_with(**{"mlp.w1": torch.zeros(12)}), "w1"),
    "b1 shape": (_with(**{"mlp.b1": torch.zeros(13)}), "b1"),
    "w2 shape": (_with(**{"mlp.w2": torch.zeros(15, 12)}), "w2"),
    "b2 shape": (_with(**{"mlp.b2": torch.zeros(12)}), "b2"),
    "w2 int": (_with(**{"mlp.w2": torch.zeros(16, 12, dtype=torch.int32)}), "w2"),
    "mlp wrong type": (_with(mlp=torch.nn.Linear(8, 16)), "mlp"),
    "mlp short tuple": (_with(mlp=(torch.zeros(12, 8),)), "mlp"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_value_error_naming_argument(case):
    kw, name = BAD[case]
    with pytest.raises(ValueError, match=name):
        tk.patch_timestep_embedding(
            kw["x"], kw["timesteps"], kw["image_index"], kw["mlp"], freq_dim=kw["freq_dim"], backend="reference"
        )


def test_unknown_or_missing_backend():
    kw = _good()
    args = (kw["x"], kw["timesteps"], kw["image_index"], kw["mlp"])
    with pytest.raises(ValueError, match="unknown backend"):
        tk.patch_timestep_embedding(*args, freq_dim=8, backend="fast")
    with pytest.raises(tk.BackendUnavailableError):
        tk.patch_timestep_embedding(*args, freq_dim=8, backend="cuda")


# ----------------------------------------------------------------------------- compile / op registration


def test_torch_compile_fullgraph(seed):
    P, D, M, F, H = 40, 16, 3, 8, 12
    gen = torch.Generator().manual_seed(seed)
    mlp = tk.TimestepMLP(F, H, D)
    weights = tuple(w.detach().clone().requires_grad_() for w in make_mlp(F, H, D, device="cpu"))
    t = torch.tensor([3, 250, 999])
    idx = make_layout("several", P, M, gen)

    def f(x, t, idx, weights):
        y = tk.patch_timestep_embedding(x, t, idx, mlp, freq_dim=F, backend="reference")
        y = tk.patch_timestep_embedding(y, t, idx, weights, freq_dim=F, max_period=100.0)
        return tk.patch_timestep_embedding(y, t, idx, None, freq_dim=D, flip_sin_to_cos=False)

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(P, D, requires_grad=True)
    dy = torch.randn(P, D)
    params = [x, *mlp.parameters(), *weights]
    y_eager = f(x, t, idx, weights)
    g_eager = torch.autograd.grad(y_eager, params, dy)
    y_comp = compiled(x, t, idx, weights)
    g_comp = torch.autograd.grad(y_comp, params, dy)
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_custom_op_registration():
    kw = _good()
    w1, b1, w2, b2 = (w.requires_grad_() for w in kw["mlp"])
    x = kw["x"].requires_grad_()
    cfg = (8, True, 0.0, 1.0, 10000.0, "reference")
    ops = torch.ops.transfusion_kernels
    torch.library.opcheck(
        ops.patch_timestep_embedding.default, (x, kw["timesteps"], kw["image_index"], w1, b1, w2, b2, *cfg)
    )
    torch.library.opcheck(
        ops.patch_timestep_embedding.default,
        (x, kw["timesteps"], kw["image_index"], None, None, None, None, 16, *cfg[1:]),
    )
    dy = torch.randn(10, 16)
    torch.library.opcheck(ops.patch_timestep_segment_sum.default, (dy, kw["image_index"], 3, "reference"))
    demb = torch.randn(3, 16)
    torch.library.opcheck(
        ops.timestep_mlp_backward.default, (demb, kw["timesteps"], w1.detach(), b1.detach(), w2.detach(), *cfg)
    )


# ----------------------------------------------------------------------------- kernel backends
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["text", "image", "several", "empty", "random"]
# Tiles small enough that tiny inputs span many triton programs, pieces and loop iterations.
SMALL_BLOCKS = SMALL_TILES["timestep"]


@pytest.fixture(params=BACKENDS)
def any_backend(request, monkeypatch):
    require(request.param)
    poison("timestep", request.param, monkeypatch)
    return request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request, monkeypatch):
    """A kernel backend, held to the oracle with the reference backend as its baseline."""
    require(request.param)
    poison("timestep", request.param, monkeypatch)
    return request.param


@pytest.fixture
def small_blocks(backend, monkeypatch):
    """SMALL_BLOCKS on the triton backend (the cuda kernels' tiles are compiled in)."""
    if backend == "triton":
        for name, value in SMALL_BLOCKS.items():
            monkeypatch.setattr(kernels("timestep", "triton"), name, value)


@pytest.fixture
def triton_kernels(monkeypatch):
    require("triton")
    poison("timestep", "triton", monkeypatch)
    return kernels("timestep", "triton")


def sinusoid(backend, t, dim, cfg):
    kw = dict(flip_sin_to_cos=cfg[0], downscale_freq_shift=cfg[1], scale=cfg[2], max_period=cfg[3])
    mod = kernels("timestep", backend)
    return mod.sinusoid(t, dim, **kw)


def timesteps(cfg, M, gen, integer=False):
    if cfg[2] > 1:
        return torch.rand(M, generator=gen).to(DEVICE)
    if integer:
        return torch.randint(0, 1000, (M,), generator=gen).to(DEVICE)
    return (torch.rand(M, generator=gen) * 1000).to(DEVICE)


def check(
    backend,
    seed,
    layout,
    P,
    D,
    M,
    dtype,
    *,
    with_mlp=True,
    F=32,
    H=48,
    cfg=CONFIGS[0],
    bias=True,
    wdtype=torch.float32,
    integer_t=False,
):
    gen = torch.Generator().manual_seed(seed)
    freq_dim = F if with_mlp else D
    t = timesteps(cfg, M, gen, integer_t)
    idx = make_layout(layout, P, M, gen).to(DEVICE)
    x = torch.randn(P, D, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(P, D, generator=gen).to(DEVICE, dtype)
    weights = make_mlp(F, H, D, wdtype, bias) if with_mlp else None

    y, grads = run(backend, x, t, idx, weights, freq_dim, cfg, dy)
    y_ref, grads_ref = run("reference", x, t, idx, weights, freq_dim, cfg, dy)
    w64 = None if weights is None else [None if w is None else w.double().requires_grad_() for w in weights]
    y64 = patch_oracle(x.double(), t, idx, w64, freq_dim, cfg)

    assert y.dtype == dtype and y.shape == (P, D)
    assert_rule("y", y, y64, y_ref, FLOOR[dtype])
    assert torch.equal(grads[0], dy), "dx must be dy"
    if with_mlp:
        live = [w for w in w64 if w is not None]
        oracle = torch.autograd.grad(y64, live, dy.double())
        names = [n for n, w in zip(["w1", "b1", "w2", "b2"], w64) if w is not None]
        for name, g, r, o, w in zip(names, grads[1:], grads_ref[1:], oracle, live):
            assert g.dtype == wdtype and g.shape == w.shape, name
            floor = grad_floor(o) if wdtype == torch.float32 else FLOOR[wdtype] * max(1.0, o.abs().max().item())
            assert_rule(name, g, o, r, floor)
    return y, grads


# 100: not a multiple of the vector width; each width in one dtype, every dtype over the widths
# (test_dtypes runs each dtype fully)
WIDTHS = [64, 96, 128, 256] if not GPU else [64, 96, 100, 128, 256, 1024]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("D", WIDTHS)
def test_layouts_and_widths(backend, layout, D, seed):
    check(backend, seed, layout, 77 if not GPU else 333, D, 4, DTYPES[WIDTHS.index(D) % len(DTYPES)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["several", "random"])
def test_dtypes(backend, dtype, layout, seed):
    check(backend, seed, layout, 130, 96, 5, dtype)


# (dtype, layout, config): every dtype and layout on the CPU, the configs rotating over them; on
# a GPU every combination
SINUSOID_CASES = [
    (dtype, layout, CONFIGS[(i + j) % len(CONFIGS)] if not GPU else cfg)
    for i, dtype in enumerate(DTYPES)
    for j, layout in enumerate(["text", "image", "several"])
    for cfg in (CONFIGS[:1] if not GPU else CONFIGS)
]


@pytest.mark.parametrize("dtype,layout,cfg", SINUSOID_CASES)
def test_sinusoid_only(backend, dtype, layout, cfg, seed):
    check(backend, seed, layout, 61 if not GPU else 200, 64, 3, dtype, with_mlp=False, cfg=cfg)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_configs_odd_freq_dim_integer_timesteps(backend, cfg, seed):
    check(backend, seed, "several", 50, 64, 3, torch.float32, F=33, H=40, cfg=cfg, integer_t=True)


def test_no_bias_and_bf16_weights(backend, seed):
    check(backend, seed, "several", 90, 64, 3, torch.bfloat16, bias=False, wdtype=torch.bfloat16)


def test_no_images(any_backend, seed):
    """M == 0: every token is text; y == x and the weights' gradients are zero."""
    x = torch.randn(33, 64, device=DEVICE, dtype=torch.float16)
    idx = torch.full((33,), -1, dtype=torch.int32, device=DEVICE)
    t = torch.zeros(0, device=DEVICE)
    y = tk.patch_timestep_embedding(x, t, idx, None, freq_dim=64, backend=any_backend)
    assert torch.equal(y, x)
    w = tuple(w.requires_grad_() for w in make_mlp(16, 24, 64))
    y = tk.patch_timestep_embedding(x, t, idx, w, freq_dim=16, backend=any_backend)
    assert torch.equal(y, x)
    grads = torch.autograd.grad(y, w, torch.randn_like(x))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_backward_is_deterministic(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    P, D, M = 300, 64, 6
    idx = make_layout("random", P, M, gen).to(DEVICE)
    t = timesteps(CONFIGS[0], M, gen)
    x = torch.randn(P, D, generator=gen).to(DEVICE)
    dy = torch.randn(P, D, generator=gen).to(DEVICE, torch.bfloat16)
    weights = make_mlp(32, 48, D)
    first = run(backend, x.bfloat16(), t, idx, weights, 32, CONFIGS[0], dy)[1]
    second = run(backend, x.bfloat16(), t, idx, weights, 32, CONFIGS[0], dy)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_misaligned_rows(backend, seed):
    """Rows 2 bytes past a 16-byte boundary (the cuda kernels take their scalar path)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1 + 50 * 64, generator=gen).to(DEVICE, torch.float16)
    x = base[1:].view(50, 64)  # contiguous, 2 bytes past a 16-byte boundary
    t = torch.tensor([10.0, 500.0], device=DEVICE)
    idx = make_layout("several", 50, 2, gen).to(DEVICE)
    y = tk.patch_timestep_embedding(x, t, idx, None, freq_dim=64, backend=backend)
    y_ref = tk.patch_timestep_embedding(x, t, idx, None, freq_dim=64, backend="reference")
    y64 = patch_oracle(x.double(), t, idx, None, 64, CONFIGS[0])
    assert_rule("y", y, y64, y_ref, FLOOR[torch.float16])


# ----------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dim", [7, 64, 100] if not GPU else [1, 7, 64, 100, 320])
def test_sinusoid_kernel(backend, cfg, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.cat([torch.tensor([0.0, 1.0, 999.0] if cfg[2] <= 1 else []), timesteps(cfg, 19, gen).cpu()]).to(DEVICE)
    got = sinusoid(backend, t, dim, cfg)
    assert_rule("sinusoid", got, sinusoid64(t, dim, *cfg), reference.sinusoid(t, dim, *cfg), 1e-6)
    if dim % 2:
        assert (got[:, -1] == 0).all()


def test_flip_sin_to_cos_order(backend):
    """t = pi/2 with frequency 1 (column 0): sin = 1, cos = 0, so the first column says which
    function comes first; flip_sin_to_cos=True puts cos first (DiT, Transfusion)."""
    t = torch.tensor([math.pi / 2], device=DEVICE)
    flip = sinusoid(backend, t, 8, (True, 0.0, 1.0, 10000.0))[0]
    plain = sinusoid(backend, t, 8, (False, 0.0, 1.0, 10000.0))[0]
    assert abs(flip[0].item()) < 1e-6 and abs(flip[4].item() - 1) < 1e-6, flip  # cos(pi/2), sin(pi/2)
    assert abs(plain[0].item() - 1) < 1e-6 and abs(plain[4].item()) < 1e-6, plain


@pytest.mark.parametrize("layout", ["trailing_text", *LAYOUTS])
def test_segment_sum_kernel(backend, layout, small_blocks, seed):
    """Sums per image against the float64 oracle, the same bits on a second run (no atomics)."""
    gen = torch.Generator().manual_seed(seed)
    P, D, M = (150, 40, 7) if not GPU else (5000, 96, 7)  # on a GPU images of hundreds of rows: several pieces
    if layout == "trailing_text":
        # text rows sort after every image, so a piece or image range read one row or one
        # partial past its end reads real data (a wrong sum), never past the buffer
        idx = make_layout("image", P - 9, M, gen)
        idx = torch.cat([idx, torch.full((9,), -1, dtype=torch.int32)])[torch.randperm(P, generator=gen)].to(DEVICE)
    else:
        idx = make_layout(layout, P, M, gen).to(DEVICE)
    dy = torch.randn(P, D, generator=gen).to(DEVICE, torch.float16)
    mod = kernels("timestep", backend)
    got = mod.segment_sum(dy, idx, M)
    assert torch.equal(got, mod.segment_sum(dy, idx, M))
    oracle = segment_sum64(dy, idx, M)
    assert_rule("demb", got, oracle, reference.segment_sum(dy, idx, M), grad_floor(oracle))


# ----------------------------------------------------------------------------- triton tiles
@pytest.mark.parametrize("layout", ["image", "several", "random"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1]], ids=["flip", "noflip"])
def test_triton_small_blocks_many_programs(triton_kernels, layout, cfg, monkeypatch, seed):
    # 20 images, each its own timestep: two row tiles of the hidden kernel; pieces of 8 patches;
    # D spans 3 column blocks
    for name, value in SMALL_BLOCKS.items():
        monkeypatch.setattr(triton_kernels, name, value)
    check("triton", seed, layout, 203, 40, 20, torch.bfloat16, F=24, H=40, cfg=cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["flip", "noflip_shift", "flip_scaled", "noflip_period"])
@pytest.mark.parametrize("dim", [7, 40])
def test_triton_sinusoid_many_programs(triton_kernels, cfg, dim, monkeypatch, seed):
    """Row and column tiles of 4 x 16: every program a different set of timesteps."""
    for name, value in SMALL_BLOCKS.items():
        monkeypatch.setattr(triton_kernels, name, value)
    gen = torch.Generator().manual_seed(seed)
    t = timesteps(cfg, 11, gen)
    got = sinusoid("triton", t, dim, cfg)
    assert_rule("sinusoid", got, sinusoid64(t, dim, *cfg), tk.timestep_embedding(t, dim, *cfg), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_add_rows_rounds_once_to_nearest_even(triton_kernels, dtype, seed):
    """y = round(x + emb[idx]) exactly, ties included (1 + half an ulp of 1 must round to even)."""
    gen = torch.Generator().manual_seed(seed)
    P, D, M = 37, 64, 3
    eps = torch.finfo(dtype).eps
    x = torch.randn(P, D, generator=gen).to(DEVICE, dtype)
    x[:4] = torch.tensor([1.0, 1.0 + eps, -1.0, -(1.0 + eps)], dtype=dtype).repeat_interleave(D).view(4, D).to(DEVICE)
    emb = torch.randn(M, D, generator=gen).to(DEVICE)
    emb[0, : D // 2] = eps / 2  # exact ties against rows 0-3
    emb[0, D // 2 :] = -eps / 2
    idx = make_layout("random", P, M, gen).to(DEVICE)
    idx[:4] = 0
    got = triton_kernels.add_rows(x, emb, idx)
    want = (x.float() + torch.where((idx >= 0)[:, None], emb[idx.long().clamp(min=0)], 0)).to(dtype)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA")
@pytest.mark.parametrize(
    "P,D,M,dtype,F,bias",
    [
        (65536, 1024, 64, torch.bfloat16, 256, True),
        (20000, 4096, 256, torch.float16, 256, True),
        (4097, 2048, 1, torch.float32, 256, True),
        *((20000, 256, 9, dtype, 256, False) for dtype in DTYPES),
    ],
)
def test_gpu_transfusion_sizes(backend, P, D, M, dtype, F, bias, seed):
    check(backend, seed, "several" if M > 1 else "image", P, D, M, dtype, F=F, H=D if bias else 2 * D, bias=bias)
