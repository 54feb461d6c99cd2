"""How long a checkpoint save blocks training: synchronous vs ``checkpoint.async_save``.

The Trainer builds a memtron model whose checkpoint is a few hundred MB (default: d 512, 8
blocks, d_ff 1536, one Memory+ layer with a 16,384 x 512 value table; weights plus AdamW and
sparse-Adam moments, ~370 MiB) on a small generated corpus, trains one step so that the
optimizer state exists, and saves ``--saves`` times in each mode, in one process, into a
temporary directory under ``--dir`` (the file system the checkpoints would go to). Per save:

  blocked   how long ``Trainer.save()`` holds the training loop (sync: the whole write, the
            checksums and the manifest; async: staging the CPU copy)
  complete  how long until the checkpoint is on disk (sync: = blocked)

and, async only, the median time of a training step taken while a write is in flight against
the median of steps taken alone: on a small CPU machine the background writer competes with
training for the cores. The load average and the share of the CPUs used by other processes
during each mode are printed beside; above 10 % the numbers are only indicative.

    python bench/checkpoint_save.py            # ~370 MiB checkpoint, 3 saves per mode (~1 min)
    python bench/checkpoint_save.py --quick    # ~45 MiB, 2 saves per mode (< 30 s)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from memtron.bench.harness import BenchRun, ForeignCpu, add_output_args
from memtron.cli import silence_third_party_warnings
from memtron.config import load_config
from memtron.data.prepare import prepare
from memtron.data.synthetic import generate_corpus
from memtron.train.checkpoint import checkpoint_bytes, list_checkpoints
from memtron.train.trainer import Trainer

SEQ_LEN = 64


def make_corpus(root: Path) -> None:
    generate_corpus(root, n_entities=60, n_train_docs=300, n_valid_docs=40, seed=1)
    for split in ("train", "valid"):
        prepare([root / "raw" / f"{split}.jsonl"], root / split, seq_len=SEQ_LEN)


def config(data: Path, run_dir: Path, quick: bool, async_save: bool):
    d, layers, d_ff, sub_keys = (256, 4, 768, 64) if quick else (512, 8, 1536, 128)
    values = {
        "model.d_model": d, "model.n_layers": layers, "model.n_heads": 8, "model.n_kv_heads": 4,
        "model.d_ff": d_ff, "model.max_seq_len": SEQ_LEN, "memory.layers": f"[{layers // 2}]",
        "memory.n_sub_keys": sub_keys, "memory.topk": 8, "memory.value_dim": d,
        "data.train": data / "train", "data.valid": data / "valid", "data.questions": "",
        "data.seq_len": SEQ_LEN, "data.micro_batch_size": 2, "train.steps": 10**6,
        "train.eval_every": 0, "train.run_dir": run_dir, "checkpoint.keep_last": 2,
        "checkpoint.resume": "none", "checkpoint.async_save": str(async_save).lower(),
        "logging.jsonl": "false", "logging.tensorboard": "false", "logging.progress": "false",
    }
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(trainer: Trainer, saves: int) -> dict:
    batches = iter(trainer.loader)
    trainer.train_step(batches)  # optimizer state allocated

    def step() -> float:
        return timed(lambda: trainer.train_step(batches))  # the next save is another step

    with ForeignCpu() as foreign:
        result = {"step_alone": statistics.median(step() for _ in range(3)), "blocked": [],
                  "complete": [], "step_during": []}
        for _ in range(saves):
            start = time.perf_counter()
            result["blocked"].append(timed(trainer.save))
            trainer.checkpoints.wait()
            result["complete"].append(time.perf_counter() - start)
            step()
        for _ in range(saves if trainer.checkpoints.asynchronous else 0):
            trainer.save()
            result["step_during"].append(step())
            trainer.checkpoints.wait()
    result.update(foreign=foreign.share,
                  size=checkpoint_bytes(list_checkpoints(trainer.ckpt_root)[-1]))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~45 MiB checkpoint, 2 saves")
    parser.add_argument("--saves", type=int, default=0, help="saves per mode (default 3)")
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    silence_third_party_warnings()  # as the CLI does
    bench = BenchRun("checkpoint_save", args).start()
    saves = args.saves or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        make_corpus(root / "data")
        print(f"writing under {root} on {os.cpu_count()} CPUs; loadavg at start "
              f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        rows = {}
        for mode in ("sync", "async"):
            trainer = Trainer(config(root / "data", root / mode, args.quick, mode == "async"))
            trainer.checkpoints.log = lambda line: print("  " + line)
            rows[mode] = measure(trainer, saves)
    print(f"\ncheckpoint {rows['sync']['size'] / 2**20:.0f} MiB, {saves} saves per mode; "
          f"loadavg at end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"{'mode':6} {'blocked per save: median (all)':32} {'complete':>9} "
          f"{'step alone':>11} {'step during write':>18}  other processes' CPU share")
    for mode, r in rows.items():
        blocked = f"{statistics.median(r['blocked']):.3f} s (" + \
            ", ".join(f"{b:.3f}" for b in r["blocked"]) + ")"
        during = f"{statistics.median(r['step_during']):.3f} s" if r["step_during"] else "-"
        flag = "  (busy machine: indicative)" if r["foreign"] > 0.10 else ""
        print(f"{mode:6} {blocked:32} {statistics.median(r['complete']):7.3f} s "
              f"{r['step_alone']:9.3f} s {during:>18}  {r['foreign']:.0%}{flag}")
    ratio = statistics.median(rows["sync"]["blocked"]) / statistics.median(rows["async"]["blocked"])
    print(f"async blocks training {ratio:.1f}x less per save than sync")
    bench.results = rows
    bench.baseline = {"kind": "synchronous save (checkpoint.async_save=false), same model",
                      "blocked_s": statistics.median(rows["sync"]["blocked"]),
                      "step_alone_s": rows["sync"]["step_alone"]}
    bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
