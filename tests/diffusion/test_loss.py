"""diffusion_loss: per-image MSE averaged over images, forward and backward, on every backend,
against a plain per-image loop in float64."""

import pytest
import torch

from tests.diffusion.common import LOSS_BACKENDS as BACKENDS, DEVICE, DTYPES, assert_rule, poison_outputs

import transfusion_kernels as tk  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_outputs(monkeypatch)


def loop_loss(pred, target, image_index):
    """The definition, one image at a time."""
    losses = []
    for img in sorted(set(image_index.tolist()) - {-1}):
        rows = image_index == img
        losses.append(((pred[rows] - target[rows]) ** 2).mean())
    return torch.stack(losses).mean() if losses else pred.sum() * 0


def layout(name, P):
    g = torch.Generator().manual_seed(P)
    if name == "all_images":
        idx = torch.sort(torch.randint(0, 5, (P,), generator=g)).values
    elif name == "mixed":  # text rows (-1) between images, images of different sizes
        idx = torch.randint(-1, 4, (P,), generator=g)
    elif name == "sparse_ids":  # unsorted, non-contiguous image ids
        idx = torch.tensor([7, 100, 3, -1])[torch.randint(0, 4, (P,), generator=g)]
    elif name == "one_patch_images":
        idx = torch.arange(P)
    else:  # no image
        idx = torch.full((P,), -1)
    return idx.to(torch.int32)


CASES = [
    ("all_images", 64, 16),
    ("mixed", 37, 3),
    ("sparse_ids", 130, 48),
    ("one_patch_images", 5, 1),
    ("mixed", 9, 1030),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,P,C", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in CASES])
def test_forward_backward_against_loop(seed, backend, name, P, C):
    idx = layout(name, P)
    pred, target = torch.randn(P, C), torch.randn(P, C)
    p = pred.clone().to(DEVICE).requires_grad_()
    t = target.clone().to(DEVICE).requires_grad_()
    loss = tk.diffusion_loss(p, t, idx.to(DEVICE), backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    (loss * 3).backward()

    p64, t64 = pred.double().requires_grad_(), target.double().requires_grad_()
    ref = loop_loss(p64, t64, idx)
    (ref * 3).backward()
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.grad.cpu().double(), p64.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(t.grad.cpu().double(), t64.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(seed, backend, dtype):
    idx = layout("mixed", 50)
    pred, target = torch.randn(50, 24).to(dtype), torch.randn(50, 24).to(dtype)
    p = pred.clone().to(DEVICE).requires_grad_()
    loss = tk.diffusion_loss(p, target.to(DEVICE), idx.to(DEVICE), backend=backend)
    loss.backward()
    assert p.grad.dtype == dtype

    p64 = pred.double().requires_grad_()
    oracle = loop_loss(p64, target.double(), idx)
    oracle.backward()
    p_same = pred.clone().requires_grad_()
    same = loop_loss(p_same, target, idx)  # PyTorch in the input dtype
    same.backward()
    assert_rule(loss, oracle, same, "loss")
    assert_rule(p.grad, p64.grad, p_same.grad, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_image_gives_zero_with_zero_gradient(backend):
    for P in (0, 6):
        p = torch.randn(P, 4, device=DEVICE, requires_grad=True)
        loss = tk.diffusion_loss(
            p, torch.randn(P, 4, device=DEVICE), torch.full((P,), -1, device=DEVICE), backend=backend
        )
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_without_grad(seed, backend):
    idx = layout("mixed", 77).to(DEVICE)
    pred, target = torch.randn(77, 8, device=DEVICE), torch.randn(77, 8, device=DEVICE)
    with torch.no_grad():
        got = tk.diffusion_loss(pred, target, idx, backend=backend)
    torch.testing.assert_close(got, tk.diffusion_loss(pred, target, idx, backend="reference"), rtol=1e-6, atol=0)


def test_torch_compile_fullgraph(seed):
    idx = layout("mixed", 20)

    def f(pred, target):
        return tk.diffusion_loss(pred, target, idx, backend="reference") * 2

    pred, target = torch.randn(20, 6, requires_grad=True), torch.randn(20, 6)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(pred, target)
    (g,) = torch.autograd.grad(got, pred)
    want = f(pred, target)
    (g_ref,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, g_ref)


def test_bad_inputs():
    x = torch.randn(4, 3)
    idx = torch.tensor([0, 0, 1, -1])
    with pytest.raises(ValueError, match=r"pred must have shape \[P, C\]"):
        tk.diffusion_loss(torch.randn(4), torch.randn(4), idx)
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        tk.diffusion_loss(x, torch.randn(4, 2), idx)
    with pytest.raises(TypeError, match="target must have the dtype of pred"):
        tk.diffusion_loss(x, x.half(), idx)
    with pytest.raises(TypeError, match="pred must be float16, bfloat16 or float32"):
        tk.diffusion_loss(x.double(), x.double(), idx)
    with pytest.raises(TypeError, match="image_index must be int32 or int64"):
        tk.diffusion_loss(x, x, idx.float())
    with pytest.raises(ValueError, match=r"image_index must have shape \[4\]"):
        tk.diffusion_loss(x, x, idx[:3])
    with pytest.raises(ValueError, match="image_index must be >= -1"):
        tk.diffusion_loss(x, x, torch.tensor([0, -2, 1, 1]))
    with pytest.raises(ValueError, match="at least one channel"):
        tk.diffusion_loss(torch.randn(4, 0), torch.randn(4, 0), idx)
