"""`memtron eval`: Wilson intervals, checkpoints of any layout, the CLI."""

from __future__ import annotations

import json

import pytest

from memtron.cli import main
from memtron.config import load_config
from memtron.eval.facts import eval_facts
from memtron.eval.lm import eval_lm
from memtron.train.facts import wilson_interval
from memtron.train.trainer import train
from tests.conftest import tiny_overrides
from tests.multiproc import run_ranks


def test_wilson_interval_matches_known_values():
    # 8 of 10: the textbook Wilson 95 % interval (Newcombe 1998, method 3).
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


def _overrides(corpus, run_dir, **extra):
    values = {"model.n_heads": 4, "model.n_kv_heads": 2, "train.steps": 4,
              "optim.warmup_steps": 1, "data.micro_batch_size": 4, **extra}
    return tiny_overrides(corpus, run_dir, **values)


def _train_rank(rank: int, overrides: list[str]):
    result = train(load_config(None, [*overrides, "checkpoint.resume=none"]))
    return result.checkpoint if rank == 0 else None


def test_eval_of_a_sharded_checkpoint_equals_one_process(tiny_corpus, tmp_path):
    """Trained at tp=2 x ep=2 (dense and table shards) and in one process: the same model,
    so the same fact answers and held-out loss."""
    single = _train_rank(0, _overrides(tiny_corpus, tmp_path / "single"))
    (sharded, _) = run_ranks(2, _train_rank, _overrides(
        tiny_corpus, tmp_path / "tp2", **{"parallel.tp": 2, "parallel.ep": 2}))
    ref, got = eval_facts(single), eval_facts(sharded, batch_size=7)
    assert got["buckets"] == ref["buckets"]
    assert got["valid"]["loss"] == pytest.approx(ref["valid"]["loss"], rel=1e-5)
    assert got["valid"]["tokens"] == ref["valid"]["tokens"] > 0
    assert got["params"] == ref["params"] and got["table_params"] > 0
    assert got["train_tokens"] == ref["train_tokens"] == 4 * 4 * 32
    lm = eval_lm(sharded, tiny_corpus / "valid", batch_size=4)  # the config's batches
    assert lm["loss"] == pytest.approx(ref["valid"]["loss"], rel=1e-5)


def test_cli_synth_and_eval(tiny_corpus, tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--entities", "40",
                 "--questions-per-bucket", "7", "--train-docs", "300", "--valid-docs", "9",
                 "--zipf", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params"]["questions_per_bucket"] == 7
    assert summary["params"]["zipf"] == 0.5
    assert (summary["counts"]["train_docs"], summary["counts"]["valid_docs"]) == (300, 9)
    assert summary["buckets"]["tail"]["n_questions"] == 7

    ckpt = _train_rank(0, _overrides(tiny_corpus, tmp_path / "run"))
    assert main(["eval", "facts", "--ckpt", str(tmp_path / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == str(ckpt)
    for bucket in report["buckets"].values():
        assert bucket["low"] <= bucket["accuracy"] <= bucket["high"]
    assert main(["eval", "facts", "--ckpt", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "95% CI" in text and "valid loss" in text
    assert main(["eval", "lm", "--ckpt", str(ckpt), "--data", str(tiny_corpus / "valid")]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", "lm", "--ckpt", str(ckpt), "--data", str(tmp_path)]) == 2
    assert "no prepared shards" in capsys.readouterr().err
