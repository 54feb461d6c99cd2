"""``memtron eval facts``: fact accuracy of a saved checkpoint, per frequency bucket with Wilson
intervals, its size and training tokens. The scoring itself (:mod:`memtron.train.facts`) is the
one the trainer runs every ``train.eval_every`` steps.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from memtron.config import ConfigError
from memtron.data.clustering import TreeError
from memtron.data.loader import DataError
from memtron.data.synthetic import load_questions
from memtron.data.tokenizer import load_tokenizer
from memtron.eval.lm import lm_loss, shard_seq_len
from memtron.infer.model import LoadedModel, load_model
from memtron.model.forward import ForwardContext
from memtron.storage.manifest import read_manifest
from memtron.train.facts import (
    LogitsFn,
    bucket_scores,
    chance_level,
    choice_logprobs,
    picked_answer,
    question_paths,
)
from memtron.train.metrics import flops_per_token


def model_logits(model: torch.nn.Module, device: str | torch.device) -> LogitsFn:
    """A ``logits_fn`` for :func:`choice_logprobs` over a loaded model, optional bank paths."""
    def logits_fn(tokens: torch.Tensor, bank_path: torch.Tensor | None = None) -> torch.Tensor:
        return model(tokens.to(device), ForwardContext(bank_path=bank_path)).float()

    return logits_fn


def model_size(loaded: LoadedModel) -> dict[str, float]:
    """Parameter counts and training FLOPs per token (value tables are gathers, not FLOPs)."""
    model = loaded.model
    table_ids = {id(p) for p in model.value_tables.parameters()}
    params = list(model.parameters())
    dense = sum(p.numel() for p in params if id(p) not in table_ids)
    cfg = loaded.config
    return {"params": sum(p.numel() for p in params), "dense_params": dense,
            "table_params": sum(p.numel() for p in params if id(p) in table_ids),
            "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len, dense)}


def train_tokens(loaded: LoadedModel) -> int:
    """Tokens the checkpoint was trained on: steps x the global batch of its saved layout."""
    cfg = loaded.config
    dp = read_manifest(loaded.checkpoint)["layout"]["dp"]
    return loaded.step * cfg.train.grad_accum * cfg.data.micro_batch_size * cfg.data.seq_len * dp


def load_eval_model(ckpt: str | Path, device: str | torch.device = "cpu",
                    tree: str | Path | None = None) -> LoadedModel:
    """:func:`load_model` for evaluation: a bank model's questions need its cluster tree
    (``tree``, else the copy ``prepare --clusters`` kept with the training data), and without
    it the eval would silently score the generic block alone, so a missing tree is an error."""
    try:
        return load_model(ckpt, device=device, tree=tree)
    except TreeError as e:
        raise DataError(f"{ckpt}: the model has a hierarchical bank and its questions are "
                        f"routed through the cluster tree, which cannot be loaded ({e}); pass "
                        "--tree TREE_DIR (the tree the training data was prepared with)") from e


def eval_facts(ckpt: str | Path, questions: str | Path | None = None, batch_size: int = 64,
               valid_batches: int | None = None, device: str = "cpu",
               tree: str | Path | None = None) -> dict[str, Any]:
    """``memtron eval facts``: per-bucket fact accuracy with Wilson intervals, plus loss on the
    config's valid shards, for a checkpoint of any layout loaded into this process. A bank
    model scores each question with its prompt's tree path (``tree``: see
    :func:`load_eval_model`). ``choice_logp`` holds each question's per-choice scores."""
    loaded = load_eval_model(ckpt, device, tree)
    cfg = loaded.config
    path = questions or cfg.data.questions
    if not path:
        raise ConfigError("data.questions: the checkpoint's config names no questions file; "
                          "pass --questions")
    try:
        rows = load_questions(path)
    except ValueError as e:
        raise DataError(str(e)) from e
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    paths = question_paths(loaded.tree, rows)
    scores = choice_logprobs(model_logits(loaded.model, device), tokenizer, rows, batch_size,
                             cfg.model.max_seq_len, paths)
    correct = picked_answer(rows, scores)
    result: dict[str, Any] = {
        "checkpoint": str(loaded.checkpoint), "step": loaded.step, "questions": str(path),
        "routed": paths is not None,
        "buckets": {k: asdict(v) for k, v in bucket_scores(rows, correct).items()},
        "chance": chance_level(rows), **model_size(loaded),
        "train_tokens": train_tokens(loaded), "choice_logp": [s.tolist() for s in scores]}
    if cfg.data.valid:
        seq_len = shard_seq_len(cfg.data.valid, loaded)
        result["valid"] = lm_loss(loaded.model, cfg.data.valid, seq_len,
                                  cfg.data.micro_batch_size, valid_batches)
    return result
