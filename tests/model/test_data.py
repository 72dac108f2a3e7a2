"""Packed batch layout, labels and the Transfusion mask built from it."""

import pytest
import torch

from transfusion.data import (
    IGNORE,
    CAPTION_TEMPLATES,
    WORDS,
    Image,
    MixedBatches,
    load_digits_split,
    pack_documents,
    parse_digit,
    text_corpus,
)
from transfusion.config import DataConfig


def naive_mask(doc_of, img_of):
    """Dense Transfusion mask by the paper's rule: same document, and j <= i or same image."""
    n = len(doc_of)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if doc_of[i] == doc_of[j] and (j <= i or (img_of[i] >= 0 and img_of[i] == img_of[j])):
                m[i, j] = True
    return m


def test_pack_layout_and_mask(tok):
    a, b = torch.randn(1, 4, 6), torch.randn(1, 2, 2)  # two images of different sizes, patch 2
    cap = tok.encode("a handwritten seven")
    docs = [
        [tok.encode("one plus one is two")],  # text only
        [cap, Image(a)],  # caption first
        [Image(b, max_timestep=500), cap, Image(a)],  # image first, then a second image
    ]
    g = torch.Generator().manual_seed(0)
    batch = pack_documents(docs, tok, patch_size=2, generator=g)
    ids, P = batch.input_ids.tolist(), tok.pad_id
    n0 = 1 + len(docs[0][0]) + 1
    n1 = 1 + len(cap) + 1 + 6 + 1 + 1
    n2 = 1 + 1 + 1 + 1 + len(cap) + 1 + 6 + 1 + 1
    assert batch.cu_seqlens.tolist() == [0, n0, n0 + n1, n0 + n1 + n2]
    o1, o2 = n0, n0 + n1
    assert ids[o1 : o1 + 1 + len(cap) + 1] == [tok.bos_id] + cap + [tok.boi_id]
    s1 = o1 + 1 + len(cap) + 1
    assert ids[s1 : s1 + 6] == [P] * 6 and ids[s1 + 6 : s1 + 8] == [tok.eoi_id, tok.eos_id]
    s2 = o2 + 2
    s3 = s2 + 1 + 1 + len(cap) + 1
    assert ids[o2 : o2 + 2] == [tok.bos_id, tok.boi_id] and ids[s2 + 1] == tok.eoi_id
    assert batch.image_spans.tolist() == [[s1, s1 + 6], [s2, s2 + 1], [s3, s3 + 6]]
    assert batch.image_spans.dtype == torch.int32 and batch.cu_seqlens.dtype == torch.int32
    # positions restart per document
    assert batch.positions.tolist() == list(range(n0)) + list(range(n1)) + list(range(n2))
    # image index: -1 on text, m on image m's patches
    expect = [-1] * len(ids)
    for m, (s, e) in enumerate(batch.image_spans.tolist()):
        expect[s:e] = [m] * (e - s)
    assert batch.image_index.tolist() == expect
    # labels: next token when both are text in the same document
    for i in range(len(ids)):
        doc_end = next(c for c in batch.cu_seqlens.tolist()[1:] if c > i)
        want = ids[i + 1] if i + 1 < doc_end and expect[i] < 0 and expect[i + 1] < 0 else IGNORE
        assert batch.labels[i].item() == want, i
    # timesteps: uniform in [0, cap]; the image-first image is capped at 500
    assert len(batch.timesteps) == 3 and 0 <= batch.timesteps[1] <= 500
    assert all(0 <= t < 1000 for t in batch.timesteps.tolist())
    # the mask from the batch is the paper's rule
    doc_of = torch.repeat_interleave(torch.arange(3), torch.diff(batch.cu_seqlens.long())).tolist()
    dense = batch.mask().to_dense()
    assert torch.equal(dense, naive_mask(doc_of, expect))


def test_pack_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="patch_size"):
        pack_documents([[Image(torch.randn(1, 3, 4))]], tok, patch_size=2)
    with pytest.raises(TypeError):
        pack_documents([["not ids"]], tok, patch_size=2)
    with pytest.raises(ValueError):
        pack_documents([], tok, patch_size=2)


def test_mixed_batches_mix_and_determinism(tok):
    data = load_digits_split(0.2, 0, 8)
    cfg = DataConfig(docs_per_batch=200, text_fraction=0.25, image_first_fraction=0.2, caption_dropout=0.1)
    mb = MixedBatches(data.train_images, data.train_labels, text_corpus(0, 200), tok, cfg, patch_size=2)
    docs = mb.documents(3)
    kinds = []
    for d in docs:
        if len(d) == 1 and not isinstance(d[0], Image):
            kinds.append("text")
        elif len(d) == 1:
            kinds.append("dropped")
        elif isinstance(d[0], Image):
            kinds.append("image_first")
            assert d[0].max_timestep == 500
        else:
            kinds.append("caption_first")
            assert d[1].max_timestep is None
            assert parse_digit(tok.decode(d[0])) is not None
    n = len(docs)
    assert 0.15 * n < kinds.count("text") < 0.35 * n
    pairs = n - kinds.count("text")
    assert 0.1 * pairs < kinds.count("image_first") < 0.3 * pairs
    assert kinds.count("dropped") > 0
    b1, b2 = mb.batch(5), mb.batch(5)
    assert torch.equal(b1.input_ids, b2.input_ids) and torch.equal(b1.timesteps, b2.timesteps)
    assert b1.noise_seed == b2.noise_seed
    assert not torch.equal(mb.batch(6).input_ids[:50], b1.input_ids[:50]) or mb.batch(6).noise_seed != b1.noise_seed
    # the iterator's state is the step: resuming reproduces the stream
    next(mb)
    next(mb)
    state = mb.state_dict()
    nxt = next(mb)
    mb2 = MixedBatches(data.train_images, data.train_labels, text_corpus(0, 200), tok, cfg, patch_size=2)
    mb2.load_state_dict(state)
    assert torch.equal(next(mb2).input_ids, nxt.input_ids)


def test_captions_and_parser():
    for d in range(10):
        for t in CAPTION_TEMPLATES:
            assert parse_digit(t.format(word=WORDS[d], num=d)) == d
    assert parse_digit("nothing here") is None
    assert parse_digit("the digit 7, written by hand") == 7


def test_digits_split():
    d = load_digits_split(0.2, 0, 8)
    assert d.train_images.shape[1:] == (1, 8, 8) and d.train_images.min() >= -1 and d.train_images.max() <= 1
    assert len(d.train_labels) + len(d.test_labels) == 1797
    assert set(d.test_labels.tolist()) == set(range(10))
    up = load_digits_split(0.2, 0, 16)
    assert up.train_images.shape[1:] == (1, 16, 16)


def test_tokenizer_specials_and_roundtrip(tok, tmp_path):
    ids = {tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id}
    assert len(ids) == 5 and max(ids) < tok.vocab_size
    text = "three plus four is seven"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_id] + tok.encode(text) + [tok.boi_id, tok.eoi_id, tok.eos_id]) == text
    tok.save(tmp_path / "t.model")
    from transfusion.tokenizer import Tokenizer

    t2 = Tokenizer.load(tmp_path / "t.model")
    assert t2.encode(text) == tok.encode(text) and t2.vocab_size == tok.vocab_size


def test_tokenizer_any_sentencepiece_model(tmp_path):
    """A SentencePiece model without BOS/EOS/PAD still gets distinct special ids."""
    import io

    import sentencepiece as spm

    from transfusion.tokenizer import Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text_corpus(1, 300)),
        model_writer=buf,
        vocab_size=60,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        unk_id=0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (tmp_path / "x.model").write_bytes(buf.getvalue())
    t = Tokenizer.load(tmp_path / "x.model")
    n = t.sp.get_piece_size()
    assert sorted([t.bos_id, t.eos_id, t.pad_id, t.boi_id, t.eoi_id]) == list(range(n, n + 5))
    assert t.vocab_size == n + 5
    with pytest.raises(TypeError):
        Tokenizer("not bytes")
