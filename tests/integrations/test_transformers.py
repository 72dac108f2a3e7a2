"""tk.hybrid_attention inside a transformers Llama model, against the same model with eager
attention and the equivalent dense 4-D additive mask.

Rule: the error of the 'transfusion' model's logits and gradients against a float64 run of the
eager model is at most twice that of the float32 eager model, plus a small floor."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import transfusion_kernels as tk  # noqa: E402
from transfusion_kernels.integrations import transformers as tk_hf  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 97
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_llama(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    cfg._attn_implementation = "eager"
    eager = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-zero everywhere, so every parameter has a real gradient
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(tk_hf.register())
    oracle = copy.deepcopy(eager).double()
    return eager.to(DEVICE), ours.to(DEVICE), oracle.to(DEVICE)


def additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """bool [.., S, S] -> the additive 4-D mask eager attention takes."""
    m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return m if m.dim() == 4 else m[None, None]


def loss_and_grads(model, labels, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_rule(name, got, oracle, baseline, floor=1e-6):
    got, oracle, baseline = got.double(), oracle.double(), baseline.double()
    assert torch.isfinite(got).all(), name
    err = (got - oracle).abs().max().item()
    base = (baseline - oracle).abs().max().item()
    assert err <= 2 * base + floor * max(1.0, oracle.abs().max().item()), (
        f"{name}: error {err:.3g} > 2 x eager fp32 error {base:.3g} + floor"
    )


def compare(eager, ours, oracle, allowed, labels, ids, position_ids, **ours_inputs):
    common = dict(input_ids=ids, position_ids=position_ids)
    logits_e, grads_e = loss_and_grads(eager, labels, attention_mask=additive(allowed, torch.float32), **common)
    logits_o, grads_o = loss_and_grads(oracle, labels, attention_mask=additive(allowed, torch.float64), **common)
    logits, grads = loss_and_grads(ours, labels, **common, **ours_inputs)
    assert_rule("logits", logits, logits_o, logits_e)
    assert set(grads) == set(grads_e)
    for n in grads:
        assert_rule(n, grads[n], grads_o[n], grads_e[n])
    return logits


def packed_case(seed):
    """Two documents in one packed row: text, images of different sizes, text."""
    cu = torch.tensor([0, 41, 70], dtype=torch.int32, device=DEVICE)
    spans = torch.tensor([[3, 12], [15, 31], [45, 61]], dtype=torch.int32, device=DEVICE)
    mask = tk.HybridMask.from_spans(cu, spans)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, 70), generator=gen).to(DEVICE)
    labels = torch.randint(0, VOCAB, (1, 70), generator=gen).to(DEVICE)
    return cu, mask, ids, labels


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_batch_matches_dense_mask_eager(backend, seed):
    if backend == "triton":
        pytest.importorskip("triton")
    eager, ours, oracle = tiny_llama(seed)
    cu, mask, ids, labels = packed_case(seed)
    pos = tk_hf.packed_position_ids(cu)[None]
    compare(eager, ours, oracle, mask.to_dense(), labels, ids, pos, transfusion_mask=mask, transfusion_backend=backend)


def test_context_manager_and_keyword_agree(seed):
    eager, ours, oracle = tiny_llama(seed)
    cu, mask, ids, labels = packed_case(seed)
    pos = tk_hf.packed_position_ids(cu)[None]
    with torch.no_grad():
        by_kw = ours(input_ids=ids, position_ids=pos, transfusion_mask=mask).logits
        with tk_hf.use_mask(mask):
            by_ctx = ours(input_ids=ids, position_ids=pos).logits
        with tk_hf.use_mask(tk.HybridMask.causal(cu)):  # the keyword wins over the block
            by_both = ours(input_ids=ids, position_ids=pos, transfusion_mask=mask).logits
            by_causal = ours(input_ids=ids, position_ids=pos).logits
    assert torch.equal(by_kw, by_ctx) and torch.equal(by_kw, by_both)
    assert not torch.allclose(by_kw, by_causal)  # the image spans do change the result


def test_equal_length_batch_is_flattened(seed):
    eager, ours, oracle = tiny_llama(seed)
    S = 33
    # row 0: text, image, text; row 1: two documents, the second with an image
    cu = torch.tensor([0, S, S + 12, 2 * S], dtype=torch.int32, device=DEVICE)
    spans = torch.tensor([[4, 20], [S + 15, S + 25]], dtype=torch.int32, device=DEVICE)
    mask = tk.HybridMask.from_spans(cu, spans)
    dense = mask.to_dense()
    allowed = torch.stack([dense[:S, :S], dense[S:, S:]])[:, None]  # [2, 1, S, S]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, S), generator=gen).to(DEVICE)
    labels = torch.randint(0, VOCAB, (2, S), generator=gen).to(DEVICE)
    pos = tk_hf.packed_position_ids(cu).view(2, S)
    compare(eager, ours, oracle, allowed, labels, ids, pos, transfusion_mask=mask)


def test_mismatched_or_wrong_mask(seed):
    _, ours, _ = tiny_llama(seed)
    cu, mask, ids, _ = packed_case(seed)
    short = tk.HybridMask.causal(torch.tensor([0, 50], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="transfusion_mask covers 50 queries.*leave transfusion_mask out"):
        ours(input_ids=ids, transfusion_mask=short)
    with pytest.raises(TypeError, match="HybridMask"):
        ours(input_ids=ids, transfusion_mask=mask.to_dense())
    n = mask.num_queries  # a union of two intervals per query: refused in one line
    union = tk.HybridMask.from_intervals(
        torch.zeros(n, 2, dtype=torch.int32, device=DEVICE), torch.zeros(n, 2, dtype=torch.int32, device=DEVICE), n
    )
    with pytest.raises(ValueError, match="2 intervals per query"):
        ours(input_ids=ids, transfusion_mask=union)


def test_packed_position_ids():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    assert tk_hf.packed_position_ids(cu).tolist() == [0, 1, 2, 0, 1, 2, 3]
