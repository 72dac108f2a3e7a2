"""The model: shapes, exact attention splitting, and the KV cache against the full forward."""

import pytest
import torch

from transfusion.data import Image, pack_documents
from transfusion.image import patchify, unpatchify
from transfusion.model import KVCache, TransfusionModel, split_attention_blocks
from transfusion.sample import _image_step, _text_step

from conftest import tiny_model_config


def test_patchify_roundtrip():
    x = torch.randn(3, 2, 6, 4)
    rows = patchify(x, 2)
    assert rows.shape == (3 * 3 * 2, 8)
    # patch (r, c) of image g holds x[g, :, 2r:2r+2, 2c:2c+2] in row-major order
    assert torch.equal(rows[1 * 6 + 2 * 2 + 1], x[1, :, 4:6, 2:4].reshape(-1))
    assert torch.equal(unpatchify(rows, 3, 2, 6, 4, 2), x)


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_forward_shapes_any_number_and_size_of_images(tok, encoder):
    cfg = tiny_model_config(tok.vocab_size, image_encoder=encoder)
    model = TransfusionModel(cfg, backend="reference")
    cap = tok.encode("a handwritten two")
    imgs = [torch.randn(1, 4, 4), torch.randn(1, 8, 4), torch.randn(1, 4, 4)]
    docs = [[cap, Image(imgs[0]), cap, Image(imgs[1])], [tok.encode("one two three")], [Image(imgs[2]), cap]]
    b = pack_documents(docs, tok, 2)
    logits, eps = model(b.input_ids, b.positions, b.image_index, b.mask(), b.images, b.timesteps)
    assert logits.shape == (len(b.input_ids), tok.vocab_size)
    assert eps.shape == (4 + 8 + 4, 4) and torch.isfinite(eps).all()
    # every parameter gets a gradient (image side included)
    model.image.proj_out.weight.data.normal_() if encoder == "linear" else model.image.conv_out.weight.data.normal_()
    logits, eps = model(b.input_ids, b.positions, b.image_index, b.mask(), b.images, b.timesteps)
    (logits.square().mean() + eps.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_split_attention_blocks_is_exact(tok):
    cfg = tiny_model_config(tok.vocab_size)
    model = TransfusionModel(cfg, backend="reference").eval()
    cap = tok.encode("the number 4")
    docs = [[cap, Image(torch.randn(1, 4, 4))] for _ in range(7)] + [[tok.encode("five six seven")]]
    b = pack_documents(docs, tok, 2)
    mask = b.mask()
    blocks = split_attention_blocks(mask, 40)
    assert isinstance(blocks, list) and len(blocks) > 2
    assert blocks[0][0] == 0 and blocks[-1][1] == len(b.input_ids)
    assert all(x[1] == y[0] for x, y in zip(blocks, blocks[1:]))
    # self-attention blocks start at document boundaries, keys = queries
    assert {a for a, *_ in blocks} <= set(b.cu_seqlens.tolist())
    assert all((a, bb) == (c, d) for a, bb, c, d, _ in blocks)
    model.attention_block_tokens = None
    full = model(b.input_ids, b.positions, b.image_index, mask, b.images, b.timesteps)
    model.attention_block_tokens = 40
    split = model(b.input_ids, b.positions, b.image_index, mask, b.images, b.timesteps)
    for x, y in zip(full, split):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder,block", [("linear", None), ("unet", None), ("linear", 8)])
def test_cached_diffusion_step_equals_full_forward(tok, encoder, block):
    """Image queries against the KV cache give the same noise prediction as the full packed
    forward of [BOS] caption [BOI] x_t (two sequences of different lengths at once)."""
    cfg = tiny_model_config(tok.vocab_size, image_encoder=encoder)
    model = TransfusionModel(cfg, backend="reference").eval()
    model.attention_block_tokens = block  # 8: every sequence's attention in its own call
    with torch.no_grad():  # make the image side non-trivial
        for p in model.image.parameters():
            p.add_(0.05 * torch.randn_like(p))
    caps = [tok.encode("a handwritten seven"), tok.encode("three")]
    x_t = torch.randn(2, 1, 4, 6)
    t = torch.tensor([700, 123])
    # full forward: one packed batch, the image as the last segment (no EOI/EOS after it matters
    # to its patches: they cannot see later tokens)
    b = pack_documents([[c, Image(x)] for c, x in zip(caps, x_t)], tok, 2)
    with torch.no_grad():
        _, eps_full = model(b.input_ids, b.positions, b.image_index, b.mask(), list(x_t), t)
    # cached: prefill [BOS] caption [BOI], then only the image queries
    cache = KVCache(cfg, 2, "cpu", capacity=4)  # small capacity: exercises growth
    with torch.no_grad():
        _text_step(model, cache, [0, 1], [[tok.bos_id] + c + [tok.boi_id] for c in caps])
        lens = cache.lens.clone()
        eps_cached = _image_step(model, cache, [0, 1], x_t, t, commit=False)
    assert torch.equal(cache.lens, lens)  # diffusion steps do not write to the cache
    torch.testing.assert_close(eps_cached, eps_full, rtol=1e-4, atol=1e-5)


def test_causal_image_attention_drops_only_the_image_spans(tok):
    """image_attention="causal": training and the cached sampler use the causal mask inside
    images, consistently; the bidirectional model's first patch sees later patches."""
    caps = [tok.encode("a handwritten seven")]
    x_t, t = torch.randn(1, 1, 4, 6), torch.tensor([400])
    b = pack_documents([[caps[0], Image(x_t[0])]], tok, 2)
    preds = {}
    for attn in ("causal", "bidirectional"):
        cfg = tiny_model_config(tok.vocab_size, image_attention=attn)
        torch.manual_seed(0)
        model = TransfusionModel(cfg, backend="reference").eval()
        with torch.no_grad():  # the output layer starts at zero
            for p in model.image.parameters():
                p.add_(0.05 * torch.randn_like(p))
        mask = b.mask(cfg.bidirectional_images)
        assert (mask.kv_end[b.image_index >= 0] == torch.arange(len(b.input_ids))[b.image_index >= 0] + 1).all() == (
            attn == "causal"
        )
        with torch.no_grad():
            _, full = model(b.input_ids, b.positions, b.image_index, mask, list(x_t), t)
            cache = KVCache(cfg, 1, "cpu", capacity=8)
            _text_step(model, cache, [0], [[tok.bos_id] + caps[0] + [tok.boi_id]])
            cached = _image_step(model, cache, [0], x_t, t, commit=False)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
        preds[attn] = full
    assert not torch.allclose(preds["causal"][0], preds["bidirectional"][0])


def test_cached_text_decoding_equals_full_forward(tok):
    cfg = tiny_model_config(tok.vocab_size)
    model = TransfusionModel(cfg, backend="reference").eval()
    ids = [tok.bos_id] + tok.encode("two plus two is four")
    img = torch.randn(1, 4, 4)
    b = pack_documents([[ids[1:], Image(img), tok.encode("four")]], tok, 2)
    with torch.no_grad():
        logits_full, _ = model(
            b.input_ids, b.positions, b.image_index, b.mask(), [img], torch.zeros(1, dtype=torch.long)
        )
        cache = KVCache(cfg, 1, "cpu", capacity=8)
        out = [_text_step(model, cache, [0], [ids + [tok.boi_id]])]
        _image_step(model, cache, [0], img[None], torch.zeros(1, dtype=torch.long), commit=True)
        for t in [tok.eoi_id] + tok.encode("four"):
            out.append(_text_step(model, cache, [0], [[t]]))
    n = len(ids) + 1
    pos = [n - 1] + list(range(n + 4, n + 4 + 1 + len(tok.encode("four"))))
    torch.testing.assert_close(torch.cat(out), logits_full[pos], rtol=1e-4, atol=1e-5)


def test_model_config_validation():
    from transfusion.config import ModelConfig

    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="image_encoder"):
        ModelConfig(image_encoder="conv")
    with pytest.raises(ValueError, match="unet_channels"):
        ModelConfig(image_encoder="unet", unet_channels=(8, 16, 32))
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3, dim=32)


def test_image_side_rejects_bad_images(tok):
    model = TransfusionModel(tiny_model_config(tok.vocab_size))
    with pytest.raises(ValueError, match="divisible"):
        model.embed_images([torch.randn(1, 3, 4)], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="C=1"):
        model.embed_images([torch.randn(3, 4, 4)], torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("k, h, w", [(3, 6, 6), (3, 9, 9), (8, 8, 16)])
def test_unet_any_patch_size(tok, k, h, w):
    """The U-Net codec takes any patch size that divides the image (here 3 and 8): one vector per
    k x k patch, a gradient for every parameter, and the cached diffusion step equal to the full
    forward."""
    cfg = tiny_model_config(tok.vocab_size, image_encoder="unet", patch_size=k)
    model = TransfusionModel(cfg, backend="reference")
    with torch.no_grad():  # the output layer starts at zero
        for p in model.image.parameters():
            p.add_(0.05 * torch.randn_like(p))
    caps = [tok.encode("a handwritten seven"), tok.encode("three")]
    x_t, t = torch.randn(2, 1, h, w), torch.tensor([700, 123])
    b = pack_documents([[c, Image(x)] for c, x in zip(caps, x_t)], tok, k)
    assert int((b.image_index >= 0).sum()) == 2 * (h // k) * (w // k)
    logits, eps = model(b.input_ids, b.positions, b.image_index, b.mask(), list(x_t), t)
    assert eps.shape == (2 * (h // k) * (w // k), k * k) and torch.isfinite(eps).all()
    (logits.square().mean() + eps.square().mean()).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    cache = KVCache(cfg, 2, "cpu", capacity=4)
    with torch.no_grad():
        _, eps_full = model(b.input_ids, b.positions, b.image_index, b.mask(), list(x_t), t)
        _text_step(model, cache, [0, 1], [[tok.bos_id] + c + [tok.boi_id] for c in caps])
        eps_cached = _image_step(model, cache, [0, 1], x_t, t, commit=False)
    torch.testing.assert_close(eps_cached, eps_full, rtol=1e-4, atol=1e-5)


def test_unet_downsampling_split_keeps_the_small_patch_sizes():
    """Patch sizes 1, 2 and 4 keep their layers (3x3 stride-2 convolutions, as before); any other
    size splits into two factors whose convolutions shrink an exact multiple k-fold."""
    from transfusion.image import UNetPatches, down_factors

    assert [down_factors(k) for k in (1, 2, 3, 4, 6, 8, 9, 16)] == [
        (1, 1),
        (2, 1),
        (3, 1),
        (2, 2),
        (3, 2),
        (4, 2),
        (3, 3),
        (4, 4),
    ]
    for k, convs in ((1, 0), (2, 1), (4, 2)):
        u = UNetPatches(1, k, 16, (8, 16), 32)
        pools = [m for m in (u.pool1, u.pool2) if isinstance(m, torch.nn.Conv2d)]
        assert len(pools) == convs and all(m.kernel_size == (3, 3) and m.stride == (2, 2) for m in pools)
    for k in (3, 5, 6, 8, 12):
        u = UNetPatches(1, k, 16, (8, 16), 32)
        x = torch.randn(2, 1, 2 * k, 3 * k)
        rows, _ = u.encode(list(x), torch.tensor([5, 6]))
        assert rows.shape == (2 * 2 * 3, 16)
