"""Step-time overhead of one Memory+ layer against its dense twin at equal FLOPs (issue 23).

The model is ``configs/tiny-cpu.yaml`` of the tree under test (4 blocks, d 128, one Memory+
layer beside the FFN of block 2, a 4,096-slot value table), trained at its own batch (16 x 128
tokens) and vocabulary. Two arms:

    memory     the config as it is
    dense-eq   the memory layers removed (``memtron compare``'s ``dense`` arm) and ``model.d_ff``
               widened in every block until the training FLOPs per token match the memory arm's
               (memtron's estimate, ``train/metrics.py``: 6 per dense weight + attention scores,
               lookups uncounted). A memory layer adds 6 x (query net + query norm + sub-keys +
               Memory+ gate and output) FLOPs per token, minus the FFN it replaces under
               ``placement: replace``; d_ff grows by that over 3 x d x n_layers, rounded to a
               multiple of 8 (tiny: 384 -> 440, FLOPs within 0.3 %). ``--dense-d-ff`` overrides.
    dense      (optional, ``--arms``) compare's ``dense`` arm as is: memory removed, same d_ff.

Only public entry points are used, so the same script measures the old and the new core: each
run is a fresh ``memtron train --config ... key=value ...`` process with ``PYTHONPATH`` set to
``--tree`` (the child checks that it imported memtron from there), and the step times are the
ones memtron logs itself: ``tokens_per_s`` of every ``train`` record in the run's
``metrics.jsonl`` (``train.log_every=1``), step ms = tokens per step / tokens_per_s. Nothing of
memtron is patched. The corpus is built once by the tree's own ``memtron data synth`` and
``memtron data prepare --tokenizer byte`` into a temporary directory both arms read; byte ids
fit the config's 4,096-entry vocabulary, which is kept so that the logits cost what they cost
in the tiny model.

Rounds interleave the arms (memory, dense-eq | dense-eq, memory | memory, dense-eq ...: the
order flips every round so that a steady drift of the load hits both arms alike), so a burst of
foreign load hits one round rather than one arm. Per arm: the median step over all measured
steps of all rounds, tokens/s (measured tokens / summed step time), and per round its median
step and the share of the cores other processes used during its measured steps (/proc/stat busy
time minus the CPU time of the run's process tree, sampled when memtron writes the records that
open and close the window); rounds above 10 % are flagged. Beside it, the CPU time of the run's
processes per measured step, which foreign load inflates less than the wall clock (a preempted
thread does not count; caches and SMT siblings still do). The ratio memory / dense-eq is given
pooled, per round (each round's two arms ran back to back) and in CPU time.

    python bench/memory_overhead.py                          # 3 rounds of 5 + 30 steps
    python bench/memory_overhead.py --quick                  # 1 round of 2 + 4 steps
    python bench/memory_overhead.py --tree /work/base --steps 10 --warmup 3 --repeats 2
    python bench/memory_overhead.py --arms memory,dense-eq,dense --out results/mo.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memtron.bench.harness import (  # noqa: E402 - after the sys.path line
    BenchRun,
    add_output_args,
    machine_busy_seconds,
    own_cpu_seconds,
)

BUSY = 0.10  # foreign CPU share above which a round is flagged
FF_MULTIPLE = 8  # the widened d_ff is rounded to this (odd widths would time GEMM edge cases)
RUN_TIMEOUT_S = 900.0
# memtron's defaults (config.py at ac6aa8c) for the keys a config may leave out.
MEMORY_DEFAULTS = {"placement": "replace", "memory_plus": True, "n_heads": 4, "d_key": 64,
                   "n_sub_keys": 64, "value_dim": 0, "query_norm": True}
# Launcher: `memtron` from the tree on PYTHONPATH (the console script may point elsewhere).
LAUNCHER = """\
import sys
import memtron
print(f"memtron-bench: memtron from {memtron.__file__}", file=sys.stderr, flush=True)
from memtron.cli import main
sys.argv[0] = "memtron"
sys.exit(main())
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- running the CLI of a tree ------------------------------------------------------------------
@dataclass
class Tree:
    """A source tree to run: its ``memtron`` CLI through a launcher with ``PYTHONPATH=path``."""

    path: Path
    launcher: Path

    @classmethod
    def at(cls, path: Path, workdir: Path) -> Tree:
        path = path.resolve()
        if not (path / "memtron" / "__init__.py").is_file():
            raise SystemExit(f"--tree {path}: no memtron/__init__.py there")
        launcher = workdir / "memtron_launch.py"
        launcher.write_text(LAUNCHER)
        return cls(path, launcher)

    def env(self) -> dict[str, str]:
        """This environment with the tree on PYTHONPATH and no launcher variables leaking in."""
        env = dict(os.environ, PYTHONPATH=str(self.path), PYTHONUNBUFFERED="1")
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        return env

    def command(self, args: list[str], nproc: int = 1) -> list[str]:
        """``memtron ARGS`` in one process, or under torchrun with ``nproc`` ranks."""
        if nproc == 1:
            return [sys.executable, str(self.launcher), *args]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", str(self.launcher), *args]

    def check_import(self, log: str) -> None:
        """The child must have imported memtron from this tree, not from an installed copy."""
        for line in log.splitlines():
            if line.startswith("memtron-bench: memtron from "):
                where = Path(line.split(" from ", 1)[1]).resolve()
                if self.path not in where.parents:
                    raise SystemExit(f"the child imported memtron from {where}, not {self.path}")


def run_cli(tree: Tree, args: list[str], cwd: Path, log: Path) -> None:
    """Run ``memtron ARGS`` to completion; exit with the log's tail when it fails."""
    with open(log, "w") as out:
        rc = subprocess.run(tree.command(args), cwd=cwd, env=tree.env(), stdout=out,
                            stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S).returncode
    text = log.read_text()
    tree.check_import(text)
    if rc != 0:
        raise SystemExit(f"memtron {' '.join(args[:2])} failed (exit {rc}):\n{text[-3000:]}")


def prepare_corpus(tree: Tree, root: Path, seq_len: int) -> tuple[Path, Path]:
    """A small synthetic corpus, byte-tokenized into shards by the tree's own CLI."""
    root.mkdir(parents=True, exist_ok=True)
    run_cli(tree, ["data", "synth", "--out", str(root / "synth"), "--entities", "200",
                   "--train-docs", "3000", "--valid-docs", "50",
                   "--questions-per-bucket", "10"], root, root / "synth.log")
    parts = []
    for part in ("train", "valid"):
        run_cli(tree, ["data", "prepare", "--out", str(root / part), "--tokenizer", "byte",
                       "--seq-len", str(seq_len), str(root / "synth" / "raw" / f"{part}.jsonl")],
                root, root / f"prepare-{part}.log")
        parts.append(root / part)
    return parts[0], parts[1]


def _tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds of a process and its live descendants (reaped ones through cutime/cstime)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the name: state ppid ... utime(12) stime(13) cutime(14) cstime(15)
        stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / CLK_TCK)
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo.extend(child for child, (ppid, _) in stats.items() if ppid == pid)
    return total


@dataclass
class TrainRun:
    """What one ``memtron train`` process logged, and the load during its measured steps."""

    records: list[dict[str, Any]]
    warmup: int
    tokens_per_step: int
    window_s: float = 0.0
    foreign: float | None = None  # share of all cores other processes used in the window
    cpu_s: float | None = None  # CPU time of the run's processes in the window
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wall_s: float = 0.0
    log_tail: str = ""
    step_ms: list[float] = field(init=False)

    def __post_init__(self) -> None:
        measured = self.records[self.warmup:]
        self.step_ms = [1000.0 * self.tokens_per_step / r["tokens_per_s"] for r in measured]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def tokens_per_s(self) -> float:
        return len(self.step_ms) * self.tokens_per_step / (sum(self.step_ms) / 1000.0)

    @property
    def cpu_ms(self) -> float | None:
        """CPU time per measured step of the run's processes: less sensitive to foreign load
        than the wall-clock step (a preempted thread does not count), though not immune."""
        return None if self.cpu_s is None else 1000.0 * self.cpu_s / len(self.step_ms)

    @property
    def clock_check(self) -> str | None:
        """A warning when the logged step times do not add up to the watched window: memtron's
        ``tokens_per_s`` counting other tokens than ``tokens_per_step`` (e.g. per rank)."""
        logged = sum(self.step_ms) / 1000.0
        if not self.window_s or 0.7 <= self.window_s / logged <= 1.6:
            return None
        return (f"warning: the measured steps took {self.window_s:.2f} s by the clock but "
                f"{logged:.2f} s by metrics.jsonl (tokens_per_s x {self.tokens_per_step} tokens "
                "per step): the tree's tokens_per_s may count other tokens")

    @property
    def flops_per_token(self) -> float | None:
        """memtron's own estimate, from the logged ``tflops`` / ``tokens_per_s``."""
        r = self.records[-1]
        return r["tflops"] * 1e12 / r["tokens_per_s"] if "tflops" in r else None


def train(tree: Tree, config: Path, overrides: list[str], run_dir: Path, warmup: int,
          steps: int, tokens_per_step: int, nproc: int = 1) -> TrainRun:
    """One fresh ``memtron train`` run of ``warmup + steps`` steps, every step logged.

    The parent watches ``metrics.jsonl`` as memtron appends it: when the ``warmup``-th and the
    last train record appear it samples /proc/stat and the run's process tree, which gives the
    share of the cores other processes used during the measured steps."""
    args = ["train", "--config", str(config), *overrides, f"train.steps={warmup + steps}",
            "train.log_every=1", "train.eval_every=0", f"train.run_dir={run_dir}",
            "checkpoint.every=0", "logging.tensorboard=false", "logging.progress=false",
            "logging.jsonl=true"]
    metrics, log = run_dir / "metrics.jsonl", run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(tree.command(args, nproc), cwd=run_dir.parent, env=tree.env(),
                                stdout=out, stderr=subprocess.STDOUT)
        seen, offset, buffer, marks = 0, 0, "", {}
        load0 = os.getloadavg()
        while True:
            done = proc.poll() is not None
            if metrics.exists():
                with open(metrics) as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk.encode())
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                seen += sum(1 for line in lines
                            if line.strip() and json.loads(line).get("kind") == "train")
                for mark in (warmup, warmup + steps):
                    if seen >= mark and mark not in marks and not done:
                        marks[mark] = (time.perf_counter(), machine_busy_seconds(),
                                       _tree_cpu_seconds(proc.pid),
                                       own_cpu_seconds(children=False))  # this watcher
            if done:
                break
            if time.perf_counter() - start > RUN_TIMEOUT_S:
                proc.kill()
                proc.wait()
                raise SystemExit(f"memtron train timed out after {RUN_TIMEOUT_S:.0f} s; log {log}")
            time.sleep(0.05)
    text = log.read_text()
    tree.check_import(text)
    if proc.returncode != 0:
        raise SystemExit(f"memtron train failed (exit {proc.returncode}):\n{text[-3000:]}")
    records = [r for r in (json.loads(line) for line in metrics.read_text().splitlines()
                           if line.strip()) if r.get("kind") == "train"]
    if len(records) != warmup + steps or any("tokens_per_s" not in r for r in records):
        raise SystemExit(f"{metrics}: expected {warmup + steps} train records with tokens_per_s,"
                         f" got {len(records)}")
    run = TrainRun(records, warmup, tokens_per_step, wall_s=time.perf_counter() - start,
                   log_tail=text[-2000:])
    load1 = os.getloadavg()
    run.loadavg = tuple(max(a, b) for a, b in zip(load0, load1))  # type: ignore[assignment]
    if warmup in marks and warmup + steps in marks:
        (t0, busy0, cpu0, own0), (t1, busy1, cpu1, own1) = marks[warmup], marks[warmup + steps]
        run.window_s, run.cpu_s = t1 - t0, cpu1 - cpu0
        foreign = (busy1 - busy0) - run.cpu_s - (own1 - own0)
        run.foreign = max(0.0, foreign / max(run.window_s * (os.cpu_count() or 1), 1e-9))
    if run.clock_check:
        print(f"  {run.clock_check}", flush=True)
    return run


# -- the arms -----------------------------------------------------------------------------------
def memory_layer_params(model: dict[str, Any], memory: dict[str, Any]) -> int:
    """Dense weights one memory layer adds (the value table excluded): query net [Hm*d_key, d],
    query RMSNorm [d_key], sub-keys [Hm, 2, n, d_key/2], Memory+ gate [d_v, d] and out [d, d_v];
    minus the block's SwiGLU FFN (3 x d x d_ff) when the layer replaces it."""
    m = {**MEMORY_DEFAULTS, **memory}
    d = model["d_model"]
    d_value = m["value_dim"] or d
    params = (d * m["n_heads"] * m["d_key"] + (m["d_key"] if m["query_norm"] else 0)
              + m["n_heads"] * 2 * m["n_sub_keys"] * (m["d_key"] // 2)
              + (2 * d * d_value if m["memory_plus"] else 0))
    return params - (3 * d * model["d_ff"] if m["placement"] == "replace" else 0)


def equal_flops_d_ff(model: dict[str, Any], memory: dict[str, Any]) -> int:
    """The d_ff at which the dense model has the memory model's dense weights (hence FLOPs)."""
    extra = len(memory.get("layers") or []) * memory_layer_params(model, memory)
    widen = extra / (3 * model["d_model"] * model["n_layers"])
    return model["d_ff"] + FF_MULTIPLE * round(widen / FF_MULTIPLE)


def arm_overrides(name: str, d_ff_eq: int) -> list[str]:
    dense = ["memory.layers=[]", "memory.shared_tables=[]"]  # memtron compare's `dense` arm
    return {"memory": [], "dense": dense, "dense-eq": [*dense, f"model.d_ff={d_ff_eq}"]}[name]


ARMS = ("memory", "dense-eq", "dense")


def _fmt_load(run: TrainRun) -> str:
    foreign = "n/a" if run.foreign is None else f"{run.foreign:.0%}"
    flag = "*" if run.foreign is not None and run.foreign > BUSY else " "
    return f"foreign CPU {foreign:>4}{flag} loadavg {run.loadavg[0]:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="source tree to measure (PYTHONPATH of the memtron processes; "
                             "default: this repository)")
    parser.add_argument("--config", type=Path, default=None,
                        help="model recipe (default: TREE/configs/tiny-cpu.yaml)")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured steps per run (default 30, --quick 4)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up steps per run (default 5, --quick 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke test")
    parser.add_argument("--threads", type=int, default=1,
                        help="train.threads of every run (1: steadier on a shared machine)")
    parser.add_argument("--arms", default="memory,dense-eq",
                        help=f"comma-separated, from {', '.join(ARMS)}; the first is the "
                             "numerator of the ratios, the second the denominator")
    parser.add_argument("--dense-d-ff", type=int, default=None,
                        help="d_ff of the dense-eq arm (default: matched FLOPs, see above)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the corpus, run dirs and logs here instead of a temp dir")
    add_output_args(parser)
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 30)
    args.warmup = args.warmup or (2 if args.quick else 5)
    args.repeats = args.repeats or (1 if args.quick else 3)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if len(arms) < 2 or any(a not in ARMS for a in arms):
        parser.error(f"--arms: at least two of {', '.join(ARMS)}")
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--steps, --warmup and --repeats must be >= 1")
    config = (args.config or args.tree / "configs" / "tiny-cpu.yaml").resolve()
    recipe = yaml.safe_load(config.read_text())
    model, memory, data = recipe["model"], recipe.get("memory", {}), recipe.get("data", {})
    if not memory.get("layers"):
        parser.error(f"{config} has no memory layers to measure")
    seq_len = data.get("seq_len", model.get("max_seq_len"))
    batch = data.get("micro_batch_size")
    d_ff_eq = args.dense_d_ff or equal_flops_d_ff(model, memory)
    tokens_per_step = seq_len * batch  # one process, grad_accum 1 (forced below)

    bench = BenchRun("memory_overhead", args).start()
    start = time.perf_counter()
    load = os.getloadavg()
    print(f"memtron Memory+ overhead: tree {args.tree.resolve()}, {os.cpu_count()} CPU cores, "
          f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)", flush=True)
    with tempfile.TemporaryDirectory(prefix="memtron-memory-overhead-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tree = Tree.at(args.tree, work)
        t0 = time.perf_counter()
        train_dir, valid_dir = prepare_corpus(tree, work / "data", seq_len)
        common = [f"data.train={train_dir}", f"data.valid={valid_dir}", "data.questions=",
                  "data.tokenizer=byte", f"data.seq_len={seq_len}",
                  f"data.micro_batch_size={batch}", "train.grad_accum=1",
                  f"train.threads={args.threads}", "checkpoint.resume=none"]
        print(f"corpus: synthetic, byte tokens, prepared by the tree's CLI in "
              f"{time.perf_counter() - t0:.1f} s; model {config.name}: {model['n_layers']} "
              f"blocks, d {model['d_model']}, d_ff {model['d_ff']}, vocab {model['vocab_size']}, "
              f"memory layers {memory['layers']} ({memory.get('placement', 'replace')}); "
              f"dense-eq d_ff {d_ff_eq}; {args.repeats} round(s) of {args.warmup} warm-up + "
              f"{args.steps} measured steps of {batch} x {seq_len} tokens, "
              f"{args.threads} thread(s)", flush=True)
        runs: dict[str, list[TrainRun]] = {arm: [] for arm in arms}
        for r in range(args.repeats):
            for arm in arms if r % 2 == 0 else arms[::-1]:  # ABBA: drift hits both arms
                run = train(tree, config, [*common, *arm_overrides(arm, d_ff_eq)],
                            work / "runs" / f"{arm}-r{r + 1}", args.warmup, args.steps,
                            tokens_per_step)
                runs[arm].append(run)
                cpu = "n/a" if run.cpu_ms is None else f"{run.cpu_ms:.1f}"
                print(f"  round {r + 1}: {arm:<9} median {run.median_ms:7.1f} ms/step "
                      f"(CPU {cpu} ms), {run.tokens_per_s:8,.0f} tokens/s, {_fmt_load(run)} "
                      f"({run.wall_s:.0f} s with start-up)", flush=True)

    rows = []
    print(f"\n{'arm':<9} {'d_ff':>5} {'FLOPs/token':>12} {'median ms':>10} {'tokens/s':>9} "
          f"{'CPU ms':>7} {'round medians (ms)':<22} {'foreign CPU per round':<22} loss")
    for arm in arms:
        arm_runs = runs[arm]
        pooled = [ms for run in arm_runs for ms in run.step_ms]
        cpu = [run.cpu_ms for run in arm_runs if run.cpu_ms is not None]
        rows.append({
            "arm": arm, "d_ff": model["d_ff"] if arm != "dense-eq" else d_ff_eq,
            "overrides": arm_overrides(arm, d_ff_eq),
            "flops_per_token": arm_runs[0].flops_per_token,
            "median_ms": statistics.median(pooled),
            "tokens_per_s": len(pooled) * tokens_per_step / (sum(pooled) / 1000.0),
            "cpu_ms": statistics.median(cpu) if cpu else None,
            "round_median_ms": [run.median_ms for run in arm_runs],
            "round_cpu_ms": [run.cpu_ms for run in arm_runs],
            "round_tokens_per_s": [run.tokens_per_s for run in arm_runs],
            "foreign": [run.foreign for run in arm_runs],
            "loadavg": [list(run.loadavg) for run in arm_runs],
            "step_ms": [run.step_ms for run in arm_runs],
            "window_s": [run.window_s for run in arm_runs],
            "final_loss": [run.records[-1].get("loss") for run in arm_runs]})
        row = rows[-1]
        medians = " ".join(f"{x:.1f}" for x in row["round_median_ms"])
        shares = " ".join("n/a" if x is None else f"{x:.0%}" for x in row["foreign"])
        flops = "n/a" if row["flops_per_token"] is None else f"{row['flops_per_token']:.4g}"
        cpu_ms = "n/a" if row["cpu_ms"] is None else f"{row['cpu_ms']:.1f}"
        print(f"{arm:<9} {row['d_ff']:>5} {flops:>12} {row['median_ms']:>10.1f} "
              f"{row['tokens_per_s']:>9,.0f} {cpu_ms:>7} {medians:<22} {shares:<22} "
              f"{row['final_loss'][-1]:.3f}")
    print("median ms: over every measured step of every round; tokens/s: measured tokens / "
          "summed step time; CPU ms: CPU time of the run's processes per measured step, median "
          "over rounds; foreign: share of all cores other processes used in the measured steps")
    num, den = rows[0], rows[1]
    ratios = {
        "step_ms": num["median_ms"] / den["median_ms"],
        "per_round": [a / b for a, b in zip(num["round_median_ms"], den["round_median_ms"])],
        "tokens_per_s": den["tokens_per_s"] / num["tokens_per_s"],
        "cpu_ms": num["cpu_ms"] / den["cpu_ms"] if num["cpu_ms"] and den["cpu_ms"] else None,
        "flops": (num["flops_per_token"] / den["flops_per_token"]
                  if num["flops_per_token"] and den["flops_per_token"] else None)}
    name = f"{num['arm']} / {den['arm']}"
    print(f"\nstep time {name}: {ratios['step_ms']:.3f} (pooled medians); per round "
          f"{' '.join(f'{x:.3f}' for x in ratios['per_round'])} (median "
          f"{statistics.median(ratios['per_round']):.3f}); time per token (inverse tokens/s) "
          f"{ratios['tokens_per_s']:.3f}")
    extra = [f"CPU time per step {name}: {ratios['cpu_ms']:.3f}" if ratios["cpu_ms"] else "",
             f"FLOPs per token {name} (memtron's estimate): {ratios['flops']:.4f}"
             if ratios["flops"] else ""]
    if any(extra):
        print("; ".join(x for x in extra if x))
    busy = [i + 1 for i in range(args.repeats)
            if any((row["foreign"][i] or 0.0) > BUSY for row in rows)]
    if busy:
        print(f"caution: other processes used more than {BUSY:.0%} of the cores in round(s) "
              f"{', '.join(map(str, busy))} (* above); step times there are upper bounds and "
              "the ratio only indicative")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; total wall "
          f"time {time.perf_counter() - start:.0f} s")
    bench.results = rows
    bench.baseline = {"kind": f"{den['arm']}: the dense twin measured in the same rounds",
                      "ratios": ratios, "tokens_per_step": tokens_per_step,
                      "tree": str(args.tree.resolve()), "config": str(config)}
    bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
