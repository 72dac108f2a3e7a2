"""lucidrains' transfusion-pytorch 0.20.0 (from the test extra; nothing is installed here) with its
attention on these kernels: its tanh logit cap on (50), a padded batch of two samples of
different lengths, each with an image and a "not attended" item.

Its attention layer computes q, k, v and then, on CUDA, calls ``flex_attention(q, k, v,
block_mask=bm, score_mod=softcap)``; on a CPU the same math is written inline. The swapped layer
below computes q, k, v with the layer's own modules and makes that one call on the kernels:
``tk.flex_attention(q, k, v, block_mask=bm, softcap=50)`` with the BlockMask of its own mask_mod,
or ``tk.hybrid_attention`` on ``HybridMask.from_dense`` of the mask its CPU path builds.

The oracle is the model as shipped, in float64. Its CPU path gives a query that sees no key (the
tokens of a not-attended item) the mean of all values, its FlexAttention path gives it 0, as the
kernels do; the loss reads such a row (the last token of a not-attended item still predicts the
next one), so the oracle takes the FlexAttention convention. Loss, transformer outputs and every
parameter gradient then follow the 2x rule (docs/design.md §5) against it.
"""

from __future__ import annotations

import copy
import importlib.metadata
from unittest import mock

import pytest
import torch

from tests.oracles import assert_2x

lt = pytest.importorskip("transfusion_pytorch.transfusion")
if importlib.metadata.version("transfusion-pytorch") != "0.20.0":
    pytest.skip("written against transfusion-pytorch 0.20.0 (the test extra's pin)", allow_module_level=True)
einx = pytest.importorskip("einx")
flex = pytest.importorskip("torch.nn.attention.flex_attention")

import transfusion_kernels as tk  # noqa: E402
from transfusion_kernels import HybridMask  # noqa: E402

SOFTCAP = 50.0  # the model's default, on


def make_model():
    torch.manual_seed(0)
    # 'grouped': the default 'auto' times several strategies on first use, drawing random numbers
    return lt.Transfusion(
        num_text_tokens=32,
        dim_latent=16,
        modality_default_shape=(4,),
        transformer=dict(dim=32, depth=2, dim_head=8, heads=4, attn_kwargs=dict(softcap_value=SOFTCAP)),
        modality_processing="grouped",
    )


def make_batch(dtype):
    """Two samples of different lengths (the batch is padded); an item given with a trailing False is not attended."""
    g = torch.Generator().manual_seed(1)
    text = lambda n: torch.randint(0, 32, (n,), generator=g)
    image = lambda n: torch.randn(n, 16, generator=g, dtype=torch.float64).to(dtype)
    return [[text(5), image(4), text(3), (image(3), False), text(4)], [text(6), (text(3), False), image(5), text(2)]]


# ---------------------------------------------------------------------------------------------- the oracle
class _EmptyRowsGiveZero:
    """Stands in for the ``einx`` module inside the model's CPU attention: records which queries
    see some key, and gives the mask value in the scores' dtype (float64 included)."""

    seen = None

    def where(self, pattern, cond, x, y):
        if pattern == "b i j, b h i j, -> b h i j":
            _EmptyRowsGiveZero.seen = cond.any(-1)
            y = torch.tensor(y, dtype=x.dtype)
        return einx.where(pattern, cond, x, y)

    def __getattr__(self, name):
        return getattr(einx, name)


def _einsum_empty_rows_zero(*args):
    out = _EINSUM(*args)
    if args[-1] == "b h i j, b h j d -> b h i d":  # probabilities times values: rows that see nothing give 0
        out = out * _EmptyRowsGiveZero.seen[:, None, :, None].to(out.dtype)
    return out


_EINSUM = lt.einsum


# ---------------------------------------------------------------------------------------------- the swap
def _swapped_forward(route: str, masks: dict):
    def forward(
        self,
        x,
        attn_mask=None,
        rotary_emb=None,
        cache=None,
        causal=False,
        block_mask=None,
        return_kv_cache=False,
        return_values=False,
        value_residual=None,
    ):
        assert cache is None and not causal and not self.laser, "a training forward"
        q, k = self.to_qk(x)
        v = self.to_v(x)
        if self.qk_rmsnorm:
            q, k = self.q_norm(q), self.k_norm(k)
        values = v
        if value_residual is not None:
            mix = self.to_learned_value_residual(x)
            v = v * mix + value_residual * (1.0 - mix)
        if rotary_emb is not None:
            q, k = (lt.apply_rotary_emb(rotary_emb, t, freqs_seq_dim=-2) for t in (q, k))
        if route == "flex_attention":
            out = tk.flex_attention(
                q, k, v, block_mask=masks["block_mask"], scale=self.scale, softcap=self.softcap_value
            )
        else:
            if "hybrid" not in masks:  # once per batch, shared by the layers
                masks["hybrid"] = HybridMask.from_dense(attn_mask)
            out = tk.hybrid_attention(
                q, k, v, masks["hybrid"], softmax_scale=self.scale, layout="bhnd", softcap=self.softcap_value
            )
        if self.to_gates is not None:
            out = out * self.to_gates(x).sigmoid()
        out = self.to_out(out)
        if return_values:
            out = (out, values)
        return (out, torch.stack((k, v))) if return_kv_cache else out

    return forward


def run(model, dtype, route=None):
    """Loss, transformer output and parameter gradients of one training step on make_batch."""
    captured, masks = {}, {}

    def before(module, args, kwargs):
        if route == "flex_attention":  # what the model builds on CUDA, from its own mask_mod
            batch, n = args[0].shape[:2]
            mask_mod = lt.transfusion_attn_mask(kwargs["modality_positions"], kwargs["excluded_spans"])
            masks["block_mask"] = flex.create_block_mask(mask_mod, batch, None, n, n, device="cpu", BLOCK_SIZE=16)

    def after(module, args, kwargs, out):
        captured["out"] = out[0]

    hooks = [
        model.transformer.register_forward_pre_hook(before, with_kwargs=True),
        model.transformer.register_forward_hook(after, with_kwargs=True),
    ]
    if route is None:
        patches = [
            mock.patch.object(lt, "einx", _EmptyRowsGiveZero()),
            mock.patch.object(lt, "einsum", _einsum_empty_rows_zero),
        ]
    else:
        patches = [mock.patch.object(lt.Attention, "forward", _swapped_forward(route, masks))]
    # the flow noise: the same numbers in float32 and float64
    patches.append(
        mock.patch(
            "torch.randn_like", lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())).to(t)
        )
    )
    try:
        for p in patches:
            p.start()
        torch.manual_seed(5)  # its condition dropout draws
        loss = model(make_batch(dtype), times=torch.tensor([[0.3, 0.6], [0.8, 0.0]]))
        loss.backward()
    finally:
        for p in reversed(patches):
            p.stop()
        for h in hooks:
            h.remove()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), captured["out"].detach(), grads


@pytest.fixture(scope="module")
def reference():
    model = make_model()
    baseline = run(model, torch.float32)
    oracle = run(copy.deepcopy(model).double(), torch.float64)
    return model, baseline, oracle


@pytest.mark.parametrize("route", ["flex_attention", "hybrid_attention"])
def test_swapped_attention_equals_its_own(reference, route):
    model, (loss32, out32, grads32), (loss64, out64, grads64) = reference
    loss, out, grads = run(model, torch.float32, route)
    floor = 1e-7
    assert_2x("loss", loss, loss64, loss32, floor)
    assert_2x("transformer output", out, out64, out32, floor)
    assert grads.keys() == grads64.keys() and len(grads) > 40
    for name in grads64:
        assert_2x(f"grad {name}", grads[name], grads64[name], grads32[name], floor)


# ---------------------------------------------------------------------------------------------- its masks
def test_its_masks_convert_exactly():
    """Its mask_mod, its dense mask and its BlockMask give one HybridMask; from_padded on the same
    spans agrees on every row of a real, attended token and hides the not-attended ones."""
    batch, n = 3, 40
    positions = torch.tensor(
        [[[0, 3, 6], [0, 14, 5], [0, 30, 4]], [[0, 2, 8], [0, 0, 0], [0, 0, 0]], [[0, 10, 3], [0, 20, 9], [0, 0, 0]]]
    )  # (type, offset, length), zero-padded
    excluded = torch.tensor([[[12, 20], [29, 35]], [[11, 16], [0, 0]], [[0, 0], [0, 0]]])  # zero-padded
    lengths = [38, 25, 40]

    dense = lt.naive_attn_mask(n, positions, excluded_spans=excluded)
    by_dense = HybridMask.from_dense(dense)
    by_mask_mod = HybridMask.from_mask_mod(lt.transfusion_attn_mask(positions, excluded), batch_size=batch, seq_len=n)
    block_mask = flex.create_block_mask(
        lt.transfusion_attn_mask(positions, excluded), batch, None, n, n, device="cpu", BLOCK_SIZE=16
    )
    by_block_mask = HybridMask.from_block_mask(block_mask)
    for mask in (by_mask_mod, by_block_mask):
        assert torch.equal(mask.starts, by_dense.starts) and torch.equal(mask.ends, by_dense.ends)
    assert by_dense.num_intervals == 3  # a row after two not-attended spans sees three ranges
    assert torch.equal(by_dense.to_dense(), torch.block_diag(*dense))

    spans = torch.stack([positions[..., 1], positions[..., 1:].sum(-1)], -1)
    padded = HybridMask.from_padded(lengths, n, spans, excluded).to_dense()
    real = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    attended = real & dense.any(-1)  # not-attended tokens see nothing in its mask
    for b in range(batch):
        rows = slice(b * n, (b + 1) * n)
        own = padded[rows, rows]
        assert torch.equal(own[attended[b]], dense[b][attended[b]])
        assert not own[attended[b]][:, ~attended[b]].any()  # padding and not-attended keys: unseen
        assert not own[~real[b]].any()  # padded queries see nothing
