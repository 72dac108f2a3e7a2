"""The 'transfusion' attention as a drop-in for stock attention in transformers: no mask argument,
padding, packed position_ids, sliding windows, images and generate() with a KV cache on tiny
random Llama, Mistral, Qwen2 and Gemma-2 models, against the same models with eager attention."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import transfusion_kernels as tk  # noqa: E402
from transfusion_kernels.integrations import transformers as tk_hf  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 61
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
)
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    # windows shorter than prompt + new tokens, so they cut keys both in the prefill and from the cache
    "mistral": (MistralForCausalLM, MistralConfig, dict(sliding_window=5)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # logit softcap on the attention scores (small enough to bend them), a sliding and a full layer
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config,
        dict(head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=2.0, sliding_window=4),
    ),
}
TOL = dict(rtol=1e-4, atol=1e-5)


def models(name, seed):
    cls, cfg_cls, extra = MODELS[name]
    torch.manual_seed(seed)
    cfg = cfg_cls(**COMMON, **extra)
    cfg._attn_implementation = "eager"
    eager = cls(cfg).eval()
    if name == "gemma2":  # scores of order 5 at init's weights times 20: the cap of 2 bends them
        with torch.no_grad():
            for layer in eager.model.layers:
                layer.self_attn.q_proj.weight.mul_(20)
                layer.self_attn.k_proj.weight.mul_(20)
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(tk_hf.register())
    return eager, ours


def padded_batch(seed, side, lengths=(9, 6)):
    gen = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), S), generator=gen)
    am = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, S - n :] = 1 if side == "left" else 0
        am[b, :n] = 1 if side == "right" else am[b, :n]
    return ids * am, am


def generate(model, ids, am, sample, **kw):
    torch.manual_seed(7)
    return model.generate(
        ids,
        attention_mask=am,
        max_new_tokens=6,
        do_sample=sample,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("name", list(MODELS))
def test_generate_left_padded_matches_eager(name, sample, seed):
    eager, ours = models(name, seed)
    ids, am = padded_batch(seed, "left")
    with torch.no_grad():
        want, got = generate(eager, ids, am, sample), generate(ours, ids, am, sample)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):  # every step's logits, not only the chosen tokens
        torch.testing.assert_close(a, b, **TOL)


def test_gemma2_softcap_is_applied(seed):
    """The softcap reaches the kernel: without it the same Gemma-2 gives other logits, with it
    the eager model's (the generate test above checks generate() end to end)."""
    eager, ours = models("gemma2", seed)
    ids, am = padded_batch(seed, "left")
    real = am.bool()  # padding queries see no keys: eager and the kernel differ there, as for every model
    with torch.no_grad():
        want = eager(ids, attention_mask=am).logits
        torch.testing.assert_close(ours(ids, attention_mask=am).logits[real], want[real], **TOL)
        for layer in ours.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = ours(ids, attention_mask=am).logits
    assert (uncapped[real] - want[real]).abs().max() > 100 * TOL["atol"]


def test_generate_triton_backend(seed):
    pytest.importorskip("triton")
    eager, ours = models("mistral", seed)
    ids, am = padded_batch(seed, "left", (5, 3))
    with torch.no_grad(), tk_hf.use_mask(backend="triton"):
        got = generate(ours, ids, am, False)
    want = generate(eager, ids, am, False)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, **TOL)


def test_generate_static_cache(seed):
    eager, ours = models("llama", seed)
    ids, am = padded_batch(seed, "left")
    with torch.no_grad():
        want = generate(eager, ids, am, False, cache_implementation="static")
        got = generate(ours, ids, am, False, cache_implementation="static")
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_right_padded_forward_and_generate(name, seed):
    eager, ours = models(name, seed)
    ids, am = padded_batch(seed, "right")
    with torch.no_grad():
        want, got = eager(ids, attention_mask=am).logits, ours(ids, attention_mask=am).logits
        real = am.bool()
        torch.testing.assert_close(got[real], want[real], **TOL)
        with pytest.raises(ValueError, match="pad on the left"):  # new tokens after the padding: not an interval
            ours.generate(ids, attention_mask=am, max_new_tokens=2)


def test_padding_folds_into_a_given_mask(seed):
    """transfusion_mask plus a padded attention_mask: the padding is applied, not ignored."""
    eager, ours = models("llama", seed)
    ids, am = padded_batch(seed, "left")
    B, S = ids.shape
    causal = tk.HybridMask.causal(torch.arange(B + 1, dtype=torch.int32) * S)
    with torch.no_grad():
        want = eager(ids, attention_mask=am, use_cache=False).logits
        got = ours(ids, attention_mask=am, use_cache=False, transfusion_mask=causal).logits
    torch.testing.assert_close(got[am.bool()], want[am.bool()], **TOL)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_packed_position_ids_give_documents(name, seed):
    """position_ids restarting per sequence (DataCollatorWithFlattening) without any mask argument."""
    eager, ours = models(name, seed)
    cu = torch.tensor([0, 7, 10, 18])
    pos = tk_hf.packed_position_ids(cu)[None]
    ids = torch.randint(1, VOCAB, (1, 18), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # eager derives documents only without an attention_mask and a cache
        want = eager(ids, position_ids=pos, use_cache=False).logits
        got = ours(ids, position_ids=pos).logits
        crossing = ours(ids, position_ids=torch.arange(18)[None]).logits
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got[:, 7:], crossing[:, 7:], **TOL)  # the documents do change the result


def dense_additive(allowed):
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def image_oracle_mask(am, image_ids, n):
    """bool [B, n, n]: causal, padding, bidirectional inside each image (the first n positions)."""
    B = am.shape[0]
    am = torch.nn.functional.pad(am, (0, n - am.shape[1]), value=1).bool()
    ids = torch.nn.functional.pad(image_ids, (0, n - image_ids.shape[1]), value=-1)
    i = torch.arange(n)
    causal = i[None, :, None] >= i[None, None, :]
    same_img = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    return (causal | same_img) & am[:, None, :] & torch.ones(B, n, n, dtype=torch.bool)


def test_images_survive_generate(seed):
    """Image spans through use_mask(image_ids=) in generate() with left padding and a KV cache,
    against eager attention re-run on the whole sequence with the dense mask at every step."""
    eager, ours = models("llama", seed)
    ids, am = padded_batch(seed, "left", (10, 7))
    image_ids = torch.full(ids.shape, -1)
    image_ids[0, 2:5], image_ids[0, 5:8], image_ids[1, 4:8] = 0, 1, 0  # two adjacent images in row 0
    with torch.no_grad(), tk_hf.use_mask(image_ids=image_ids):
        got = ours.generate(
            ids, attention_mask=am, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    seq = ids
    with torch.no_grad():
        for step in range(4):
            n = seq.shape[1]
            full_am = torch.nn.functional.pad(am, (0, n - am.shape[1]), value=1)
            pos = (full_am.cumsum(-1) - 1).clamp_min(0)
            logits = eager(
                seq,
                attention_mask=dense_additive(image_oracle_mask(am, image_ids, n)),
                position_ids=pos,
                use_cache=False,
            ).logits[:, -1]
            torch.testing.assert_close(got.logits[step], logits, **TOL)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(got.sequences, seq)
    with torch.no_grad():  # the spans do change the result
        plain = ours(ids, attention_mask=am).logits[:, -1]
    assert not torch.allclose(plain, got.logits[0], **TOL)


def test_images_with_window_and_keyword(seed):
    """transfusion_image_ids as a keyword with Mistral's sliding window: the union of window and image."""
    eager, ours = models("mistral", seed)
    ids = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(seed))
    image_ids = torch.full(ids.shape, -1)
    image_ids[0, 3:11] = 0  # longer than the window of 5
    n = ids.shape[1]
    i = torch.arange(n)
    window = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 5)
    same_img = (image_ids[0, :, None] == image_ids[0, None, :]) & (image_ids[0, :, None] >= 0)
    with torch.no_grad():
        want = eager(ids, attention_mask=dense_additive((window | same_img)[None]), use_cache=False).logits
        got = ours(ids, transfusion_image_ids=image_ids).logits
    torch.testing.assert_close(got, want, **TOL)


def test_four_d_mask_is_used_like_eager(seed):
    eager, ours = models("llama", seed)
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))
    i = torch.arange(8)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 3)  # a window as a 4-D mask
    m = dense_additive(allowed.expand(2, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=m).logits, eager(ids, attention_mask=m).logits, **TOL)
        holes = allowed.clone()
        holes[5, 4] = False  # query 5 sees keys 3 and 5
        with pytest.raises(ValueError, match="not one key interval per query"):
            ours(ids, attention_mask=dense_additive(holes.expand(2, 8, 8)))


def test_image_id_errors(seed):
    _, ours = models("llama", seed)
    ids = torch.randint(1, VOCAB, (1, 10))
    split = torch.full((1, 10), -1)
    split[0, 1:3], split[0, 5:7] = 0, 0
    with torch.no_grad(), pytest.raises(ValueError, match="two separate runs"):
        ours(ids, transfusion_image_ids=split)
    crossing = torch.full((1, 10), -1)
    crossing[0, 3:7] = 0
    pos = tk_hf.packed_position_ids(torch.tensor([0, 5, 10]))[None]
    with torch.no_grad(), pytest.raises(ValueError, match="crosses a document boundary"):
        ours(ids, position_ids=pos, transfusion_image_ids=crossing)
