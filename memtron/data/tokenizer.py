"""Tokenizers: a byte-level default that needs no files, and any local Hugging Face
``tokenizer.json``.

Both append nothing on their own: document boundaries are marked by ``eos_id``, which
``prepare`` inserts after every document, so the model sees one convention whatever the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

# Tried in this order; the first one present in the vocabulary ends documents.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    spec: str  # what load_tokenizer() needs to rebuild this tokenizer

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then eos (256) and three reserved ids: no training, no file,
    and every string round-trips exactly."""

    vocab_size = 260
    eos_id = 256
    spec = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local ``tokenizer.json`` read with the ``tokenizers`` library (never downloads)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _RustTokenizer

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"{file}: tokenizer file does not exist")
        try:
            self._tokenizer = _RustTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{file}: cannot load tokenizer: {e}") from e
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        eos = next((token for token in EOS_CANDIDATES if token in vocab), None)
        if eos is None:
            raise ValueError(
                f"{file}: no end-of-document token in the vocabulary "
                f"(looked for {', '.join(EOS_CANDIDATES)})"
            )
        self.eos_id: int = vocab[eos]
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.spec: str = str(file.resolve())

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS from the post-processor: prepare() places eos itself.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or the path of a ``tokenizer.json`` (or of a directory holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    if Path(spec).exists():
        return HFTokenizer(spec)
    raise ValueError(f"tokenizer {spec!r}: neither 'byte' nor an existing tokenizer.json path")


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path) -> HFTokenizer:
    """Train a byte-level BPE ``tokenizer.json`` (GPT-2's pre-tokenizer, ``</s>`` as eos) on
    ``texts`` and write it under ``out``. Byte-level, so any text still round-trips; a larger
    vocabulary merges whole words, which lets a layer see a name as one or two tokens."""
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size {vocab_size}: needs at least {len(alphabet) + 1} "
                         "(the 256 bytes and </s>)")
    tokenizer = _RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_CANDIDATES[0]],
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return HFTokenizer(directory)
