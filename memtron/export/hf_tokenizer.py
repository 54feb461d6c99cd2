"""memtron tokenizers as Hugging Face tokenizer files, so ``AutoTokenizer.from_pretrained(OUT)``
gives the ids memtron trained on.

The byte-level default becomes a ``tokenizer.json``: byte-level pre-tokenisation (GPT-2's
byte-to-character table) into a BPE model without merges whose vocabulary maps every byte to
its own value, then the eos and reserved ids as special tokens. A model trained with a
Hugging Face ``tokenizer.json`` gets a copy of that file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers

from memtron.data.tokenizer import ByteTokenizer, load_tokenizer

BYTE_EOS = "</s>"  # the byte tokenizer's eos (id 256) as a token string


def _byte_chars() -> list[str]:
    """GPT-2's printable character for each byte value (the byte-level pre-tokeniser's)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer() -> RustTokenizer:
    """The byte-level tokenizer (ids 0..255 = bytes, 256 = eos, 257..259 reserved)."""
    vocab = {char: b for b, char in enumerate(_byte_chars())}
    tokenizer = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    reserved = [f"<reserved_{i}>" for i in range(ByteTokenizer.vocab_size - ByteTokenizer.eos_id
                                                 - 1)]
    tokenizer.add_special_tokens([BYTE_EOS, *reserved])
    assert tokenizer.token_to_id(BYTE_EOS) == ByteTokenizer.eos_id
    return tokenizer


def write_hf_tokenizer(spec: str, out: Path, max_len: int) -> int:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for memtron tokenizer ``spec``
    (``"byte"`` or a ``tokenizer.json`` path) into ``out``; returns the eos id. No BOS is added:
    memtron marks document starts with eos, which callers put in the text."""
    memtron_tokenizer = load_tokenizer(spec)
    if spec == "byte":
        tokenizer = byte_tokenizer()
        tokenizer.save(str(out / "tokenizer.json"))
    else:
        source = Path(spec)
        source = source / "tokenizer.json" if source.is_dir() else source
        shutil.copyfile(source, out / "tokenizer.json")
        tokenizer = RustTokenizer.from_file(str(source))
    eos = tokenizer.id_to_token(memtron_tokenizer.eos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
              "bos_token": None, "unk_token": None, "add_bos_token": False,
              "add_eos_token": False, "model_max_length": max_len,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return memtron_tokenizer.eos_id
