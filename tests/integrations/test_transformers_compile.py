"""The transformers mask path under torch.compile(fullgraph=True) and across threads: no host
reads of tensor values, no id()-keyed state, use_mask per thread."""

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

import transfusion_kernels as tk  # noqa: E402
from transfusion_kernels.integrations import transformers as tk_hf  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 97


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
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(tk_hf.register())
    return model


def test_llama_forward_compiles_with_fullgraph():
    """A padded batch with image ids: the whole forward (mask builder, interval derivation,
    padding fold, checks, attention) is one graph, and it matches the eager forward."""
    model = tiny_llama(0)
    ids = torch.randint(0, VOCAB, (2, 24))
    attention_mask = torch.ones(2, 24, dtype=torch.long)
    attention_mask[1, :5] = 0  # left padding
    image_ids = torch.full((2, 24), -1)
    image_ids[0, 4:10] = 0
    image_ids[1, 12:20] = 3

    def forward(ids, attention_mask, image_ids):
        return model(
            input_ids=ids, attention_mask=attention_mask, transfusion_image_ids=image_ids, use_cache=False
        ).logits

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = forward(ids, attention_mask, image_ids)
        got = compiled(ids, attention_mask, image_ids)
        # another padding pattern and other images: the same graph, no values baked in
        attention_mask[0, :3] = 0
        image_ids[0] = -1
        again, want_again = compiled(ids, attention_mask, image_ids), forward(ids, attention_mask, image_ids)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want_again)
    assert not torch.equal(again[0], got[0])


def test_use_mask_is_per_thread():
    """Another thread's use_mask block (a fixed mask that fits none of this thread's calls) does
    not reach this thread's forward."""
    model = tiny_llama(1)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    inside, done = threading.Event(), threading.Event()

    def other():
        with tk_hf.use_mask(tk.HybridMask.causal(torch.tensor([0, 5], dtype=torch.int32))):
            inside.set()
            done.wait(30)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert inside.wait(30)
        with torch.no_grad():
            got = model(input_ids=ids).logits
    finally:
        done.set()
        t.join(30)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with tk_hf.use_mask(tk.HybridMask.causal(torch.tensor([0, 5], dtype=torch.int32))), torch.no_grad():
        with pytest.raises(ValueError, match="transfusion_mask covers 5 queries"):
            model(input_ids=ids)  # the same block in this thread does reach it
