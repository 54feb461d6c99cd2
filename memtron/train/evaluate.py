"""Fact accuracy: multiple-choice scoring of memorised facts, reported per frequency bucket.

Each choice is scored by the summed log-probability of its tokens after the prompt, as in
lm-eval-harness's loglikelihood tasks; a question is right when its answer scores highest
(ties go to the earlier choice). The prompt is preceded by ``eos_id``, the document boundary
the model saw before every training document.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memtron.data.tokenizer import Tokenizer


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


def fact_accuracy(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Tokenizer,
    questions: list[dict],
    batch_size: int = 64,
    max_len: int | None = None,
) -> dict[str, float]:
    """Accuracy per bucket, over ``"all"``, and the ``"chance"`` level (mean 1/len(choices)).

    ``logits_fn(tokens[B, T]) -> logits[B, T, V]`` is a causal LM, called under no_grad with
    CPU tokens (it moves them where it needs). ``max_len`` caps T by cutting prompts from the
    left. Questions need prompt, answer, choices; bucket is optional.
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
    result: dict[str, float] = {}
    for bucket in dict.fromkeys(q["bucket"] for q in questions if "bucket" in q):
        hits = [c for q, c in zip(questions, correct) if q.get("bucket") == bucket]
        result[bucket] = sum(hits) / len(hits)
    result["all"] = sum(correct) / len(correct)
    result["chance"] = sum(1 / len(q["choices"]) for q in questions) / len(questions)
    return result
