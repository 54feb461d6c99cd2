"""`memtron compare`: arms x seeds at equal tokens, a table and a plot."""

from __future__ import annotations

import json

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
