"""Hierarchical bank quality: three arms at equal anchor size, data and steps (issue 13).

* ``none``: the anchor alone (``configs/hier-tiny.yaml`` without its bank);
* ``generic``: the anchor plus an always-on generic block with as many neurons as a sequence
  fetches in the hierarchical arm (``bank.levels=0``, ``generic_size = sum(block_sizes)``);
* ``hier``: the anchor plus the blocks of the sequence's path down the cluster tree.

Every arm trains on the same clustered shards (the same batches in the same order; the first two
ignore ``bank_path``) from the same seed. Each arm is scored by ``memtron eval facts``' code:
fact questions are routed like generation routes a prompt (the question's prompt goes down the
tree and its path's blocks answer every choice). Reported: fact accuracy per frequency bucket
with 95 % Wilson intervals, and the valid loss (each valid sample with its own path).

    python bench/hier_quality.py --quick          # a smoke run: tiny corpus, 30 steps
    python bench/hier_quality.py --out hier.json  # the recipe's corpus and 1500 steps

Another corpus (``--entities --zipf --train-docs --questions-per-bucket``, as ``memtron data
synth``), anchor or bank (trailing ``key=value`` overrides, applied to every arm) and seed.
With ``--data DIR`` the clustered corpus is prepared there once and reused, so the arms can run
as parallel processes (``--arms hier --data DIR``), each writing its own ``--out``:

    python bench/hier_quality.py --data runs/hq --prepare-only --entities 500 --zipf 0.5 \
        --train-docs 20000 --questions-per-bucket 1000
    python bench/hier_quality.py --data runs/hq --arms hier --steps 5000 --threads 1 \
        --out hier.json model.d_model=64 model.n_layers=2 model.d_ff=192 bank.layers=[1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from memtron.config import load_config
from memtron.data.clustering import build_tree
from memtron.data.prepare import prepare
from memtron.data.synthetic import generate_corpus
from memtron.eval.facts import eval_facts
from memtron.infer.model import load_model
from memtron.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def prepare_data(root: Path, args: argparse.Namespace) -> None:
    """The synthetic corpus, its cluster tree and the clustered shards under ``root``."""
    levels, branching = args.levels, args.branching
    sizes = dict(n_entities=80, n_train_docs=600, n_valid_docs=60, questions_per_bucket=20) \
        if args.quick else {}
    corpus = {"n_entities": args.entities, "n_train_docs": args.train_docs, "zipf": args.zipf,
              "questions_per_bucket": args.questions_per_bucket}
    sizes.update({k: v for k, v in corpus.items() if v is not None})
    generate_corpus(root / "raw-root", seed=0, **sizes)
    raw = root / "raw-root" / "raw"
    docs = [json.loads(line)["text"] for line in (raw / "train.jsonl").read_text().splitlines()]
    build_tree(docs, levels, branching, seed=0).save(root / "tree")
    for split in ("train", "valid"):
        prepare([raw / f"{split}.jsonl"], root / split, seq_len=128, clusters=root / "tree")


def arm_overrides(arm: str, root: Path, steps: int, levels: int, branching: int,
                  blocks: list[int], extra: list[str], seed: int) -> list[str]:
    common = [*extra, f"train.seed={seed}", f"data.train={root / 'train'}",
              f"data.valid={root / 'valid'}",
              f"data.questions={root / 'raw-root' / 'questions.jsonl'}",
              f"train.steps={steps}", "train.eval_every=0",
              f"train.run_dir={root / f'{arm}-seed{seed}'}",
              "checkpoint.every=0", "logging.tensorboard=false", "logging.progress=false",
              f"train.log_every={max(1, steps // 10)}", f"optim.warmup_steps={min(50, steps // 5)}",
              f"bank.levels={levels}", f"bank.branching={branching}",
              f"bank.block_sizes={blocks}"]
    if arm == "none":
        return [*common, "bank.layers=[]"]
    if arm == "generic":
        return [*common, "bank.levels=0", "bank.block_sizes=[]",
                f"bank.generic_size={sum(blocks)}"]
    return common


def run_arm(arm: str, root: Path, args: argparse.Namespace, blocks: list[int]) -> dict:
    cfg = load_config(REPO / "configs" / "hier-tiny.yaml",
                      arm_overrides(arm, root, args.steps, args.levels, args.branching, blocks,
                                    args.overrides, args.seed))
    start = time.perf_counter()
    result = Trainer(cfg).run()
    seconds = time.perf_counter() - start
    # The shared eval path: each question routed through the tree the data was prepared with,
    # each valid sample with its own path.
    report = eval_facts(result.checkpoint, valid_batches=args.valid_batches)
    loaded = load_model(result.checkpoint)
    dense = sum(p.numel() for n, p in loaded.model.named_parameters()
                if not n.startswith(("value_tables", "bank")))
    return {"arm": arm, "seed": args.seed, "train_s": seconds,
            "final_loss": result.losses[max(result.losses)],
            "valid_loss": report["valid"]["loss"], "routed": report["routed"],
            "anchor_params": dense, "chance": report["chance"], "facts": report["buckets"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=0, help="default 1500 (30 with --quick)")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--branching", type=int, default=4)
    parser.add_argument("--blocks", default="16,32,64", help="neurons per block, per level")
    parser.add_argument("--arms", default="none,generic,hier")
    parser.add_argument("--valid-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: the CPUs, at most 4)")
    parser.add_argument("--out", help="write the results as JSON")
    parser.add_argument("--seed", type=int, default=1234, help="training seed (train.seed)")
    parser.add_argument("--data", help="prepare the corpus here once and reuse it (default: a "
                        "temporary directory)")
    parser.add_argument("--prepare-only", action="store_true", help="prepare --data and stop")
    parser.add_argument("--entities", type=int, help="corpus entities (the generator's default)")
    parser.add_argument("--zipf", type=float, help="entity frequency exponent")
    parser.add_argument("--train-docs", type=int, help="training documents")
    parser.add_argument("--questions-per-bucket", type=int, help="fact questions per bucket")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every arm, e.g. model.d_model=64")
    args = parser.parse_args()
    args.steps = args.steps or (30 if args.quick else 1500)
    blocks = [int(b) for b in args.blocks.split(",")]
    args.threads = args.threads or max(1, min(4, os.cpu_count() or 1))
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        root = Path(args.data or stack.enter_context(tempfile.TemporaryDirectory()))
        if not (root / "valid" / "index.json").is_file():
            prepare_data(root, args)
        if args.prepare_only:
            return
        results = [run_arm(arm, root, args, blocks) for arm in args.arms.split(",")]
    print(f"\n{args.steps} steps, tree {args.levels} x {args.branching}, blocks {blocks}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    buckets = list(results[0]["facts"])
    print(f"{'arm':<8} {'anchor':>8} {'valid loss':>10}  " + "  ".join(
        f"{b:>20}" for b in buckets))
    for r in results:
        cells = []
        for b in buckets:
            s = r["facts"][b]
            cells.append(f"{s['accuracy']:6.1%} [{s['low']:.2f},{s['high']:.2f}]")
        loss = r["valid_loss"]
        print(f"{r['arm']:<8} {r['anchor_params']:>8,} {loss:>10.4f}  "
              + "  ".join(f"{c:>20}" for c in cells)
              + ("" if math.isfinite(loss) else "  (non-finite)"))
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"args": vars(args), "cpus": os.cpu_count(), "load_before": load_before,
             "load_after": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
