"""Equal-compute quality comparison: train each arm for each seed at the same steps and tokens,
evaluate fact accuracy per bucket (Wilson 95 % intervals) and held-out loss, and write a table
(markdown + JSON) and a plot against training FLOPs and parameter count.

A run already trained and evaluated in the output directory with the same config and questions
is reused, not retrained, so seeds can be spread over parallel ``compare`` processes.

An arm is a set of config overrides applied on top of the base config and the user's overrides;
only the architecture differs between arms, never the data, batch or steps.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memtron.config import Config, ConfigError, load_config
from memtron.eval.facts import eval_facts
from memtron.eval.reference import reference_from_summary
from memtron.storage.manifest import sha256_file
from memtron.train.facts import wilson_interval


def _dense(cfg: Config) -> list[str]:
    return ["memory.layers=[]", "memory.shared_tables=[]"]


def _dense2x(cfg: Config) -> list[str]:
    return [*_dense(cfg), f"model.n_layers={2 * cfg.model.n_layers}"]


def _memory_layers(cfg: Config) -> list[int]:
    return cfg.memory.layers or [cfg.model.n_layers // 2]


def _memory(cfg: Config) -> list[str]:
    """Memory+ replacing the FFN of its layers: its query net, gate and output projection cost
    no more than the FFN they replace, so active FLOPs stay at or below the dense baseline."""
    return [f"memory.layers={_memory_layers(cfg)}", "memory.placement=replace"]


def _memory_beside(cfg: Config) -> list[str]:
    """Memory+ beside the FFN (the tiny-cpu default): a little more active compute than dense."""
    return [f"memory.layers={_memory_layers(cfg)}", "memory.placement=beside"]


ARMS: dict[str, Callable[[Config], list[str]]] = {
    "dense": _dense, "dense2x": _dense2x, "memory": _memory, "memory-beside": _memory_beside}


class CompareError(RuntimeError):
    """A run that cannot enter the comparison; ``exit_code`` is the CLI's (128 + the signal for
    a run a signal stopped, as ``memtron train`` exits)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


RUN_RECORD = "compare-run.json"  # per run dir: its config, questions hash and eval record


def _finished_run(run_dir: Path, cfg: Config, questions_sha: str | None) -> dict | None:
    """The record of a run already trained and evaluated in ``run_dir`` with exactly this config
    and question set, if its checkpoint is still there: so seeds (or arms) can be trained by
    parallel ``compare`` processes into one ``--out`` and a last one only gathers them."""
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    record = saved.get("record", {})
    if (saved.get("config") != cfg.to_dict() or saved.get("questions_sha256") != questions_sha
            or not Path(record.get("checkpoint", "")).is_dir()):
        return None
    return record


def parse_list(text: str, key: str, cast: Callable[[str], Any] = str) -> list:
    """A comma-separated command-line list, failing with the option's name."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{key}: empty list")
    try:
        return [cast(t) for t in items]
    except ValueError as e:
        raise ConfigError(f"{key}: {text!r}: {e}") from e


def _arm_overrides(config: str | None, overrides: list[str], arm: str) -> list[str]:
    if arm not in ARMS:
        raise ConfigError(f"--arms: unknown arm {arm!r}; known: {', '.join(ARMS)}")
    return [*overrides, *ARMS[arm](load_config(config, overrides))]


def _summarise(arm: str, runs: list[dict]) -> dict[str, Any]:
    """Mean over seeds; intervals pool the questions of all seeds (question-sampling noise),
    and the per-seed accuracies show the spread between seeds."""
    first = runs[0]
    buckets = {}
    for name in first["buckets"]:
        correct = sum(r["buckets"][name]["correct"] for r in runs)
        n = sum(r["buckets"][name]["n"] for r in runs)
        low, high = wilson_interval(correct, n)
        buckets[name] = {"accuracy": correct / n, "low": low, "high": high, "n": n,
                         "per_seed": [r["buckets"][name]["accuracy"] for r in runs]}
    valid = [r["valid"]["loss"] for r in runs if "valid" in r]
    return {"arm": arm, "seeds": [r["seed"] for r in runs], "params": first["params"],
            "table_params": first["table_params"], "flops_per_token": first["flops_per_token"],
            "train_tokens": first["train_tokens"],
            "train_flops": first["flops_per_token"] * first["train_tokens"],
            "valid_loss": statistics.fmean(valid) if valid else None,
            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
            "chance": first["chance"], "buckets": buckets}


def markdown_table(summary: list[dict]) -> str:
    """One row per arm: size, compute, held-out loss, accuracy per bucket with its interval."""
    buckets = list(summary[0]["buckets"])
    head = ["arm", "params", "table params", "train FLOPs", "valid loss",
            *[f"{b} acc [95% CI]" for b in buckets]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary:
        loss = f"{row['valid_loss']:.4f}" if row["valid_loss"] is not None else "-"
        cells = [row["arm"], f"{row['params']:,}", f"{row['table_params']:,}",
                 f"{row['train_flops']:.3g}", loss]
        cells += [f"{b['accuracy']:.1%} [{b['low']:.1%}, {b['high']:.1%}]"
                  for b in (row["buckets"][name] for name in buckets)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> None:
    """Accuracy per bucket (error bars = 95 % intervals) against training FLOPs and params."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    buckets = [b for b in summary[0]["buckets"] if b != "all"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers = "osD^vP*X"
    for ax, key, label in ((axes[0], "train_flops", "training FLOPs"),
                           (axes[1], "params", "parameters (incl. value tables)")):
        for b_index, bucket in enumerate(buckets):
            for a_index, row in enumerate(summary):
                b = row["buckets"][bucket]
                ax.errorbar(row[key], b["accuracy"],
                            yerr=[[b["accuracy"] - b["low"]], [b["high"] - b["accuracy"]]],
                            color=f"C{b_index}", marker=markers[a_index % len(markers)],
                            capsize=3, linestyle="none",
                            label=f"{row['arm']} / {bucket}")
        ax.axhline(summary[0]["chance"], color="grey", linestyle=":", label="chance")
        ax.set_xscale("log")
        ticks = sorted({row[key] for row in summary})  # label the arms, not the decades
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], rotation=30, fontsize=7)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fact accuracy")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(config: str | None, arms: list[str], seeds: list[int], out: str | Path,
            overrides: list[str] | None = None, steps: int | None = None,
            questions: str | None = None,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train and evaluate every arm x seed in this process; write ``compare.json``,
    ``compare.md``, ``compare.png`` and ``reference.json`` (the compact summary that ``memtron
    eval facts --reference`` prints beside a run) into ``out`` and return the per-arm summary."""
    from memtron.train.trainer import train

    out = Path(out)
    base = list(overrides or [])
    if steps is not None:
        base.append(f"train.steps={steps}")
    arm_overrides = {arm: _arm_overrides(config, base, arm) for arm in arms}
    questions_path = questions or load_config(config, base).data.questions
    questions_sha = (sha256_file(Path(questions_path))
                     if questions_path and Path(questions_path).is_file() else None)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            run_dir = out / "runs" / f"{arm}-seed{seed}"
            cfg = load_config(config, [*arm_overrides[arm], f"train.seed={seed}",
                                       f"train.run_dir={run_dir}", "checkpoint.resume=none",
                                       "train.eval_every=0", "logging.progress=false"])
            record = _finished_run(run_dir, cfg, questions_sha)
            if record is not None:
                log(f"compare: reusing {arm} seed {seed} from {run_dir / RUN_RECORD}")
                runs[arm].append(record)
                continue
            log(f"compare: training {arm} seed {seed} ({cfg.train.steps} steps) in {run_dir}")
            start, wanted = time.perf_counter(), cfg.train.steps
            result = train(cfg)
            seconds = time.perf_counter() - start
            if result.checkpoint is None or result.diverged:
                raise CompareError(f"compare: {arm} seed {seed} did not finish: "
                                   f"{result.diverged or 'no checkpoint'}")
            if result.stopped_by is not None or result.step < wanted:
                # A stopped run is not an arm at equal steps: recording it would put a
                # half-trained model in the table (compare restarts it on the next call).
                raise CompareError(
                    f"compare: {arm} seed {seed} stopped at step {result.step} of "
                    f"{wanted} (signal {result.stopped_by}); not recorded: run compare "
                    "again to train it", 128 + (result.stopped_by or 0))
            report = eval_facts(result.checkpoint, questions or None)
            record = {**report, "seed": seed, "arm": arm, "train_seconds": seconds,
                      "overrides": arm_overrides[arm], "loadavg": os.getloadavg()}
            (run_dir / RUN_RECORD).write_text(json.dumps(
                {"config": cfg.to_dict(), "questions_sha256": questions_sha, "record": record},
                indent=1) + "\n")
            runs[arm].append(record)
    summary = [_summarise(arm, runs[arm]) for arm in arms]
    if len({row["train_tokens"] for row in summary}) != 1:
        raise CompareError("compare: arms trained on different numbers of tokens")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(
        {"config": config, "overrides": base, "seeds": seeds, "summary": summary,
         "runs": runs}, indent=1) + "\n")
    title = (f"{config or 'defaults'}: {len(seeds)} seed(s), {summary[0]['train_tokens']:,} "
             f"training tokens per run")
    (out / "compare.md").write_text(f"# Equal-compute comparison\n\n{title}. Intervals: Wilson "
                                    "95 %, questions pooled over seeds.\n\n"
                                    + markdown_table(summary))
    plot(summary, out / "compare.png", title)
    (out / "reference.json").write_text(json.dumps(
        reference_from_summary(summary, config, base, questions_path), indent=1) + "\n")
    return summary
