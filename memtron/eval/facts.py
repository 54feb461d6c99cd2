"""Fact accuracy: multiple-choice scoring of memorised facts, reported per frequency bucket.

Each choice is scored by the summed log-probability of its tokens after the prompt, as in
lm-eval-harness's loglikelihood tasks; a question is right when its answer scores highest
(ties go to the earlier choice). The prompt is preceded by ``eos_id``, the document boundary
the model saw before every training document.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from memtron.config import ConfigError
from memtron.data.loader import DataError
from memtron.data.synthetic import load_questions
from memtron.data.tokenizer import Tokenizer, load_tokenizer
from memtron.eval.lm import lm_loss, shard_seq_len
from memtron.infer.model import LoadedModel, load_model
from memtron.train.checkpoint import read_manifest
from memtron.train.metrics import flops_per_token

WILSON_Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def _score_sequences(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    sequences: list[tuple[list[int], int]],
    pad_id: int,
    batch_size: int,
) -> torch.Tensor:
    """Sum of log p(last n tokens | earlier tokens) for each (tokens, n), right-padded batches."""
    scores = torch.zeros(len(sequences), dtype=torch.float64)
    # Longest first, so each batch is padded to similar lengths.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(sequences[chunk[0]][0]) - 1
        inputs = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        rows, cols, targets, owners = [], [], [], []
        for row, i in enumerate(chunk):
            tokens, n_scored = sequences[i]
            inputs[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
            # logits at position p predict tokens[p + 1]; only the choice's tokens count
            for p in range(len(tokens) - 1 - n_scored, len(tokens) - 1):
                rows.append(row)
                cols.append(p)
                targets.append(tokens[p + 1])
                owners.append(i)
        logits = logits_fn(inputs)
        picked = logits[torch.tensor(rows), torch.tensor(cols)].float().log_softmax(-1)
        token_logp = picked.gather(-1, torch.tensor(targets, device=picked.device)[:, None])
        scores.index_add_(0, torch.tensor(owners), token_logp[:, 0].double().cpu())
    return scores


def score_questions(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Tokenizer,
    questions: list[dict],
    batch_size: int = 64,
    max_len: int | None = None,
) -> list[bool]:
    """Whether each question's answer scores highest among its choices.

    ``logits_fn(tokens[B, T]) -> logits[B, T, V]`` is a causal LM, called under no_grad with
    CPU tokens (it moves them where it needs). ``max_len`` caps T by cutting prompts from the
    left. Questions need prompt, answer, choices.
    """
    if not questions:
        raise ValueError("fact_accuracy: no questions given")
    if max_len is not None and max_len < 1:
        raise ValueError(f"fact_accuracy: max_len must be >= 1, got {max_len}")
    sequences: list[tuple[list[int], int]] = []
    answers: list[int] = []
    for q_index, question in enumerate(questions):
        choices = question["choices"]
        if question["answer"] not in choices:
            raise ValueError(f"question {q_index}: answer {question['answer']!r} not in choices")
        answers.append(choices.index(question["answer"]))
        context = [tokenizer.eos_id, *tokenizer.encode(question["prompt"])]
        for choice in choices:
            continuation = tokenizer.encode(choice)
            if not continuation or (max_len is not None and len(continuation) > max_len):
                raise ValueError(f"question {q_index}: choice {choice!r} has "
                                 f"{len(continuation)} tokens, needs 1..max_len={max_len}")
            tokens = context + continuation
            if max_len is not None:
                tokens = tokens[-(max_len + 1) :]  # the model reads all but the last token
            sequences.append((tokens, len(continuation)))

    with torch.no_grad():
        scores = _score_sequences(logits_fn, sequences, tokenizer.eos_id, batch_size)

    correct: list[bool] = []
    first = 0
    for question, answer in zip(questions, answers):
        n_choices = len(question["choices"])
        correct.append(int(torch.argmax(scores[first : first + n_choices])) == answer)
        first += n_choices
    return correct


def wilson_interval(successes: int, n: int, z: float = WILSON_Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: unlike the normal approximation it
    stays inside [0, 1] and is honest near 0 and 1, where small buckets of facts often sit."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n >= 1, got "
                         f"{successes}/{n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class BucketScore:
    """Fact accuracy of one bucket with its 95 % Wilson interval."""

    correct: int
    n: int
    accuracy: float
    low: float
    high: float


def bucket_scores(questions: list[dict], correct: list[bool]) -> dict[str, BucketScore]:
    """Per bucket (in first-seen order), then ``"all"``."""
    groups: dict[str, list[bool]] = {}
    for question, hit in zip(questions, correct):
        if "bucket" in question:
            groups.setdefault(question["bucket"], []).append(hit)
    groups["all"] = correct
    return {name: BucketScore(sum(hits), len(hits), sum(hits) / len(hits),
                              *wilson_interval(sum(hits), len(hits)))
            for name, hits in groups.items()}


def chance_level(questions: list[dict]) -> float:
    """Mean 1 / len(choices): the accuracy of guessing."""
    return sum(1 / len(q["choices"]) for q in questions) / len(questions)


def fact_accuracy(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Tokenizer,
    questions: list[dict],
    batch_size: int = 64,
    max_len: int | None = None,
) -> dict[str, float]:
    """Accuracy per bucket, over ``"all"``, and the ``"chance"`` level (see
    :func:`score_questions` for the arguments)."""
    correct = score_questions(logits_fn, tokenizer, questions, batch_size, max_len)
    result = {name: s.accuracy for name, s in bucket_scores(questions, correct).items()}
    result["chance"] = chance_level(questions)
    return result


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


def eval_facts(ckpt: str | Path, questions: str | Path | None = None, batch_size: int = 64,
               valid_batches: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """``memtron eval facts``: per-bucket fact accuracy with Wilson intervals, plus loss on the
    config's valid shards, for a checkpoint of any layout loaded into this process."""
    loaded = load_model(ckpt, device=device)
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

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        return loaded.model(tokens.to(device)).float()

    correct = score_questions(logits_fn, tokenizer, rows, batch_size, cfg.model.max_seq_len)
    result: dict[str, Any] = {
        "checkpoint": str(loaded.checkpoint), "step": loaded.step, "questions": str(path),
        "buckets": {k: asdict(v) for k, v in bucket_scores(rows, correct).items()},
        "chance": chance_level(rows), **model_size(loaded),
        "train_tokens": train_tokens(loaded)}
    if cfg.data.valid:
        seq_len = shard_seq_len(cfg.data.valid, loaded)
        result["valid"] = lm_loss(loaded.model, cfg.data.valid, seq_len,
                                  cfg.data.micro_batch_size, valid_batches)
    return result
