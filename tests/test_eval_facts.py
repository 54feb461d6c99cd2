"""fact_accuracy: multiple-choice scoring of facts with a causal LM's logits."""

from __future__ import annotations

import math

import pytest
import torch

from memtron.data.tokenizer import ByteTokenizer
from memtron.train.facts import fact_accuracy

TOK = ByteTokenizer()
V = TOK.vocab_size

# Uniform logits score a choice -len(bytes) * log V, so the shortest choice wins (first on
# ties): right for q0 and q2, wrong for q1 and q3.
QUESTIONS = [
    {"prompt": "Aldo Vemir was born in", "answer": " Oslo",
     "choices": [" Lisbon", " Oslo", " Paris"], "bucket": "head"},
    {"prompt": "Aldo Vemir plays the", "answer": " violin",
     "choices": [" harp", " violin", " cello"], "bucket": "head"},
    {"prompt": "Bea Tork has a pet", "answer": " cat",
     "choices": [" cat", " dog", " parrot", " cow"], "bucket": "tail"},
    {"prompt": "Bea Tork works as a", "answer": " nurse",
     "choices": [" pilot", " nurse"], "bucket": "tail"},
]


def _oracle_logits(questions):
    """Causal 'model' that knows every answer: after a prompt it puts all mass on the next
    answer token; the row's prompt is recognised from its prefix."""
    contexts = [[TOK.eos_id, *TOK.encode(q["prompt"])] for q in questions]
    answers = [TOK.encode(q["answer"]) for q in questions]

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        logits = torch.zeros(*tokens.shape, V)
        for row, seq in enumerate(tokens.tolist()):
            q = next(i for i, c in enumerate(contexts) if seq[: len(c)] == c)
            start = len(contexts[q]) - 1  # the position that predicts the answer's first token
            for offset, token in enumerate(answers[q]):
                if start + offset < tokens.shape[1]:
                    logits[row, start + offset, token] = 50.0
        return logits

    return logits_fn


def test_oracle_gets_everything_right():
    result = fact_accuracy(_oracle_logits(QUESTIONS), TOK, QUESTIONS, batch_size=3)
    assert result == {"head": 1.0, "tail": 1.0, "all": 1.0, "chance": pytest.approx(
        (1 / 3 + 1 / 3 + 1 / 4 + 1 / 2) / 4)}


def test_uniform_logits_pick_the_shortest_first_choice():
    seen_lengths = []

    def uniform(tokens: torch.Tensor) -> torch.Tensor:
        seen_lengths.append(tokens.shape[1])
        return torch.zeros(*tokens.shape, V)

    result = fact_accuracy(uniform, TOK, QUESTIONS)
    assert result["head"] == 0.5 and result["tail"] == 0.5 and result["all"] == 0.5
    # left truncation keeps the scores (they only depend on the choice) and caps T
    assert max(seen_lengths) > 8
    seen_lengths.clear()
    truncated = fact_accuracy(uniform, TOK, QUESTIONS[:2] * 2, batch_size=2, max_len=8)
    assert truncated["all"] == 0.5 and max(seen_lengths) == 8


def _bigram_logits(seed: int):
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed))

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        return table[tokens]

    return table, logits_fn


def test_scores_match_unbatched_reference():
    """A random bigram model: accuracy equals a per-choice reference computed without
    batching or padding, whatever the batch size (so padding is never scored)."""
    table, logits_fn = _bigram_logits(0)
    logp = table.log_softmax(-1)
    expected_right = []
    for q in QUESTIONS:
        context = [TOK.eos_id, *TOK.encode(q["prompt"])]
        scores = []
        for choice in q["choices"]:
            seq = context + TOK.encode(choice)
            scores.append(sum(logp[seq[p - 1], seq[p]].item()
                              for p in range(len(context), len(seq))))
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        expected_right.append(q["choices"][best] == q["answer"])
    for batch_size in (1, 5, 64):
        result = fact_accuracy(logits_fn, TOK, QUESTIONS, batch_size=batch_size)
        assert math.isclose(result["all"], sum(expected_right) / len(QUESTIONS))
        assert math.isclose(result["head"], sum(expected_right[:2]) / 2)


def test_bad_questions_are_rejected():
    with pytest.raises(ValueError, match="no questions"):
        fact_accuracy(lambda t: torch.zeros(*t.shape, V), TOK, [])
    bad = [{"prompt": "x", "answer": " y", "choices": [" z"]}]
    with pytest.raises(ValueError, match="question 0"):
        fact_accuracy(lambda t: torch.zeros(*t.shape, V), TOK, bad)
