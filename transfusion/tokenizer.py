"""SentencePiece tokenizer plus the special tokens a Transfusion sequence needs.

BOI and EOI (begin / end of image) and PAD are appended after the SentencePiece vocabulary, and
so are BOS / EOS when the SentencePiece model has none: any ``.model`` file works unchanged.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_proto: bytes):
        if not isinstance(model_proto, (bytes, bytearray)):
            raise TypeError(f"model_proto must be bytes (a serialised SentencePiece model), got {type(model_proto)}")
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        n = self.sp.get_piece_size()
        extra = []

        def take(name: str) -> int:
            extra.append(name)
            return n + len(extra) - 1

        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else take("<bos>")
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else take("<eos>")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else take("<pad>")
        self.boi_id = take("<boi>")
        self.eoi_id = take("<eoi>")
        self._extra = extra
        self.vocab_size = n + len(extra)
        self.special_ids = {self.bos_id, self.eos_id, self.pad_id, self.boi_id, self.eoi_id}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 256, model_type: str = "bpe") -> "Tokenizer":
        """Train a SentencePiece model on ``texts`` (in memory)."""
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            hard_vocab_limit=False,  # small corpora may support fewer pieces than asked for
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        return cls(buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as f:
            f.write(self.model_proto)

    # -- use ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text)}")
        return list(self.sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, PAD, BOI, EOI) are dropped."""
        n = self.sp.get_piece_size()
        keep = [int(i) for i in ids if int(i) not in self.special_ids and 0 <= int(i) < n]
        return self.sp.decode(keep)

    def __len__(self) -> int:
        return self.vocab_size
