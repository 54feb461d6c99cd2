"""``memtron`` command line: one sub-command per user job.

  memtron train   --config configs/tiny-cpu.yaml [dotted.key=value ...]
  memtron data synth   --out DIR           generate the long-tail facts corpus
  memtron data prepare IN... --out DIR     raw text -> packed webdataset token shards
  memtron config  --config FILE [overrides] print the resolved, validated config
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from memtron.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML recipe (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. model.n_layers=4 train.steps=100")


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    from memtron.parallel.launch import detect_env, fail_fast
    from memtron.train.trainer import train

    env = detect_env()
    with fail_fast(env):  # one failing rank ends the whole job instead of hanging it
        result = train(cfg)
    if env.rank == 0:
        _print_summary(result)
    return 128 + result.stopped_by if result.stopped_by else 0


def _print_summary(result) -> None:
    losses = result.losses
    out = sys.stdout
    if losses:
        steps = sorted(losses)
        marks = sorted({steps[int(i * (len(steps) - 1) / 5)] for i in range(6)})
        curve = "  ".join(f"{s}:{losses[s]:.3f}" for s in marks)
        print(f"loss curve (step:loss)  {curve}", file=out)
    if result.evals:
        last = result.evals[max(result.evals)]
        if "loss" in last:
            print(f"valid loss {last['loss']:.4f}  perplexity {last['perplexity']:.2f}", file=out)
        facts = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("fact_acc/")}
        if facts:
            chance = facts.pop("chance", None)
            row = "  ".join(f"{k} {v:.1%}" for k, v in facts.items())
            suffix = f"  (chance {chance:.1%})" if chance is not None else ""
            print(f"fact accuracy by bucket: {row}{suffix}", file=out)
    print(f"run dir {result.run_dir}  metrics {result.run_dir / 'metrics.jsonl'}  "
          f"tensorboard {result.run_dir / 'tensorboard'}", file=out)
    if result.checkpoint is not None:
        print(f"checkpoint {result.checkpoint} (step {result.step})", file=out)


def _cmd_synth(args: argparse.Namespace) -> int:
    from memtron.data.synthetic import generate_corpus

    summary = generate_corpus(args.out, n_entities=args.entities, zipf=args.zipf, seed=args.seed)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from memtron.data.prepare import prepare

    index = prepare(args.inputs, args.out, tokenizer=args.tokenizer, seq_len=args.seq_len,
                    samples_per_shard=args.samples_per_shard, text_key=args.text_key)
    print(f"wrote {index['n_samples']} samples ({index['n_tokens']} tokens) in "
          f"{len(index['shards'])} shard(s) to {Path(args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model")
    _add_config_args(p)
    p.add_argument("--resume", help="auto (latest checkpoint in run dir), none, or a path")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command",
                                                                    required=True)
    p = data.add_parser("synth", help="generate the long-tail facts corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--entities", type=int, default=1000)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = data.add_parser("prepare", help="tokenize and pack text into webdataset shards")
    p.add_argument("inputs", nargs="+", help=".txt, .jsonl or .parquet files")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--samples-per-shard", type=int, default=2048)
    p.add_argument("--text-key", default="text")
    p.set_defaults(func=_cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from memtron.data.loader import DataError
    from memtron.parallel.launch import LaunchError
    from memtron.train.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, LaunchError, FileNotFoundError) as e:
        print(f"memtron: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
