"""`memtron bench report`: run the bench/ scripts, collect their JSON and write REPORT.md with
PNG plots.

One command turns the scattered benchmark printouts into one document a reader can check: every
figure names the machine, the CPU load measured while its benchmark ran, and the baseline that
benchmark measured in the same run, so that a number is never read without its context. A
benchmark that fails is reported with the tail of its output, and the report is still written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtron.bench.harness import LoadProbe, load_label, machine, machine_label

TAIL_CHARS = 3000


@dataclass(frozen=True)
class BenchSpec:
    """One bench/ script: its arguments in --quick and full mode, and whether it needs CUDA."""

    name: str
    quick: tuple[str, ...] = ("--quick",)
    full: tuple[str, ...] = ()
    cuda: bool = False


BENCHES: tuple[BenchSpec, ...] = (
    BenchSpec("pkm_layer"),
    BenchSpec("memory_parallel"),
    BenchSpec("context_parallel"),
    BenchSpec("parallel_overhead"),
    BenchSpec("memory_fetch"),
    BenchSpec("table_scale"),
    BenchSpec("checkpoint_save"),
    BenchSpec("generation", quick=("--quick", "--threads", "1"), full=("--threads", "1")),
    BenchSpec("gpu_kernels", cuda=True),
)
QUALITY = "quality"
# The quick comparison's budget: one thread (on a shared 2-core machine two threads stall on
# each other) and half the tiny-cpu micro-batch, the same for every arm.
QUICK_QUALITY_OVERRIDES = ("train.threads=1", "data.micro_batch_size=8",
                           "logging.tensorboard=false")
NAMES = (*(b.name for b in BENCHES), QUALITY)


@dataclass
class Outcome:
    """What one benchmark (or the quality comparison) left: its JSON document, or why not."""

    name: str
    status: str  # ok | failed | skipped
    wall_s: float = 0.0
    returncode: int | None = None
    data: dict[str, Any] | None = None
    tail: str = ""
    note: str = ""
    log: str | None = None


class ReportError(RuntimeError):
    """The report cannot be made at all (no bench/ directory, unknown names)."""


# --------------------------------------------------------------------------- running


def find_bench_dir(explicit: Path | None = None) -> Path:
    """The repository's bench/ directory: ``explicit``, else $MEMTRON_BENCH_DIR, else the one
    next to the memtron package (a source checkout or editable install), else ./bench."""
    import memtron

    if explicit is not None:
        candidates = [explicit]
    else:
        env = os.environ.get("MEMTRON_BENCH_DIR")
        candidates = [*([Path(env)] if env else []),
                      Path(memtron.__file__).resolve().parents[1] / "bench", Path.cwd() / "bench"]
    for path in candidates:
        if (path / "pkm_layer.py").is_file():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    raise ReportError(f"no bench/ directory with the benchmark scripts (tried {tried}); "
                      "the benchmarks ship with the source tree, not the installed package: "
                      "run from a checkout of memtron or pass --bench-dir")


def _tail(text: str) -> str:
    return text[-TAIL_CHARS:].strip()


def _child_env() -> dict[str, str]:
    """The children import the same memtron as this process (a checkout may differ from the
    installed one)."""
    import memtron

    env = dict(os.environ)
    root = str(Path(memtron.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_command(name: str, cmd: list[str], json_path: Path, log_path: Path, timeout: float,
                cwd: Path | None = None) -> Outcome:
    """Run one benchmark command, its output to ``log_path``; read the JSON it wrote."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                  env=_child_env(), timeout=timeout, check=False)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    wall = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    outcome = Outcome(name, "failed", wall, code, tail=_tail(text), log=str(log_path))
    if code is None:
        outcome.note = f"killed after the {timeout:.0f} s timeout"
    elif code != 0:
        outcome.note = f"exit code {code}"
    elif not json_path.is_file():
        outcome.note = "exited 0 but wrote no JSON result"
    else:
        outcome.status, outcome.data = "ok", json.loads(json_path.read_text())
    return outcome


def run_bench(spec: BenchSpec, bench_dir: Path, results: Path, quick: bool,
              timeout: float) -> Outcome:
    """One bench/ script in its own process, writing ``results/<name>.json``."""
    if spec.cuda:
        import torch

        if not torch.cuda.is_available():
            return Outcome(spec.name, "skipped", note="needs a CUDA GPU")
    json_path = results / f"{spec.name}.json"
    cmd = [sys.executable, str(bench_dir / f"{spec.name}.py"),
           *(spec.quick if quick else spec.full), "--out", str(json_path)]
    return run_command(spec.name, cmd, json_path, results / "logs" / f"{spec.name}.log",
                       timeout, cwd=bench_dir.parent)


def run_quality(repo: Path, results: Path, steps: int, seeds: str, arms: str,
                timeout: float) -> Outcome:
    """A small `memtron compare` (equal steps and tokens per arm, ``QUICK_QUALITY_OVERRIDES`` on
    the tiny-cpu config) on a freshly generated corpus, under a load probe. Corpus and
    checkpoints live in a temporary directory; compare.json/.md/.png are kept in
    ``results/quality``."""
    import tempfile

    from memtron.config import load_config
    from memtron.data.prepare import iter_documents, prepare
    from memtron.data.synthetic import generate_corpus
    from memtron.data.tokenizer import train_bpe

    keep = results / QUALITY
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    probe = LoadProbe().start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memtron-report-quality-") as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "compare"
        generate_corpus(data)
        # The demo's tokenizer, trained on this corpus as `make data` does, at its vocabulary.
        vocab = load_config(repo / "configs" / "tiny-cpu.yaml").model.vocab_size
        tokenizer = train_bpe(iter_documents(data / "raw" / "train.jsonl", "text"), vocab,
                              data / "bpe")
        for split in ("train", "valid"):
            prepare([data / "raw" / f"{split}.jsonl"], data / split, tokenizer=tokenizer.spec,
                    seq_len=128)
        questions = data / "questions.jsonl"
        cmd = [sys.executable, "-m", "memtron.cli", "compare",
               "--config", str(repo / "configs" / "tiny-cpu.yaml"), "--arms", arms,
               "--seeds", seeds, "--steps", str(steps), "--out", str(out),
               "--questions", str(questions), f"data.train={data / 'train'}",
               f"data.valid={data / 'valid'}", f"data.questions={questions}",
               f"data.tokenizer={tokenizer.spec}", *QUICK_QUALITY_OVERRIDES]
        outcome = run_command(QUALITY, cmd, out / "compare.json",
                              results / "logs" / "quality.log",
                              max(1.0, timeout - (time.perf_counter() - start)), cwd=repo)
        for name in ("compare.json", "compare.md", "compare.png"):
            if (out / name).is_file():
                shutil.copy(out / name, keep / name)
    outcome.wall_s = time.perf_counter() - start
    load = probe.stop()
    if outcome.data is not None:
        outcome.data = wrap_compare(outcome.data, keep, load, machine())
    return outcome


def wrap_compare(compare: dict[str, Any], directory: Path, load: dict[str, Any] | None,
                 host: dict[str, Any] | None) -> dict[str, Any]:
    """A `memtron compare` result in the envelope of the bench results. Given as --quality,
    its machine and load are those recorded per run by compare (load averages) when this
    process did not measure them."""
    runs = [r for arm in compare.get("runs", {}).values() for r in arm]
    if load is None:
        avgs = [r["loadavg"][0] for r in runs if r.get("loadavg")]
        load = {"loadavg_before": [min(avgs)] if avgs else [],
                "loadavg_after": [max(avgs)] if avgs else [],
                "note": "1-min load averages recorded by compare after each run"}
    summary = compare.get("summary", [])
    base = next((row for row in summary if row["arm"] == "dense"), summary[0] if summary else {})
    return {"bench": QUALITY, "machine": host or {"cpu": "machine not recorded by compare"},
            "load": load, "results": compare, "directory": str(directory),
            "baseline": {"kind": f"the {base.get('arm', '?')} arm, same steps and tokens",
                         "arm": base.get("arm"),
                         "accuracy": {k: v["accuracy"]
                                      for k, v in base.get("buckets", {}).items()}}}


def load_quality(directory: Path) -> Outcome:
    """The output directory of a `memtron compare` run given with --quality."""
    path = directory / "compare.json"
    if not path.is_file():
        return Outcome(QUALITY, "failed", note=f"{path} does not exist")
    data = wrap_compare(json.loads(path.read_text()), directory, None, None)
    return Outcome(QUALITY, "ok", data=data, note=f"read from {directory}")


# --------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def context_line(data: dict[str, Any]) -> str:
    """Machine and CPU load of one result, for a figure title or a caption."""
    return f"{machine_label(data.get('machine', {}))} | {load_label(data.get('load', {}))}"


def _save(fig: Any, out: Path, name: str, title: str, data: dict[str, Any]) -> str:
    plt = _pyplot()
    kind = (data.get("baseline") or {}).get("kind")
    fig.suptitle(f"{title}\n{context_line(data)}"
                 + (f"\nbaseline (same run): {kind}" if kind else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


def _bars(ax: Any, labels: list[str], series: dict[str, list[float | None]],
          ylabel: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels,
                  fontsize=7, rotation=20)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


@dataclass
class Section:
    """A report section: figures (PNG names), a markdown table and a caption."""

    title: str
    figures: list[str] = field(default_factory=list)
    table: str = ""
    caption: str = ""


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fig_pkm_layer(data: dict[str, Any], out: Path) -> list[Section]:
    plt = _pyplot()
    rows, base = data["results"], data["baseline"]
    labels = [f"{r['slots']} x {r['d']}" for r in rows]
    sides = [s for s in ("memtron", "memtron+", "peer") if any(s in r["ms"] for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    _bars(ax, labels, {("product-key-memory (baseline)" if s == "peer" else s):
                       [r["ms"].get(s) for r in rows] for s in sides}, "step time, ms")
    ax.set_xlabel("slots x value dim")
    step = Section("Memory layer step time vs product-key-memory", [
        _save(fig, out, "pkm_layer_step.png", "PKM layer: forward + backward + optimizer step",
              data)],
        _table(["slots x d", *[f"{s} ms" for s in sides], "PKM / memtron", "busy machine"],
               [[lab, *[r["ms"].get(s) for s in sides],
                 (r["ms"]["peer"] / r["ms"]["memtron"]
                  if r["ms"].get("peer") and r["ms"].get("memtron") else None),
                 "yes" if r.get("busy") else "no"] for lab, r in zip(labels, rows)]),
        f"Baseline measured in the same run: {base['kind']}.")
    memcpy = base["memcpy_gbs"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    _bars(ax, labels, {"lookup forward": [r["fwd_gbs"] for r in rows],
                       "lookup backward": [r["bwd_gbs"] for r in rows]}, "GB/s")
    ax.axhline(memcpy, color="black", linestyle="--", label=f"memcpy {memcpy:.1f} GB/s")
    ax.legend(fontsize=7)
    gather = Section("Gather bandwidth vs memcpy", [
        _save(fig, out, "pkm_layer_gather.png", "Value gather bandwidth (table.lookup)", data)],
        _table(["slots x d", "fwd GB/s", "of memcpy", "bwd GB/s", "of memcpy"],
               [[lab, r["fwd_gbs"], r["fwd_gbs"] / memcpy if r["fwd_gbs"] else None,
                 r["bwd_gbs"], r["bwd_gbs"] / memcpy if r["bwd_gbs"] else None]
                for lab, r in zip(labels, rows)]),
        f"Baseline measured in the same run: memcpy (`copy_`) {memcpy:.2f} GB/s, read + "
        "written. Above 100 % = rows reused from cache (small tables).")
    return [step, gather]


def fig_memory_parallel(data: dict[str, Any], out: Path) -> list[Section]:
    plt = _pyplot()
    rows = [r for r in data["results"] if r["summary"] is not None]
    labels = [f"{r['job']['layout']}\n{r['job']['n'] >> 10}K/{r['job']['d']}/P{r['job']['p']}"
              for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    _bars(a1, labels, {"memtron (Traffic)": [r["summary"]["memtron"] for r in rows],
                       "wire (wrapped collectives)": [r["summary"]["wire"] for r in rows],
                       "analytic minimum": [r["summary"]["min"] for r in rows]},
          "bytes per rank per token")
    _bars(a2, labels, {"step": [r["summary"]["step_ms"] for r in rows],
                       "in collectives": [r["summary"]["comm_ms"] for r in rows]}, "ms")
    skipped = [f"{r['job']['layout']} {r['job']['n']}/{r['job']['d']}/P{r['job']['p']}: "
               f"{r['status']}" for r in data["results"] if r["summary"] is None]
    return [Section("Memory parallelism: bytes/token and step time per layout", [
        _save(fig, out, "memory_parallel.png", "Value-table layouts on gloo", data)],
        _table(["layout", "N", "d", "P", "step ms", "B/tok memtron", "B/tok wire", "B/tok min",
                "other processes"],
               [[r["job"]["layout"], r["job"]["n"], r["job"]["d"], r["job"]["p"],
                 r["summary"]["step_ms"], r["summary"]["memtron"], r["summary"]["wire"],
                 r["summary"]["min"], f"{r['summary']['foreign']:.0%}"] for r in rows]),
        f"Baseline measured in the same run: {data['baseline']['kind']}."
        + ("" if not skipped else " Not run: " + "; ".join(skipped) + "."))]


def fig_context_parallel(data: dict[str, Any], out: Path) -> list[Section]:
    plt = _pyplot()
    rows = [r for r in data["results"] if r["status"] == "ok"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"cp={r['run']['cp']} {r['run']['kernel']}", []).append(r)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, group in groups.items():
        group.sort(key=lambda r: r["run"]["length"])
        lengths = [r["run"]["length"] for r in group]
        a1.plot(lengths, [1e3 * r["step_s"] for r in group], marker="o", label=name)
        a2.plot(lengths, [r["peak_bytes"] / 2**20 for r in group], marker="o", label=name)
    for ax, label in ((a1, "step time (fwd + bwd), ms"), (a2, "peak memory per rank, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    other = [f"L={r['run']['length']} cp={r['run']['cp']} {r['run']['kernel']}: {r['status']}"
             for r in data["results"] if r["status"] != "ok"]
    return [Section("Context parallelism: memory and time per sequence length", [
        _save(fig, out, "context_parallel.png", "One attention layer, ring attention vs cp=1",
              data)],
        _table(["L", "cp", "kernel", "step ms", "peak MiB/rank", "ring comm share"],
               [[r["run"]["length"], r["run"]["cp"], r["run"]["kernel"], 1e3 * r["step_s"],
                 r["peak_bytes"] / 2**20,
                 f"{r['comm_frac']:.0%}" if r["run"]["cp"] > 1 else "-"] for r in rows]),
        f"Baseline measured in the same run: {data['baseline']['kind']}."
        + ("" if not other else " Not run: " + "; ".join(other) + "."))]


def fig_parallel_overhead(data: dict[str, Any], out: Path) -> list[Section]:
    plt = _pyplot()
    rows, base = data["results"], data["baseline"]
    labels = [r["label"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    _bars(a1, labels, {"tokens/s": [r["tok_s"] for r in rows]}, "tokens/s")
    a1.axhline(base["tok_s_1p1t"], color="black", linestyle="--", label="1 process, 1 thread")
    a1.legend(fontsize=7)
    multi = [r for r in rows if r["world"] > 1]
    _bars(a2, [r["label"] for r in multi],
          {"measured": [r["bytes_per_step"] / 2**20 for r in multi],
           "analytic": [r["analytic_bytes_per_step"] / 2**20 for r in multi]},
          "MiB per rank per step")
    return [Section("Parallel overhead (dp, tp) against one process", [
        _save(fig, out, "parallel_overhead.png", "Tiny model: tokens/s and collective bytes",
              data)],
        _table(["layout", "tokens/s", "vs 1p/1t", "vs 1p/2t", "MiB/step", "analytic MiB",
                "other processes"],
               [[r["label"], r["tok_s"], r["tok_s"] / base["tok_s_1p1t"],
                 r["tok_s"] / base["tok_s_1p2t"], r["bytes_per_step"] / 2**20,
                 r["analytic_bytes_per_step"] / 2**20 or None,
                 "-" if r["foreign"] is None else f"{r['foreign']:.0%}"] for r in rows]),
        f"Baseline measured in the same run: {base['kind']} ({base['tok_s_1p1t']:,.0f} and "
        f"{base['tok_s_1p2t']:,.0f} tokens/s).")]


def fig_memory_fetch(data: dict[str, Any], out: Path) -> list[Section]:
    plt = _pyplot()
    rows = [r for r in data["results"]["rows"] if not r["name"].startswith("sequential")]
    seq = data["baseline"]["GBps"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    _bars(ax, [r["name"] for r in rows], {"fetch": [r["GBps"] for r in rows]}, "GB/s")
    for cache, style in (("warm", "--"), ("cold", ":")):
        ax.axhline(seq[cache], color="black", linestyle=style,
                   label=f"sequential read, {cache} ({seq[cache]:.2f} GB/s)")
    ax.legend(fontsize=7)
    cfg = data["results"]["config"]
    return [Section("Fetch throughput", [
        _save(fig, out, "memory_fetch.png",
              f"RowStore fetches, {cfg['rows']:,} x {cfg['dim']} fp32 table", data)],
        _table(["source", "M rows/s", "GB/s", "x sequential", "against"],
               [[r["name"], r["rows_per_s"] / 1e6, r["GBps"], r["vs_sequential"], r["baseline"]]
                for r in rows]),
        f"Baseline measured in the same run: {data['baseline']['kind']}.")]


def fig_table_scale(data: dict[str, Any], out: Path) -> list[Section]:
    plt = _pyplot()
    res = data["results"]
    scaling = res["scaling"]
    labels = [f"{r['rows'] >> 10:,}K" for r in scaling]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    _bars(a1, labels, {"table step": [1e3 * r["step_s"] for r in scaling]}, "ms")
    _bars(a2, labels, {"per touched row": [r["us_per_touched_row"] for r in scaling]}, "us")
    for ax in (a1, a2):
        ax.set_xlabel("table rows")
    sections = [Section("Value tables at scale: step time against table size", [
        _save(fig, out, "table_scale.png", f"Table step (lookup + backward + update), "
              f"{res['kernels']}", data)],
        _table(["rows", "step ms", "x smallest", "rows touched", "us / touched row",
                "x smallest"],
               [[lab, 1e3 * r["step_s"], r["ratio"], r["touched"], r["us_per_touched_row"],
                 r["per_row_ratio"]] for lab, r in zip(labels, scaling)]),
        f"Baseline measured in the same run: {data['baseline']['kind']}.")]
    largest = res.get("largest")
    init_rows = [[f"{r['rows'] >> 10:,}K x {r['dim']} {r['dtype']}", r["init_gbs"],
                  r["fill_gbs"], r["init_over_fill"]] for r in res["init"]]
    text = _table(["table", "init GB/s", "fill_ GB/s", "init / fill"], init_rows)
    if largest and "error" not in largest:
        text += "\n" + _table(
            ["largest table", "params", "rows", "peak RSS GiB", "build s", "step ms",
             "B / param"],
            [[f"{largest['dtype']} + {largest['optimizer']}", largest["params"],
              largest["rows"], largest["peak_rss"] / 2**30, largest["build_s"],
              1e3 * largest["step_s_median"], largest["bytes_per_param"]]])
    text += "\n" + _table(["optimizer", "rows", "moment", "bytes / table param"],
                          [[r["optimizer"], r["dtype"], r["moment"], r["bytes_per_param"]]
                           for r in res["bytes"]])
    sections.append(Section("Value tables at scale: init, largest table, bytes per parameter",
                            [], text, "Baseline measured in the same run: `fill_` of the same "
                            "bytes (init)."))
    return sections


def fig_checkpoint_save(data: dict[str, Any], out: Path) -> list[Section]:
    import statistics

    plt = _pyplot()
    rows = data["results"]
    modes = list(rows)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    _bars(ax, modes, {"blocked per save": [statistics.median(rows[m]["blocked"]) for m in modes],
                      "until complete": [statistics.median(rows[m]["complete"]) for m in modes],
                      "step alone": [rows[m]["step_alone"] for m in modes]}, "seconds")
    size = rows[modes[0]]["size"] / 2**20
    return [Section("Checkpoint save: time training is blocked", [
        _save(fig, out, "checkpoint_save.png", f"Saving a {size:.0f} MiB checkpoint", data)],
        _table(["mode", "blocked s (median)", "complete s", "step alone s", "step during s"],
               [[m, statistics.median(rows[m]["blocked"]), statistics.median(rows[m]["complete"]),
                 rows[m]["step_alone"],
                 statistics.median(rows[m]["step_during"]) if rows[m]["step_during"] else None]
                for m in modes]),
        f"Baseline measured in the same run: {data['baseline']['kind']}.")]


def fig_generation(data: dict[str, Any], out: Path) -> list[Section]:
    plt = _pyplot()
    rows = data["results"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    sources = list(dict.fromkeys(r["source"] for r in rows))
    value = {(r["model"], r["source"]): r["tokens_per_s"] for r in rows}
    fig, ax = plt.subplots(figsize=(6, 3.4))
    _bars(ax, models, {s: [value.get((m, s)) for m in models] for s in sources}, "tokens/s")
    return [Section("Generation with tables in RAM, memory-mapped, served", [
        _save(fig, out, "generation.png", "memtron generate, batch of 4, greedy", data)],
        _table(["model", "source", "tokens/s", "x RAM", "same tokens as RAM"],
               [[r["model"], r["source"], r["tokens_per_s"], r["ratio_to_ram"],
                 r["same_tokens_as_ram"]] for r in rows]),
        f"Baseline measured in the same run: {data['baseline']['kind']}.")]


def fig_gpu_kernels(data: dict[str, Any], out: Path) -> list[Section]:
    cases = data["results"]["cases"]
    keys = sorted({k for c in cases for k in c if k.endswith("GBps")})
    return [Section("GPU value-table kernels", [], _table(
        ["rows", "dim", "dtype", *keys], [[c.get("rows"), c.get("dim"), c.get("dtype"),
                                           *[c.get(k) for k in keys]] for c in cases]),
        f"Baseline measured in the same run: {data['baseline']['kind']} "
        f"({data['baseline']['copy_GBps']:.0f} GB/s).")]


def fig_quality(data: dict[str, Any], out: Path) -> list[Section]:
    from memtron.eval.compare import markdown_table, plot

    compare = data["results"]
    summary = compare["summary"]
    shown = [o for o in compare.get("overrides") or []
             if not o.startswith(("data.train=", "data.valid=", "data.questions=",
                                  "data.tokenizer="))]
    title = (f"{len(compare['seeds'])} seed(s), {summary[0]['train_tokens']:,} training tokens "
             f"per run\n{context_line(data)}\nbaseline (same run): {data['baseline']['kind']}")
    plot(summary, out / "quality.png", title)
    return [Section("Quality: equal-compute comparison", ["quality.png"], markdown_table(summary),
                    f"Baseline measured in the same run: {data['baseline']['kind']}. "
                    f"Config `{Path(compare.get('config') or 'defaults').name}` with "
                    f"`{' '.join(shown) or 'no overrides'}` (data paths omitted), arms "
                    f"{', '.join(r['arm'] for r in summary)}, seeds {compare['seeds']}. "
                    f"Intervals: Wilson 95 %, questions pooled over seeds. Source: "
                    f"`{data.get('directory', '?')}`.")]


FIGURES: dict[str, Callable[[dict[str, Any], Path], list[Section]]] = {
    "pkm_layer": fig_pkm_layer, "memory_parallel": fig_memory_parallel,
    "context_parallel": fig_context_parallel, "parallel_overhead": fig_parallel_overhead,
    "memory_fetch": fig_memory_fetch, "table_scale": fig_table_scale,
    "checkpoint_save": fig_checkpoint_save,
    "generation": fig_generation, "gpu_kernels": fig_gpu_kernels, QUALITY: fig_quality}


# --------------------------------------------------------------------------- REPORT.md


def render(outcomes: list[Outcome], out: Path, header: dict[str, Any] | None = None) -> Path:
    """Write ``out/REPORT.md`` and its PNGs from the outcomes; a result whose figures cannot be
    drawn is reported as failed, never dropped."""
    out.mkdir(parents=True, exist_ok=True)
    header = header or {}
    parts: list[str] = []
    for o in outcomes:
        if o.status != "ok" or o.data is None:
            continue
        try:
            sections = FIGURES[o.name](o.data, out)
        except Exception as exc:  # a malformed result must not cost the rest of the report
            import traceback

            o.status, o.note = "failed", f"report could not draw it: {exc!r}"
            o.tail = _tail(traceback.format_exc())
            continue
        for s in sections:
            parts.append(f"## {s.title}\n")
            parts += [f"![{s.title}]({name})\n" for name in s.figures]
            parts.append(f"Machine: {machine_label(o.data.get('machine', {}))}. CPU load "
                         f"during the run: {load_label(o.data.get('load', {}))}. "
                         f"{s.caption}\n")
            if s.table:
                parts.append(s.table)
    failed = [o for o in outcomes if o.status == "failed"]
    lines = ["# memtron benchmark report", ""]
    if header.get("command"):
        lines.append(f"`{header['command']}`" + (f", {header['created']}" if header.get(
            "created") else "") + "\n")
    if header.get("machine"):
        lines.append(f"Machine: {machine_label(header['machine'])}, "
                     f"{header['machine'].get('mem_total_gib', '?')} GiB RAM, torch "
                     f"{header['machine'].get('torch', '?')}.")
    if header.get("load"):
        lines.append(f"CPU load over the whole report run: {load_label(header['load'])}.")
    if header.get("wall_s") is not None:
        lines.append(f"Wall time: {header['wall_s']:.0f} s.")
    lines += ["", "Every benchmark measures its baseline in the same run; on a shared machine "
              "(other processes > 10 % of the CPUs) timings are indicative only.", ""]
    lines += ["| benchmark | status | wall s | CPU busy | other processes | note |",
              "|---|---|---|---|---|---|"]
    for o in outcomes:
        load = (o.data or {}).get("load", {})
        wall = o.wall_s or (o.data or {}).get("wall_s") or 0.0
        busy = "-" if load.get("busy_mean") is None else f"{load['busy_mean']:.0%}"
        others = "-" if load.get("others_mean") is None else f"{load['others_mean']:.0%}"
        lines.append(f"| {o.name} | {o.status} | {wall:.0f} | {busy} | {others} | "
                     f"{o.note} |")
    lines.append("")
    text = "\n".join(lines) + "\n" + "\n".join(parts)
    if failed:
        text += "\n## Failed\n\n"
        for o in failed:
            text += f"### {o.name}: {o.note}\n\n"
            if o.log:
                text += f"Log: `{o.log}`\n\n"
            text += "```\n" + (o.tail or "(no output)") + "\n```\n\n"
    path = out / "REPORT.md"
    path.write_text(text)
    return path


def report(out: Path, quick: bool = False, only: list[str] | None = None,
           bench_dir: Path | None = None, quality: Path | None = None,
           quality_steps: int = 200, timeout: float = 900.0,
           log: Callable[[str], None] = print) -> tuple[Path, list[Outcome]]:
    """Run the benchmarks (``only`` these names), collect their JSON under ``out/results`` and
    write ``out/REPORT.md``; return its path and the outcomes."""
    import datetime

    names = list(only) if only else list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ReportError(f"--only: unknown benchmark(s) {', '.join(unknown)}; known: "
                          f"{', '.join(NAMES)}")
    benches = [b for b in BENCHES if b.name in names]
    directory = find_bench_dir(bench_dir) if benches or (QUALITY in names and not quality) \
        else None
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    probe = LoadProbe().start()
    start = time.perf_counter()
    outcomes = []
    for spec in benches:
        log(f"bench report: running {spec.name}{' --quick' if quick else ''}")
        outcomes.append(run_bench(spec, directory, results, quick, timeout))
        o = outcomes[-1]
        log(f"bench report: {spec.name} {o.status} in {o.wall_s:.0f} s"
            + (f" ({o.note})" if o.note else ""))
    if QUALITY in names:
        if quality is not None:
            outcomes.append(load_quality(quality))
        elif quick:
            log(f"bench report: running a small memtron compare (dense vs memory, 2 seeds, "
                f"{quality_steps} steps)")
            outcomes.append(run_quality(directory.parent, results, quality_steps, "0,1",
                                        "dense,memory", 2 * timeout))  # 4 trainings
        else:
            outcomes.append(Outcome(QUALITY, "skipped", note="pass --quality DIR (the output "
                                    "of memtron compare), or --quick to run a small one"))
        log(f"bench report: quality {outcomes[-1].status}"
            + (f" ({outcomes[-1].note})" if outcomes[-1].note else ""))
    header = {"command": "memtron bench report" + (" --quick" if quick else ""),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"), "machine": machine(), "wall_s": time.perf_counter() - start,
              "load": probe.stop()}
    return render(outcomes, out, header), outcomes
