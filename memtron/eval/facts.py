"""Fact accuracy: multiple-choice scoring of memorised facts, reported per frequency bucket.

Each choice is scored by the summed log-probability of its tokens after the prompt, as in
lm-eval-harness's loglikelihood tasks; a question is right when its answer scores highest
(ties go to the earlier choice). The prompt is preceded by ``eos_id``, the document boundary
the model saw before every training document. A model with a hierarchical bank scores each
question with the blocks of its prompt's path down the cluster tree (``bank_paths``), as
generation routes a prompt (DESIGN §5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from memtron.config import ConfigError
from memtron.data.clustering import TreeError
from memtron.data.loader import DataError
from memtron.data.synthetic import load_questions
from memtron.data.tokenizer import Tokenizer, load_tokenizer
from memtron.eval.lm import lm_loss, shard_seq_len
from memtron.infer.model import LoadedModel, load_model, route_texts
from memtron.model.forward import ForwardContext
from memtron.storage.manifest import read_manifest
from memtron.train.metrics import flops_per_token

WILSON_Z95 = 1.959963984540054  # two-sided 95 % normal quantile


LogitsFn = Callable[..., torch.Tensor]
"""``logits_fn(tokens[B, T]) -> logits[B, T, V]``, or with bank paths
``logits_fn(tokens, bank_path[B, levels])``."""


def _score_sequences(
    logits_fn: LogitsFn,
    sequences: list[tuple[list[int], int]],
    pad_id: int,
    batch_size: int,
    paths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of log p(last n tokens | earlier tokens) for each (tokens, n), right-padded batches;
    with ``paths`` [len(sequences), levels], each batch's rows go to ``logits_fn`` too."""
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
        logits = logits_fn(inputs) if paths is None else logits_fn(inputs, paths[chunk])
        picked = logits[torch.tensor(rows), torch.tensor(cols)].float().log_softmax(-1)
        token_logp = picked.gather(-1, torch.tensor(targets, device=picked.device)[:, None])
        scores.index_add_(0, torch.tensor(owners), token_logp[:, 0].double().cpu())
    return scores


def choice_logprobs(
    logits_fn: LogitsFn,
    tokenizer: Tokenizer,
    questions: list[dict],
    batch_size: int = 64,
    max_len: int | None = None,
    bank_paths: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per question, the summed log-probability of each choice after its prompt (float64).

    ``logits_fn(tokens[B, T]) -> logits[B, T, V]`` is a causal LM, called under no_grad with
    CPU tokens (it moves them where it needs). ``max_len`` caps T by cutting prompts from the
    left. Questions need prompt, answer, choices. With ``bank_paths`` [len(questions), levels]
    (see :func:`question_paths`) every row of a question is scored with its question's path:
    ``logits_fn(tokens, bank_path[B, levels])``.
    """
    if not questions:
        raise ValueError("fact_accuracy: no questions given")
    if max_len is not None and max_len < 1:
        raise ValueError(f"fact_accuracy: max_len must be >= 1, got {max_len}")
    if bank_paths is not None and len(bank_paths) != len(questions):
        raise ValueError(f"fact_accuracy: {len(bank_paths)} bank paths for {len(questions)} "
                         "questions")
    sequences: list[tuple[list[int], int]] = []
    owners: list[int] = []  # the question of each sequence
    for q_index, question in enumerate(questions):
        choices = question["choices"]
        if question["answer"] not in choices:
            raise ValueError(f"question {q_index}: answer {question['answer']!r} not in choices")
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
            owners.append(q_index)

    paths = None if bank_paths is None else bank_paths[torch.tensor(owners)]
    with torch.no_grad():
        scores = _score_sequences(logits_fn, sequences, tokenizer.eos_id, batch_size, paths)
    return list(scores.split([len(q["choices"]) for q in questions]))


def picked_answer(questions: list[dict], scores: list[torch.Tensor]) -> list[bool]:
    """Whether each question's answer has the highest of its choice scores (first on ties)."""
    return [int(torch.argmax(s)) == q["choices"].index(q["answer"])
            for q, s in zip(questions, scores)]


def question_paths(tree: Any, questions: list[dict]) -> torch.Tensor | None:
    """[n, levels] bank path of each question, its prompt routed down the cluster ``tree`` like
    a generation prompt, so a bank model answers with the blocks the question's topic trained
    (None without a tree: no bank, or a generic-only one)."""
    return route_texts(tree, [q["prompt"] for q in questions])


def model_logits(model: torch.nn.Module, device: str | torch.device) -> LogitsFn:
    """A ``logits_fn`` for :func:`choice_logprobs` over a loaded model, optional bank paths."""
    def logits_fn(tokens: torch.Tensor, bank_path: torch.Tensor | None = None) -> torch.Tensor:
        return model(tokens.to(device), ForwardContext(bank_path=bank_path)).float()

    return logits_fn


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
    logits_fn: LogitsFn,
    tokenizer: Tokenizer,
    questions: list[dict],
    batch_size: int = 64,
    max_len: int | None = None,
    bank_paths: torch.Tensor | None = None,
) -> dict[str, float]:
    """Accuracy per bucket, over ``"all"``, and the ``"chance"`` level (see
    :func:`choice_logprobs` for the arguments)."""
    correct = picked_answer(questions, choice_logprobs(logits_fn, tokenizer, questions,
                                                       batch_size, max_len, bank_paths))
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
