"""Held-out loss and perplexity of a checkpoint on prepared token shards.

The loss is the token-weighted mean next-token cross-entropy over the shards' unshuffled pass
(whole batches only, as in training evaluation), so two checkpoints evaluated on the same
shards see exactly the same tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from memtron.data.loader import DataError, eval_batches
from memtron.data.prepare import INDEX_NAME
from memtron.data.tokenizer import load_tokenizer
from memtron.infer.model import LoadedModel, load_model
from memtron.model.forward import ForwardContext
from memtron.model.transformer import Transformer


def shard_seq_len(shards: str | Path, loaded: LoadedModel) -> int:
    """The shards' sample length, checked against the model's context and tokenizer."""
    index_path = Path(shards) / INDEX_NAME
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{index_path}: no prepared shards (run `memtron data prepare`)") from None
    cfg = loaded.config
    spec = load_tokenizer(cfg.data.tokenizer).spec
    if index.get("tokenizer") != spec:
        raise DataError(f"{index_path}: tokenized with {index.get('tokenizer')!r}, the "
                        f"checkpoint's model uses {spec!r}")
    seq_len = int(index["seq_len"])
    if seq_len > cfg.model.max_seq_len:
        raise DataError(f"{index_path}: seq_len {seq_len} exceeds the model's "
                        f"max_seq_len {cfg.model.max_seq_len}")
    return seq_len


@torch.no_grad()
def lm_loss(model: Transformer, shards: str | Path, seq_len: int, batch_size: int = 16,
            max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean loss, its perplexity and the number of tokens scored."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in eval_batches(shards, batch_size, seq_len, max_batches or 2**62):
        tokens = batch.tokens.to(device)
        path = batch.fields.get("bank_path")  # a bank model: each sample with its tree path
        logits = model(tokens[:, :-1], ForwardContext(bank_path=path)).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                       reduction="sum"))
        count += tokens[:, 1:].numel()
    if count == 0:
        raise DataError(f"{shards}: no whole batch of {batch_size} samples to evaluate")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def eval_lm(ckpt: str | Path, shards: str | Path, batch_size: int = 16,
            max_batches: int | None = None, device: str = "cpu") -> dict:
    """``memtron eval lm``: loss and perplexity of a checkpoint (any layout) on ``shards``."""
    loaded = load_model(ckpt, device=device)
    seq_len = shard_seq_len(shards, loaded)
    result = lm_loss(loaded.model, shards, seq_len, batch_size, max_batches)
    return {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "data": str(shards),
            **result}
