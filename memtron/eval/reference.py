"""Committed reference numbers: a compact summary of a ``memtron compare`` run, printed beside a
fresh ``memtron eval facts`` report so that a user sees where their model stands against the
dense baseline (and the other arms) measured on the same corpus and questions.

The reference is data, not code: ``compare`` writes ``reference.json`` next to ``compare.json``,
and a chosen one is committed (``docs/quality-reference.json``); nothing here hard-codes numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memtron.storage.manifest import sha256_file

REFERENCE_VERSION = 1
# Per-arm keys a reference keeps from a compare summary row (the per-run details are dropped).
_ARM_KEYS = ("arm", "seeds", "params", "table_params", "flops_per_token", "train_tokens",
             "train_flops", "valid_loss", "chance")


def reference_from_summary(summary: list[dict], config: str | None, overrides: list[str],
                           questions: str | Path | None) -> dict[str, Any]:
    """The compact reference of a compare run: per arm its size, compute, valid loss and bucket
    accuracies (pooled over seeds, with the per-seed values); plus the questions' sha256 so a
    reader can tell whether its own numbers were measured on the same questions."""
    arms = []
    for row in summary:
        arm = {k: row[k] for k in _ARM_KEYS}
        arm["buckets"] = {name: {k: b[k] for k in ("accuracy", "low", "high", "n", "per_seed")}
                          for name, b in row["buckets"].items()}
        arms.append(arm)
    return {"version": REFERENCE_VERSION, "config": config, "overrides": overrides,
            "questions": str(questions) if questions else None,
            "questions_sha256": (sha256_file(Path(questions))
                                 if questions and Path(questions).is_file() else None),
            "arms": arms}


def load_reference(path: str | Path) -> dict[str, Any]:
    """Read a reference file, failing with its path when it is missing or not one."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{file}: reference file does not exist")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not JSON: {e}") from e
    if not isinstance(data, dict) or data.get("version") != REFERENCE_VERSION or not data.get(
            "arms"):
        raise ValueError(f"{file}: not a memtron compare reference (version "
                         f"{REFERENCE_VERSION} with arms)")
    return data


def format_beside(report: dict[str, Any], reference: dict[str, Any],
                  label: str = "this run") -> str:
    """Bucket accuracies of ``report`` (an ``eval facts`` report) in one column, each reference
    arm's in the next, then the gain over the reference's ``dense`` arm; a note when the
    questions differ from those the reference was measured on."""
    arms = reference["arms"]
    buckets = [b for b in report["buckets"] if all(b in a["buckets"] for a in arms)]
    columns = [label, *[f"{a['arm']} (ref)" for a in arms]]
    width = max(16, *(len(c) for c in columns)) + 1
    dense = next((a for a in arms if a["arm"] == "dense"), None)
    lines = [f"{'bucket':<7}" + "".join(f"{c:>{width}}" for c in columns)
             + (f"{'vs dense':>10}" if dense else "")]

    def cell(b: dict) -> str:
        return f"{b['accuracy']:.1%} ±{(b['high'] - b['low']) / 2:.1%}"

    for name in buckets:
        row = f"{name:<7}" + f"{cell(report['buckets'][name]):>{width}}"
        row += "".join(f"{cell(a['buckets'][name]):>{width}}" for a in arms)
        if dense:
            gain = report["buckets"][name]["accuracy"] - dense["buckets"][name]["accuracy"]
            row += f"{gain * 100:>+9.1f}p"
        lines.append(row)
    if "valid" in report:
        row = f"{'loss':<7}" + f"{report['valid']['loss']:>{width}.4f}"
        row += "".join(f"{a['valid_loss']:>{width}.4f}" if a["valid_loss"] is not None
                       else f"{'-':>{width}}" for a in arms)
        lines.append(row)
    row = f"{'params':<7}" + f"{report['params']:>{width},}"
    lines.append(row + "".join(f"{a['params']:>{width},}" for a in arms))
    seeds = ",".join(str(s) for s in arms[0]["seeds"])
    lines.append(f"(ref): `memtron compare` of {reference['config']}, seeds {seeds}, "
                 f"{arms[0]['train_tokens']:,} training tokens per run; ± = half the Wilson 95 % "
                 f"interval")
    expected = reference.get("questions_sha256")
    mine = report.get("questions")
    if expected and mine and Path(mine).is_file() and sha256_file(Path(mine)) != expected:
        lines.append(f"note: {mine} differs from the questions the reference was measured on "
                     f"({reference['questions']}): the columns are not comparable")
    return "\n".join(lines)
