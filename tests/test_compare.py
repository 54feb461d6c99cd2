"""`memtron compare`: arms x seeds at equal tokens, a table and a plot."""

from __future__ import annotations

import json
import signal

import pytest

from memtron.cli import main
from tests.conftest import tiny_overrides

pytest.importorskip("matplotlib")


def test_compare_two_arms_one_seed(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--arms", "dense,memory", "--seeds", "3", "--steps", "3",
                 "--out", str(out), *tiny_overrides(tiny_corpus, tmp_path / "unused")]) == 0
    assert "| dense |" in capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    dense, memory = report["summary"]
    assert (dense["arm"], memory["arm"]) == ("dense", "memory")
    assert dense["table_params"] == 0 < memory["table_params"]
    assert dense["train_tokens"] == memory["train_tokens"] == 3 * 4 * 32
    # Memory+ replaces the FFN: no more active compute than the dense baseline.
    assert memory["flops_per_token"] <= dense["flops_per_token"]
    for row in report["summary"]:
        assert set(row["buckets"]) == {"head", "torso", "tail", "all"}
        assert row["buckets"]["all"]["n"] == 15
    assert report["runs"]["memory"][0]["seed"] == 3
    assert (out / "compare.png").stat().st_size > 0
    assert "95 %" in (out / "compare.md").read_text()
    assert main(["compare", "--arms", "dense,nope", "--out", str(out),
                 *tiny_overrides(tiny_corpus, tmp_path / "unused")]) == 2
    assert "unknown arm 'nope'" in capsys.readouterr().err


def test_a_stopped_run_is_not_recorded(tiny_corpus, tmp_path, capsys, monkeypatch):
    """A run a signal stopped (SIGTERM: a checkpoint at the step it reached) is not an arm at
    equal steps: compare exits 128 + the signal and records nothing, so the next call retrains
    it instead of reusing a half-trained model."""
    from memtron.train import trainer

    real_train = trainer.train

    def stopped_train(cfg):  # the trainer as a SIGTERM at step 2 of 3 leaves it
        cfg.train.steps = 2
        result = real_train(cfg)
        result.stopped_by = signal.SIGTERM
        return result

    out = tmp_path / "cmp"
    args = ["compare", "--arms", "dense", "--seeds", "0", "--steps", "3", "--out", str(out),
            *tiny_overrides(tiny_corpus, tmp_path / "unused")]
    monkeypatch.setattr(trainer, "train", stopped_train)
    assert main(args) == 128 + signal.SIGTERM
    assert "dense seed 0 stopped at step 2 of 3" in capsys.readouterr().err
    assert not list(out.rglob("compare-run.json")) and not (out / "compare.json").exists()
    monkeypatch.setattr(trainer, "train", real_train)
    assert main(args) == 0  # retrained, not reused
    assert "compare: training dense seed 0" in capsys.readouterr().err
    assert json.loads((out / "compare.json").read_text())["summary"][0]["train_tokens"] == \
        3 * 4 * 32


def test_reference_is_printed_beside_a_run(tiny_corpus, tmp_path, capsys):
    """compare writes reference.json; `eval facts --reference` prints a run's buckets beside
    each reference arm's, with the gain over the dense arm computed from the two reports."""
    out = tmp_path / "cmp"
    assert main(["compare", "--arms", "dense,memory", "--seeds", "0", "--steps", "2",
                 "--out", str(out), *tiny_overrides(tiny_corpus, tmp_path / "unused")]) == 0
    capsys.readouterr()
    first = json.loads((out / "compare.json").read_text())["summary"]
    # Same config and questions: the finished runs are gathered, not retrained.
    assert main(["compare", "--arms", "dense,memory", "--seeds", "0", "--steps", "2",
                 "--out", str(out), *tiny_overrides(tiny_corpus, tmp_path / "unused")]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing") == 2 and "training" not in err
    assert json.loads((out / "compare.json").read_text())["summary"] == first
    reference = json.loads((out / "reference.json").read_text())
    assert [a["arm"] for a in reference["arms"]] == ["dense", "memory"]
    assert reference["questions_sha256"] and "runs" not in reference
    run = out / "runs" / "memory-seed0"
    assert main(["eval", "facts", "--ckpt", str(run), "--json"]) == 0
    mine = json.loads(capsys.readouterr().out)["buckets"]
    assert main(["eval", "facts", "--ckpt", str(run), "--reference",
                 str(out / "reference.json")]) == 0
    text = capsys.readouterr().out
    assert "dense (ref)" in text and "memory (ref)" in text and "not comparable" not in text
    dense = reference["arms"][0]["buckets"]
    for bucket in ("head", "torso", "tail", "all"):
        row = next(line for line in text.splitlines()[::-1] if line.startswith(bucket))
        gain = (mine[bucket]["accuracy"] - dense[bucket]["accuracy"]) * 100
        assert row.endswith(f"{gain:+.1f}p"), row
    # Another question set: the columns are flagged as not comparable.
    other = tmp_path / "q.jsonl"
    other.write_text((tiny_corpus / "questions.jsonl").read_text().splitlines()[0] + "\n")
    assert main(["eval", "facts", "--ckpt", str(run), "--questions", str(other),
                 "--reference", str(out / "reference.json")]) == 0
    assert "not comparable" in capsys.readouterr().out
    assert main(["eval", "facts", "--ckpt", str(run), "--reference",
                 str(tmp_path / "missing.json")]) == 2
    assert "reference file does not exist" in capsys.readouterr().err
    # Another step count is another config: retrained, not reused.
    assert main(["compare", "--arms", "dense", "--seeds", "0", "--steps", "3",
                 "--out", str(out), *tiny_overrides(tiny_corpus, tmp_path / "unused")]) == 0
    err = capsys.readouterr().err
    assert "reusing" not in err and "training dense seed 0" in err
