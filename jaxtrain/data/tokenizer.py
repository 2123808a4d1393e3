"""Tokenizers for prepared text: byte-level, or BPE with Hugging Face `tokenizers`.

`Bytes` maps text to its UTF-8 bytes (vocabulary 256, no document separator).
`BPE` wraps a `tokenizers.Tokenizer`: trained here on the user's text (byte-level BPE, so
every input encodes and nothing is unknown, with `<|endoftext|>` between documents) or
read from a `tokenizer.json` the user gives. A tokenizer's identity is the SHA-256 of its
JSON (`digest`): the manifest records it, and a run that names another tokenizer than
the one the data was prepared with is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import JaxtrainError
from .text import decode as decode_bytes

EOS = "<|endoftext|>"


class Bytes:
    """UTF-8 bytes as tokens: vocabulary 256, no end-of-document token."""

    kind, vocab_size, eos_id, digest = "bytes", 256, None, "bytes"

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.uint8)

    def decode(self, tokens) -> str:
        return decode_bytes(tokens)


class BPE:
    """A Hugging Face `tokenizers.Tokenizer`; `encode` takes bytes (decoded as UTF-8,
    undecodable bytes replaced). `eos_id` is `<|endoftext|>`'s id, if the vocabulary has it
    (the preparation puts it after each document)."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(EOS)
        self.json = tokenizer.to_str()
        self.digest = hashlib.sha256(self.json.encode()).hexdigest()

    @classmethod
    def from_file(cls, path: str | Path) -> BPE:
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise JaxtrainError(f"tokenizer file {path} does not exist")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise JaxtrainError(f"tokenizer file {path} is not a Hugging Face tokenizer.json: "
                                f"{str(err).splitlines()[0]}") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPE:
        """A byte-level BPE of `vocab_size` tokens (256 bytes + merges + `<|endoftext|>`)
        learned from `texts` (an iterator: the corpus is streamed, not held)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not isinstance(vocab_size, int) or vocab_size < 258:
            raise JaxtrainError(f"BPE vocab_size must be an integer >= 258 (256 bytes, one "
                                f"merge, {EOS}), got {vocab_size!r}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, data: bytes) -> np.ndarray:
        """Token ids of `data`; long texts are encoded in pieces of about 64 KB cut
        at line ends (the Rust encoder runs the pieces on all cores)."""
        text = data.decode("utf-8", errors="replace")
        pieces = _pieces(text, 2**16)
        ids = [np.asarray(e.ids, np.uint32) for e in self.tok.encode_batch(pieces,
                                                                           add_special_tokens=False)]
        return np.concatenate(ids) if ids else np.zeros(0, np.uint32)

    def decode(self, tokens) -> str:
        return self.tok.decode([int(t) for t in np.asarray(tokens).ravel()],
                               skip_special_tokens=False)

    def save(self, path: Path) -> None:
        path.write_text(self.json)


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut after a newline every `size` characters or so (no cut if none)."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        if cut < 0:
            break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return [p for p in pieces if p]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise JaxtrainError(f"vocabulary of {vocab_size} tokens does not fit in uint32")


def file_digest(path: Path) -> str:
    """SHA-256 of a tokenizer file's normalized JSON (what `BPE.digest` gives)."""
    return BPE.from_file(path).digest
