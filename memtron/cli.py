"""``memtron`` command line: one sub-command per user job.

  memtron train   --config configs/tiny-cpu.yaml [dotted.key=value ...]
  memtron data synth   --out DIR           generate the long-tail facts corpus
  memtron data prepare IN... --out DIR     raw text -> packed webdataset token shards
  memtron config  --config FILE [overrides] print the resolved, validated config
  memtron submit  CONFIG [overrides] --nodes N --gpus-per-node G   sbatch a training job
  memtron status  RUN_DIR                  job state, last step and loss, checkpoint
  memtron cancel  RUN_DIR                  scancel the run's job
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import yaml

from memtron.config import ConfigError, load_config

EXIT_DIVERGED = 3  # training stopped on train.max_bad_steps non-finite steps in a row

# (module, message) of third-party warnings that tell a memtron user nothing they could act on.
# Only these are silenced, and only from the CLI: memtron's own warnings always show.
THIRD_PARTY_NOISE = [
    ("megatron", "Transformer Engine and Apex are not installed"),  # torch fallbacks are used
    ("torch", "Mismatch dtype between input and weight"),  # layer_norm under bf16 autocast
    ("torch", "torch.distributed is disabled, unavailable or uninitialized"),  # one-process DCP
]


def silence_third_party_warnings() -> None:
    for module, message in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=f".*{message}", module=module)


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
        if result.diverged:
            print(f"memtron: error: {result.diverged}", file=sys.stderr)
    if result.diverged:
        return EXIT_DIVERGED
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
        print(f"checkpoint {result.checkpoint}", file=out)


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


def _cmd_submit(args: argparse.Namespace) -> int:
    from memtron import slurm

    spec = slurm.JobSpec(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, partition=args.partition or "",
        account=args.account or "", time=args.time or "", qos=args.qos or "",
        constraint=args.constraint or "", exclusive=args.exclusive,
        container_image=args.container_image or "", container_mounts=args.container_mounts or "",
        env=args.env, sbatch_options=args.sbatch, signal_seconds=args.signal_seconds,
        launcher=args.launcher, template=args.template or "", job_name=args.job_name or "",
        python=args.python or "")
    if args.dry_run:
        print(slurm.render(args.config, args.overrides, spec).script, end="")
        return 0
    job = slurm.submit(args.config, args.overrides, spec)
    print(f"submitted job {job.job_id}" + (f" to partition {job.partition}" if job.partition
                                           else ""))
    print(f"log {job.log}")
    print(f"script {job.script}  run dir {job.run_dir}")
    print(f"follow with: memtron status {job.run_dir}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from memtron import slurm

    state = slurm.status(args.run_dir)
    print(json.dumps(state, indent=1) if args.json else slurm.format_status(state))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from memtron import slurm

    print(slurm.cancel(args.run_dir))
    return 0


def _add_submit_parser(sub) -> None:
    p = sub.add_parser("submit", help="submit a training job to SLURM (sbatch)",
                       description="Render an sbatch script from a template in slurm/, write it "
                       "and the resolved config into the run dir and submit it. The job "
                       "checkpoints and requeues itself on SIGUSR1 and resumes when restarted.")
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument("--nodes", "-N", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="one task per GPU; 0 = CPU nodes (gloo)")
    p.add_argument("--tasks-per-node", type=int, default=0,
                   help="CPU nodes: tasks per node (default: from parallel.* in the config)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="also sets OMP_NUM_THREADS")
    p.add_argument("--partition", "-p")
    p.add_argument("--account", "-A")
    p.add_argument("--time", "-t", help="time limit, e.g. 24:00:00")
    p.add_argument("--qos")
    p.add_argument("--constraint", "-C")
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--container-image", help="run the tasks in this image (pyxis srun option)")
    p.add_argument("--container-mounts", help="pyxis mounts (default: the run dir)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="export in the job script (repeatable)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch=--mem=0 (repeatable)")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="send SIGUSR1 this long before the time limit: checkpoint + requeue")
    p.add_argument("--launcher", choices=["srun", "torchrun"], default="srun",
                   help="srun: one task per GPU (default); torchrun: one torchrun per node")
    p.add_argument("--template", help="custom sbatch template (default slurm/<launcher>.sbatch)")
    p.add_argument("--job-name", help="default: the run dir's name")
    p.add_argument("--python", help="interpreter on the nodes (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("status", help="state, last step, loss and checkpoint of a SLURM run")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("cancel", help="cancel the SLURM job of a run dir")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_cancel)


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

    _add_submit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    silence_third_party_warnings()
    args = build_parser().parse_args(argv)
    from memtron.data.loader import DataError
    from memtron.parallel.launch import LaunchError
    from memtron.slurm import SlurmError
    from memtron.train.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, LaunchError, SlurmError,
            FileNotFoundError) as e:
        print(f"memtron: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
