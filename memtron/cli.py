"""``memtron`` command line: one sub-command per user job (the README has the full table).

Every command reads a checkpoint (or run dir) with ``--ckpt`` and writes with ``--out``; memory
rows come from ``--rows SOURCE`` (``ram``, a bank or store directory, ``http://HOST:PORT``);
``--dtype`` is the model's floating-point dtype. Old spellings (positional paths, ``--values``,
``--bank``, ``--explicit``, build-explicit's ``--dtype``, export hf's ``--values``) still work
for one release and print on stderr what to use instead.

  memtron train   --config configs/tiny-cpu.yaml [--out RUN_DIR] [dotted.key=value ...]
  memtron config  --config FILE [overrides] print the resolved, validated config
  memtron data synth|prepare|tokenizer|cluster ... --out DIR      corpora, shards, trees
  memtron data retrieve --shards DIR --store STORE   memory ids of every 64-token chunk
  memtron eval facts|lm --ckpt CKPT        fact accuracy per bucket / loss and perplexity
  memtron compare --config FILE --arms dense,memory --seeds 0,1 --out DIR   equal compute
  memtron bench report [--quick] [--out DIR]   run bench/ and write REPORT.md with plots
  memtron submit  --config FILE [overrides] --nodes N --gpus-per-node G [--out RUN_DIR]
  memtron status|cancel --ckpt RUN_DIR     a SLURM run's state / scancel its job
  memtron generate --ckpt CKPT --prompt TEXT [--rows SOURCE ...]   KV-cache generation
  memtron fetch   --rows BANK|URL --text TEXT   tree-memory blocks of a text's path
  memtron export bank --ckpt CKPT --out BANK      value tables -> on-disk row-block bank
  memtron export hf   --ckpt CKPT --out HF_DIR    Hugging Face model directory
  memtron import hf   --ckpt HF_DIR --out CKPT    Hugging Face (memtron or Llama) -> checkpoint
  memtron serve-memory --rows BANK|STORE          HTTP row-fetch server
  memtron memory build-explicit --ckpt CKPT --references FILE --out STORE   explicit memories
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def _warn_deprecated(old: str, new: str) -> None:
    print(f"memtron: warning: {old} is deprecated; use {new}", file=sys.stderr)


class _Deprecated(argparse.Action):
    """An old flag kept for one release: it warns on stderr what to use instead and stores its
    value where the new spelling does (``convert`` maps an old value to the new syntax;
    ``append`` when the new flag is repeatable)."""

    def __init__(self, option_strings: list[str], dest: str, instead: str,
                 convert=lambda value: value, append: bool = False, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.instead, self.convert, self.append = instead, convert, append

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _warn_deprecated(option_string, self.instead)
        value = self.convert(values)
        if self.append:
            value = [*(getattr(namespace, self.dest) or []), value]
        setattr(namespace, self.dest, value)


def _old_positionals(p: argparse.ArgumentParser, *flags: str, required: bool = True,
                     words: str | None = None) -> None:
    """Accept a command's old positional spelling for one release: leading positional words
    (``words``, the command's ``key=value`` overrides list if it has one) fill ``flags`` in
    order, with a warning; ``required`` flags must then be given one way or the other."""
    if words is None:
        words = "old_positionals"
        p.add_argument(words, nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(_positionals=(p, words, flags, required))


def resolve_old_positionals(args: argparse.Namespace) -> None:
    if not hasattr(args, "_positionals"):
        return
    parser, words, flags, required = args._positionals
    given = list(getattr(args, words))
    for flag in flags:
        dest = flag.lstrip("-").replace("-", "_")
        if not given or "=" in given[0]:
            break
        word = given.pop(0)
        _warn_deprecated(f"the positional {dest.upper()}", f"{flag} {word}")
        if getattr(args, dest) is not None:
            parser.error(f"{flag} given twice (as {flag} and as a positional)")
        setattr(args, dest, word)
    if words == "old_positionals" and given:
        parser.error(f"unrecognized arguments: {' '.join(given)}")
    setattr(args, words, given)
    missing = [f for f in flags if getattr(args, f.lstrip("-").replace("-", "_")) is None]
    if required and missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")


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
    if args.out is not None:
        overrides.append(f"train.run_dir={args.out}")
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

    given = {"n_entities": args.entities, "n_train_docs": args.train_docs,
             "n_valid_docs": args.valid_docs, "zipf": args.zipf, "seed": args.seed,
             "questions_per_bucket": args.questions_per_bucket}
    # Unset options keep generate_corpus's defaults: the demo corpus is defined in one place.
    summary = generate_corpus(args.out, **{k: v for k, v in given.items() if v is not None})
    print(json.dumps(summary, indent=1))
    return 0


def _device(name: str) -> str:
    """``--device`` through the one device policy (a missing accelerator fails naming the
    flag); a type without an index stays a type, so build-explicit can spread its workers over
    every device of it."""
    from memtron.device import resolve_device

    device = resolve_device(name, "--device")
    return str(device) if ":" in name else device.type


def format_facts(report: dict) -> str:
    """The human-readable lines of an ``eval facts`` report."""
    lines = [f"{'bucket':<8} {'acc':>7} {'95% CI':>17} {'n':>6}"]
    for name, b in report["buckets"].items():
        lines.append(f"{name:<8} {b['accuracy']:>7.1%} [{b['low']:>6.1%}, {b['high']:>6.1%}] "
                     f"{b['n']:>6}")
    lines.append(f"chance {report['chance']:.1%}; checkpoint {report['checkpoint']} (step "
                 f"{report['step']}); {report['params']:,} params ({report['table_params']:,} "
                 f"in value tables)")
    if "valid" in report:
        v = report["valid"]
        lines.append(f"valid loss {v['loss']:.4f}  perplexity {v['perplexity']:.3f} "
                     f"({v['tokens']:,} tokens)")
    return "\n".join(lines)


def _cmd_eval_facts(args: argparse.Namespace) -> int:
    from memtron.eval.facts import eval_facts
    from memtron.eval.reference import format_beside, load_reference

    reference = None
    if args.reference:  # read before the (slow) eval, so a wrong path fails at once
        try:
            reference = load_reference(args.reference)
        except ValueError as e:
            raise ConfigError(f"--reference: {e}") from e
    report = eval_facts(args.ckpt, args.questions, args.batch_size, args.valid_batches,
                        _device(args.device), args.tree)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(format_facts(report))
    if reference is not None:
        print(f"--- beside the committed reference ({args.reference}):")
        print(format_beside(report, reference))
    return 0


def _cmd_eval_lm(args: argparse.Namespace) -> int:
    from memtron.eval.lm import eval_lm

    report = eval_lm(args.ckpt, args.data, args.batch_size, args.max_batches,
                     _device(args.device))
    print(json.dumps(report, indent=1) if args.json else
          f"loss {report['loss']:.4f}  perplexity {report['perplexity']:.3f} over "
          f"{report['tokens']:,} tokens of {report['data']} (checkpoint {report['checkpoint']}, "
          f"step {report['step']})")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from memtron.eval.compare import CompareError, compare, markdown_table, parse_list

    try:
        summary = compare(args.config, parse_list(args.arms, "--arms"),
                          parse_list(args.seeds, "--seeds", int), args.out, args.overrides,
                          args.steps, args.questions,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    except CompareError as e:
        print(f"memtron: error: {e}", file=sys.stderr)
        return e.exit_code
    print(markdown_table(summary), end="")
    print(f"wrote {Path(args.out) / 'compare.md'}, compare.json and compare.png")
    return 0


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from memtron.bench.report import ReportError, report

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    start = time.perf_counter()
    try:
        path, outcomes = report(Path(args.out), args.quick, only, args.bench_dir, args.quality,
                                args.quality_steps, args.timeout,
                                log=lambda line: print(line, file=sys.stderr, flush=True))
    except ReportError as e:
        print(f"memtron: error: {e}", file=sys.stderr)
        return 2
    failed = [o.name for o in outcomes if o.status == "failed"]
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _add_bench_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command",
                                                                      required=True)
    p = bench.add_parser("report", help="run the bench/ scripts and write REPORT.md with plots",
                         description="Run the benchmarks of the source tree's bench/ directory "
                         "(each writes JSON with its machine, CPU load and same-run baseline), "
                         "and write DIR/REPORT.md with PNG plots (needs matplotlib: the "
                         "'report' extra). Exit code 1 if a benchmark failed (the report is "
                         "still written).")
    p.add_argument("--quick", action="store_true",
                   help="each benchmark's --quick mode, and a small quality comparison")
    p.add_argument("--out", default="runs/bench-report", help="output directory")
    p.add_argument("--only", help="comma-separated names: pkm_layer, memory_parallel, "
                   "context_parallel, parallel_overhead, memory_fetch, checkpoint_save, "
                   "generation, gpu_kernels, quality")
    p.add_argument("--bench-dir", type=Path, help="the bench/ directory (default: next to the "
                   "memtron package, or ./bench)")
    p.add_argument("--quality", type=Path, help="output directory of `memtron compare` to "
                   "report (default with --quick: run a small one)")
    p.add_argument("--quality-steps", type=int, default=200,
                   help="training steps per run of the --quick comparison (200)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark (900)")
    p.set_defaults(func=_cmd_bench_report)


def _add_eval_parsers(sub) -> None:
    p = sub.add_parser("compare", help="equal-compute quality comparison of arms x seeds",
                       description="Train each arm (dense, dense2x, memory, memory-beside) for "
                       "each seed at equal steps and tokens, evaluate fact accuracy per bucket "
                       "and held-out loss, and write compare.md, compare.json and compare.png.")
    _add_config_args(p)
    p.add_argument("--arms", default="dense,dense2x,memory", help="comma-separated arm names")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, help="training steps per run (default: the config's)")
    p.add_argument("--questions", help="questions.jsonl (default: the config's data.questions)")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.set_defaults(func=_cmd_compare)

    ev = sub.add_parser("eval", help="evaluate a checkpoint (any layout)").add_subparsers(
        dest="eval_command", required=True)
    p = ev.add_parser("facts", help="fact accuracy per frequency bucket with 95%% intervals",
                      description="Multiple-choice fact accuracy per bucket with Wilson 95%% "
                      "intervals, plus loss and perplexity on the config's valid shards.")
    p.add_argument("--ckpt", required=True, help="run dir (latest checkpoint) or checkpoint dir")
    p.add_argument("--questions", help="questions.jsonl (default: the config's data.questions)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward")
    p.add_argument("--valid-batches", type=int, help="cap on valid batches (default: all)")
    p.add_argument("--tree", help="cluster tree routing a bank model's questions (default: the "
                   "copy kept with the training data)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:N")
    p.add_argument("--reference", help="a compare reference.json (e.g. docs/quality-reference"
                   ".json): print its arms' numbers beside this checkpoint's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval_facts)

    p = ev.add_parser("lm", help="loss and perplexity on prepared shards")
    p.add_argument("--ckpt", required=True, help="run dir (latest checkpoint) or checkpoint dir")
    p.add_argument("--data", required=True, help="directory of prepared shards (index.json)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batches", type=int, help="default: the whole pass")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval_lm)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from memtron.data.prepare import prepare

    index = prepare(args.inputs, args.out, tokenizer=args.tokenizer, seq_len=args.seq_len,
                    samples_per_shard=args.samples_per_shard, text_key=args.text_key,
                    clusters=args.clusters)
    print(f"wrote {index['n_samples']} samples ({index['n_tokens']} tokens) in "
          f"{len(index['shards'])} shard(s) to {Path(args.out)}")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    import itertools

    from memtron.data.prepare import iter_documents
    from memtron.data.tokenizer import train_bpe

    texts = itertools.chain.from_iterable(iter_documents(f, args.text_key) for f in args.inputs)
    try:
        tokenizer = train_bpe(texts, args.vocab_size, args.out)
    except ValueError as e:
        raise ConfigError(f"--vocab-size: {e}") from e
    print(f"wrote {tokenizer.spec} ({tokenizer.vocab_size} tokens, eos {tokenizer.eos_id}); "
          f"train with model.vocab_size={tokenizer.vocab_size} data.tokenizer={tokenizer.spec}")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    import itertools

    from memtron.data.clustering import build_tree, corpus_balance
    from memtron.data.embed import make_embedder
    from memtron.data.prepare import iter_documents

    def documents() -> itertools.chain[str]:
        return itertools.chain.from_iterable(iter_documents(f, args.text_key)
                                             for f in args.inputs)

    tree = build_tree(documents(), args.levels, args.branching,
                      make_embedder(args.embedder, args.dim), args.seed, args.sample_size,
                      args.tolerance)
    tree.info["corpus_balance"] = corpus_balance(tree, documents())
    tree.save(args.out)
    print(f"tree {args.levels} levels x {args.branching} branches ({tree.n_nodes} nodes) fitted "
          f"on {tree.info['sample_size']} of {tree.info['documents_seen']} documents; "
          f"wrote {args.out}")
    for title, rows in (("fitting sample (balanced unless identical documents)", "balance"),
                        ("whole corpus (routed)", "corpus_balance")):
        print(f"{title}:\n  level    nodes  docs/node: min     mean      max  worst sibling "
              f"deviation  within {args.tolerance:.0%} (+1 doc)")
        for level, b in enumerate(tree.info[rows], 1):
            print(f"  {level:5d} {b['nodes']:8d} {b['min']:15d} {b['mean']:8.1f} {b['max']:8d} "
                  f"{b['max_sibling_deviation']:24.1%}  "
                  f"{'yes' if b['within_tolerance'] else 'no'}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from memtron.infer.bank import TreeBank

    if args.rows in (None, "ram"):
        raise ConfigError("--rows: fetch needs a bank directory or a serve-memory URL")
    bank = TreeBank.open(args.rows, tree=args.tree, token=args.token)
    fetched = bank.fetch(args.text)
    if args.json:
        print(json.dumps([{"text": f.text, "path": f.path, "tables": f.tables, "rows": f.rows,
                           "bytes": f.nbytes} for f in fetched], indent=1))
        return 0
    for f in fetched:
        print(f"text {f.text[:60]!r}{'...' if len(f.text) > 60 else ''}")
        print(f"  path (node ids, root to leaf): {' -> '.join(map(str, f.path))}")
        for level, (node, table, row, block, nbytes) in enumerate(
                zip(f.path, f.tables, f.rows, f.blocks, f.nbytes, strict=True), 1):
            print(f"  level {level}  node {node:<8d} {table} row {row:<8d} "
                  f"{block.numel()} x {str(block.dtype).removeprefix('torch.')}  {nbytes} bytes")
        print(f"  fetched {sum(f.nbytes)} bytes in {len(f.blocks)} blocks from {args.rows}")
    return 0


def _add_fetch_parser(sub) -> None:
    p = sub.add_parser("fetch", help="route text through the cluster tree and fetch its "
                       "hierarchical-bank blocks")
    p.add_argument("--rows", metavar="SOURCE", help="bank dir (memtron export bank) or memtron "
                   "serve-memory URL (required)")
    p.add_argument("--bank", action=_Deprecated, dest="rows", instead="--rows PATH|URL",
                   help=argparse.SUPPRESS)
    p.add_argument("--text", action="append", required=True, help="text to route (repeatable)")
    p.add_argument("--tree", help="cluster tree dir (default: the one the bank names)")
    p.add_argument("--token", help="bearer token of the memory server")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_fetch)


def _cmd_submit(args: argparse.Namespace) -> int:
    from memtron import slurm

    overrides = args.overrides + ([f"train.run_dir={args.out}"] if args.out else [])
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
        print(slurm.render(args.config, overrides, spec).script, end="")
        return 0
    job = slurm.submit(args.config, overrides, spec)
    print(f"submitted job {job.job_id}" + (f" to partition {job.partition}" if job.partition
                                           else ""))
    print(f"log {job.log}")
    print(f"script {job.script}  run dir {job.run_dir}")
    print(f"follow with: memtron status --ckpt {job.run_dir}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from memtron import slurm

    state = slurm.status(args.ckpt)
    print(json.dumps(state, indent=1) if args.json else slurm.format_status(state))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from memtron import slurm

    print(slurm.cancel(args.ckpt))
    return 0


def _read_prompts(args: argparse.Namespace) -> list[dict]:
    from memtron.infer.generate import GenerationError

    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    from memtron.data.jsonl import jsonl_rows

    rows = []
    try:
        for n, row in jsonl_rows(args.prompts):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise GenerationError(f"{args.prompts}:{n}: needs a string field 'prompt'")
            rows.append(row)
            if args.limit and len(rows) == args.limit:
                break
    except GenerationError:
        raise
    except ValueError as e:  # invalid JSON, named by file and line
        raise GenerationError(str(e)) from e
    if not rows:
        raise GenerationError(f"{args.prompts}: no prompts")
    return rows


class _Streamer:
    """Prints one sequence's text as tokens arrive, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.tokens, self.shown = tokenizer, [], 0

    def __call__(self, new) -> None:
        token = int(new[0])
        if token < 0:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        stable = len(text.rstrip("\ufffd"))
        if stable > self.shown:
            sys.stdout.write(text[self.shown:stable])
            sys.stdout.flush()
            self.shown = stable


ROWS_HELP = ("where memory rows come from, for every memory kind: ram (the checkpoint's, the "
             "default), a directory (a bank from `export bank`, or an explicit-memory store "
             "from `memory build-explicit`; memory-mapped) or http://HOST:PORT (`serve-memory` "
             "over either). Repeat to give a bank and a store.")


def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def row_sources(specs: list[str], token: str | None = None) -> tuple[str, str | None]:
    """``--rows`` split by what each source holds: where the checkpoint's tables (value tables
    and tree blocks) come from (``ram``, a bank directory or URL), and the explicit-memory
    store, if one is given (a source whose tables are a store's)."""
    from memtron.infer.model import open_bank_source
    from memtron.storage.explicit import MEMORIES
    from memtron.storage.rowblock import BankError
    from memtron.storage.store import RemoteStoreError

    tables, stores = ["ram"] if "ram" in specs else [], []
    for spec in dict.fromkeys(specs):
        if spec == "ram":
            continue
        try:
            holds = open_bank_source(spec, token).tables
        except (OSError, BankError, RemoteStoreError) as e:
            raise ConfigError(f"--rows {spec}: {e}") from e
        (stores if MEMORIES in holds else tables).append(spec)
    if len(stores) > 1 or len(tables) > 1:
        raise ConfigError(f"--rows: one source of the model's tables and at most one "
                          f"explicit-memory store, got tables from {tables} and stores {stores}")
    return (tables or ["ram"])[0], (stores or [None])[0]


def _cmd_generate(args: argparse.Namespace) -> int:
    import os

    from memtron.data.tokenizer import load_tokenizer
    from memtron.infer.generate import SamplingConfig, generate
    from memtron.infer.model import load_model

    rows = _read_prompts(args)
    device = _device(args.device)
    token = args.token or os.environ.get("MEMTRON_MEMORY_TOKEN")
    tables, store = row_sources(args.rows or ["ram"], token)
    bank = None if tables == "ram" else tables
    values = tables if tables == "ram" or _is_url(tables) else f"mmap:{tables}"
    loaded = load_model(args.ckpt, values=values, cache_rows=args.cache_rows,
                        device=device, token=token, bank=bank, tree=args.tree)
    tokenizer = load_tokenizer(loaded.config.data.tokenizer)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed)
    # Every prompt starts after a document boundary, as every training document did.
    prompts = [[tokenizer.eos_id, *tokenizer.encode(r["prompt"])] for r in rows]
    stream = args.prompt is not None and not args.json
    if stream:
        sys.stdout.write(rows[0]["prompt"])
        sys.stdout.flush()
    bank_path = loaded.bank_paths([r["prompt"] for r in rows])  # each prompt down the tree
    explicit = None
    if store is not None:
        from memtron.infer.explicit import open_explicit

        explicit = open_explicit(store, loaded.config, tokenizer, args.retriever,
                                 args.explicit_cache, token)
    result = generate(loaded.model, prompts, sampling, tokenizer.eos_id, dtype=args.dtype,
                      on_tokens=_Streamer(tokenizer) if stream else None, bank_path=bank_path,
                      explicit=explicit)
    for row, tokens, cut in zip(rows, result.tokens, result.truncated):
        completion = tokenizer.decode(tokens)
        if stream:
            print()
        elif args.json:
            print(json.dumps({**row, "completion": completion, "n_tokens": len(tokens),
                              "stopped_by_context": cut}))
        else:
            expected = f"   (expected: {row['answer']!r})" if "answer" in row else ""
            print(f"{row['prompt']}\u2192{completion!r}{expected}")
    prefill_rate = result.prompt_tokens / max(result.prefill_s, 1e-9)
    print(f"generated {result.new_tokens} tokens for {len(prompts)} prompt(s): prefill "
          f"{result.prompt_tokens} tokens at {prefill_rate:,.0f} tok/s, decode "
          f"{result.decode_tokens_per_s:,.1f} tok/s on {device} ({args.dtype}); checkpoint "
          f"{loaded.checkpoint} (step {loaded.step})", file=sys.stderr)
    if any(result.truncated):
        print("memtron: warning: generation stopped at the model's context length "
              f"({loaded.config.model.max_seq_len} tokens) for {sum(result.truncated)} "
              "prompt(s)", file=sys.stderr)
    stats = loaded.fetch_stats()
    if bank_path is not None:
        print(f"bank path(s): {bank_path.tolist()}", file=sys.stderr)
    if stats:
        print(f"memory fetch (rows {tables}): "
              f"{stats['lookups']:,.0f} lookups, "
              f"{stats['rows_requested']:,.0f} rows requested, {stats['rows_fetched']:,.0f} "
              f"fetched ({stats['bytes_fetched'] / 2**20:,.1f} MiB), cache hit rate "
              f"{stats['cache_hit_rate']:.1%}", file=sys.stderr)
    if explicit is not None:
        x = explicit.memories.stats()
        print(f"explicit memories ({store}): {result.retrievals} retrievals of "
              f"{explicit.r}, {x['memories_fetched']:,} memories fetched "
              f"({x['bytes_fetched'] / 2**20:,.2f} MiB), cache hit rate "
              f"{x['cache_hit_rate']:.1%}", file=sys.stderr)
    return 0


def _cmd_export_bank(args: argparse.Namespace) -> int:
    import time

    from memtron.export.bank import export_bank

    start = time.perf_counter()
    manifest = export_bank(args.ckpt, args.out, block_bytes=int(args.block_mib * 2**20),
                           overwrite=args.overwrite, tree=args.tree)
    seconds = time.perf_counter() - start
    total = 0
    for name, table in manifest["tables"].items():
        size = sum(b["bytes"] for b in table["blocks"])
        total += size
        print(f"{name}: {table['n_rows']:,} x {table['dim']} {table['dtype']} in "
              f"{len(table['blocks'])} block(s), {size / 2**20:,.1f} MiB")
    print(f"wrote bank {args.out} from {manifest['source']['checkpoint']} (step "
          f"{manifest['source']['step']}): {total / 1e9:.3f} GB in {seconds:.1f} s "
          f"({total / max(seconds, 1e-9) / 1e9:.2f} GB/s)")
    return 0


def _cmd_serve_memory(args: argparse.Namespace) -> int:
    import os

    from memtron.infer.server import DEFAULT_PORT, serve

    token = args.token or os.environ.get("MEMTRON_MEMORY_TOKEN")
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"memtron: warning: serving on {args.host} without --token: anyone who reaches "
              "this address can read the bank", file=sys.stderr)
    limits = {k: v for k, v in (("port", args.port), ("max_ids", args.max_ids)) if v}
    print(f"serving {args.rows} on http://{args.host}:{args.port or DEFAULT_PORT} "
          f"({args.workers} worker(s), {'token required' if token else 'no token'}); "
          "Ctrl-C stops", file=sys.stderr)
    serve(args.rows, host=args.host, workers=args.workers, token=token, **limits)
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from memtron.export.hf import export_hf

    s = export_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                  values=args.tables, overwrite=args.overwrite)
    print(f"wrote a {s['model_type']} model to {s['out']}: {s['files']} safetensors shard(s), "
          f"{s['bytes'] / 1e9:.3f} GB in {s['seconds']:.1f} s "
          f"({s['bytes'] / max(s['seconds'], 1e-9) / 1e9:.2f} GB/s)")
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from memtron.export.hf import import_hf

    path = import_hf(args.ckpt, args.out, overrides=args.overrides,
                     optimizer_from=args.optimizer_from, overwrite=args.overwrite)
    print(f"wrote checkpoint {path}; continue with: memtron train ... --resume {path}")
    return 0


def _add_export_parsers(sub) -> None:
    export = sub.add_parser("export", help="export a checkpoint").add_subparsers(
        dest="export_command", required=True)
    p = export.add_parser("bank", help="value tables -> on-disk row-block bank",
                          description="Stream every value table of a checkpoint (any layout) "
                          "into row-block safetensors files with a checksummed manifest, for "
                          "`generate --rows OUT` and `serve-memory --rows OUT`.")
    p.add_argument("--ckpt", help="run dir (latest checkpoint) or checkpoint dir")
    p.add_argument("--out", help="bank directory to write")
    _old_positionals(p, "--ckpt", "--out")
    p.add_argument("--block-mib", type=float, default=256, help="block file size (MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bank")
    p.add_argument("--tree", help="cluster tree of a hierarchical bank, recorded in the manifest "
                   "(default: the copy kept with the training data, data.train/tree)")
    p.set_defaults(func=_cmd_export_bank)

    p = export.add_parser("hf", help="checkpoint -> Hugging Face model directory",
                          description="Llama (dense) or model_type memtron with remote code "
                          "(memory layers); streams shards, never holds a whole table.")
    p.add_argument("--ckpt", help="run dir (latest checkpoint) or checkpoint dir")
    p.add_argument("--out", help="Hugging Face model directory to write")
    _old_positionals(p, "--ckpt", "--out")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="the model's floating-point dtype (here: of the written weights)")
    p.add_argument("--max-shard-size", default="2GB", help="e.g. 2GB, 500MB, 1GiB")
    p.add_argument("--tables", choices=["weights", "bank"], default="weights",
                   help="value tables as row-block weights, or a bank in OUT/values that the "
                   "model memory-maps (config memory_bank)")
    p.add_argument("--values", action=_Deprecated, dest="tables", choices=["weights", "bank"],
                   instead="--tables weights|bank", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=_cmd_export_hf)

    imp = sub.add_parser("import", help="bring models into memtron").add_subparsers(
        dest="import_command", required=True)
    p = imp.add_parser("hf", help="Hugging Face directory (memtron export or Llama) -> checkpoint")
    p.add_argument("--ckpt", metavar="HF_DIR", help="Hugging Face model directory to read")
    p.add_argument("--out", help="checkpoint directory to write (for train --resume)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (data, optim, train...; not the architecture)")
    _old_positionals(p, "--ckpt", "--out", words="overrides")
    p.add_argument("--optimizer-from", help="memtron checkpoint whose optimizer moments, step "
                   "and data position to carry over (e.g. the one that was exported)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_import_hf)

    p = sub.add_parser("serve-memory", help="HTTP row-fetch server over an exported bank",
                       description="Serve a bank's rows to `generate --rows http://...` "
                       "(FastAPI + uvicorn; binary bodies; bad requests get a 4xx).")
    p.add_argument("--rows", metavar="PATH", help="bank directory (memtron export bank) or "
                   "explicit-memory store (memtron memory build-explicit)")
    _old_positionals(p, "--rows")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="default 8421")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' "
                   "(default: $MEMTRON_MEMORY_TOKEN)")
    p.add_argument("--max-ids", type=int,
                   help="largest number of ids one request may ask for (default 262144)")
    p.set_defaults(func=_cmd_serve_memory)


def _cmd_build_explicit(args: argparse.Namespace) -> int:
    from memtron.export.explicit import build_explicit_store, store_bytes

    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        manifest = build_explicit_store(
            args.ckpt, args.references, args.out, m=args.m, ref_len=args.ref_len,
            layers=layers, dtype=args.codec, batch_size=args.batch_size, workers=args.workers,
            device=_device(args.device), pq_sub_dim=args.pq_sub_dim, pq_train=args.pq_train,
            embedder=args.embedder, embed_dim=args.embed_dim, text_key=args.text_key,
            overwrite=args.overwrite, progress=not args.quiet)
    except ValueError as e:  # bad arguments or reference file; the message names them
        print(f"memtron: error: {e}", file=sys.stderr)
        return 2
    meta = manifest["source"]["explicit"]
    sizes = store_bytes(manifest)
    n = meta["n_memories"]
    print(f"wrote {args.out}: {n:,} memories ({meta['dtype']}, layers {meta['layers']}, "
          f"{meta['n_kv_heads']} kv heads x top-{meta['m']} of <= {meta['ref_len']} tokens); "
          f"memories {sizes['memories'] / 2**20:,.2f} MiB = {sizes['memories'] / n:,.0f} "
          f"bytes per memory")
    return 0


def _cmd_data_retrieve(args: argparse.Namespace) -> int:
    from memtron.data.retrieve import retrieve_shards

    summary = retrieve_shards(args.shards, args.store, r=args.r, chunk=args.chunk,
                              batch_size=args.batch_size,
                              use_faiss={"auto": None, "faiss": True, "numpy": False}[args.index],
                              progress=not args.quiet)
    print(json.dumps(summary, indent=1))
    return 0


def _add_explicit_parsers(sub, data) -> None:
    memory = sub.add_parser("memory", help="build memory stores").add_subparsers(
        dest="memory_command", required=True)
    p = memory.add_parser("build-explicit", help="references -> explicit-memory store",
                          description="Encode reference chunks (<= --ref-len tokens) with the "
                          "checkpoint's model, keep the top-m tokens per (memory layer, KV "
                          "head) by attention received, and write their post-RoPE K and V as "
                          "a checksummed row-block store (mmap or `serve-memory`) with a "
                          "retrieval index.")
    p.add_argument("--ckpt", required=True, help="run dir (latest checkpoint) or checkpoint dir")
    p.add_argument("--references", required=True, help=".jsonl (text, optional id), .txt "
                   "(blank-line separated documents) or .parquet")
    p.add_argument("--out", required=True, help="store directory to write")
    p.add_argument("--m", type=int, default=8, help="tokens kept per layer and KV head")
    p.add_argument("--ref-len", type=int, default=128, help="tokens per reference chunk")
    p.add_argument("--layers", help="memory layers, e.g. 0,1,2 (default: the first half)")
    p.add_argument("--codec", choices=["bf16", "int8", "pq"], default="bf16",
                   help="how K/V are stored: bf16, int8 per vector, or product quantisation")
    p.add_argument("--dtype", action=_Deprecated, dest="codec", choices=["bf16", "int8", "pq"],
                   instead="--codec bf16|int8|pq", help=argparse.SUPPRESS)
    p.add_argument("--pq-sub-dim", type=int, default=4, help="pq: dims per sub-vector code")
    p.add_argument("--pq-train", type=int, default=1024,
                   help="pq: references whose encodings fit the codebooks")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1,
                   help="processes, each encoding a slice of the references")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--embedder", default="hashed",
                   help="retrieval embedder: hashed, or a local sentence-model directory")
    p.add_argument("--embed-dim", type=int, default=256, help="hashed embedder width")
    p.add_argument("--text-key", default="text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_cmd_build_explicit)

    p = data.add_parser("retrieve", help="precompute explicit-memory ids of training shards",
                        description="For every --chunk-token chunk of every sample, the top-r "
                        "memory ids of STORE's retriever, stored with the samples as field "
                        "memory_ids int64 [seq_len / chunk, r].")
    p.add_argument("--shards", required=True, help="prepared shard directory (index.json)")
    p.add_argument("--store", required=True, help="explicit-memory store directory")
    p.add_argument("--r", type=int, default=5, help="memories per chunk")
    p.add_argument("--chunk", type=int, default=64, help="tokens per chunk")
    p.add_argument("--batch-size", type=int, default=1024, help="chunks embedded at a time")
    p.add_argument("--index", choices=["auto", "faiss", "numpy"], default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_cmd_data_retrieve)


def _add_infer_parsers(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (KV cache)",
                       description="Load a checkpoint saved at any layout into this process "
                       "and continue prompts. Memory rows (--rows) come from RAM, a memory-"
                       "mapped bank or store, or a `memtron serve-memory` server.")
    p.add_argument("--ckpt", required=True, help="run dir (latest checkpoint) or checkpoint dir")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; its continuation streams to stdout")
    source.add_argument("--prompts", help="JSONL file with a 'prompt' field per line "
                        "(batched; an 'answer' field is shown beside the completion)")
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts of --prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", action="append", metavar="SOURCE", help=ROWS_HELP)
    p.add_argument("--values", action=_Deprecated, dest="rows", instead="--rows PATH|URL "
                   "(ram is the default)", convert=lambda v: v.removeprefix("mmap:"),
                   append=True, help=argparse.SUPPRESS)
    for old in ("--bank", "--explicit"):
        p.add_argument(old, action=_Deprecated, dest="rows", instead="--rows PATH|URL",
                       append=True, help=argparse.SUPPRESS)
    p.add_argument("--tree", help="cluster tree routing prompts to tree-memory blocks (default: "
                   "the one the bank manifest or the training data records)")
    p.add_argument("--token", help="bearer token of the memory server "
                   "(default: $MEMTRON_MEMORY_TOKEN)")
    p.add_argument("--cache-rows", type=int, default=65536,
                   help="LRU cache of fetched rows per table (bank or URL tables; 0 = off)")
    p.add_argument("--retriever", metavar="STORE_DIR",
                   help="store directory whose retriever/ to use (default: the explicit-memory "
                   "store of --rows)")
    p.add_argument("--explicit-cache", type=int, default=None,
                   help="LRU cache of decoded memories (default: memory.explicit.cache)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="the model's floating-point dtype (here: bf16 runs it under autocast)")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    p.set_defaults(func=_cmd_generate)


def _add_submit_parser(sub) -> None:
    p = sub.add_parser("submit", help="submit a training job to SLURM (sbatch)",
                       description="Render an sbatch script from a template in slurm/, write it "
                       "and the resolved config into the run dir and submit it. The job "
                       "checkpoints and requeues itself on SIGUSR1 and resumes when restarted.")
    _add_config_args(p)
    _old_positionals(p, "--config", words="overrides")
    p.add_argument("--out", metavar="RUN_DIR", help="run dir (train.run_dir)")
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
    p.add_argument("--ckpt", metavar="RUN_DIR", help="the run dir (submit --out)")
    _old_positionals(p, "--ckpt")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("cancel", help="cancel the SLURM job of a run dir")
    p.add_argument("--ckpt", metavar="RUN_DIR", help="the run dir (submit --out)")
    _old_positionals(p, "--ckpt")
    p.set_defaults(func=_cmd_cancel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model")
    _add_config_args(p)
    p.add_argument("--resume", help="auto (latest checkpoint in run dir), none, or a path")
    p.add_argument("--out", metavar="RUN_DIR", help="run dir (train.run_dir): checkpoints, "
                   "metrics, logs")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command",
                                                                    required=True)
    p = data.add_parser("synth", help="generate the long-tail facts corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--entities", type=int, help="invented people (default: the demo's)")
    p.add_argument("--train-docs", type=int,
                   help="training documents, 2-4 facts of one entity each (default: the demo's)")
    p.add_argument("--valid-docs", type=int)
    p.add_argument("--zipf", type=float,
                   help="entity frequency exponent: 0 = uniform, 1 = a steep long tail")
    p.add_argument("--seed", type=int)
    p.add_argument("--questions-per-bucket", type=int,
                   help="fact questions per frequency bucket (at most the facts it holds)")
    p.set_defaults(func=_cmd_synth)

    p = data.add_parser("prepare", help="tokenize and pack text into webdataset shards")
    p.add_argument("inputs", nargs="+", help=".txt, .jsonl or .parquet files")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--samples-per-shard", type=int, default=2048)
    p.add_argument("--text-key", default="text")
    p.add_argument("--clusters", help="tree dir from `memtron data cluster`: pack per leaf and "
                   "write each sample's bank_path")
    p.set_defaults(func=_cmd_prepare)

    p = data.add_parser("tokenizer", help="train a byte-level BPE tokenizer.json on documents")
    p.add_argument("inputs", nargs="+", help=".txt, .jsonl or .parquet files")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--text-key", default="text")
    p.set_defaults(func=_cmd_tokenizer)

    p = data.add_parser("cluster", help="balanced hierarchical k-means tree of the documents "
                        "(hierarchical memory bank addresses)")
    p.add_argument("inputs", nargs="+", help=".txt, .jsonl or .parquet files")
    p.add_argument("--out", required=True, help="tree directory to write")
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--branching", type=int, default=16)
    p.add_argument("--embedder", default="hashed",
                   help="'hashed' (n-gram TF-IDF, no download) or a local sentence-model dir")
    p.add_argument("--dim", type=int, default=256, help="hashed embedding dimension")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-size", type=int, default=200_000,
                   help="documents the tree is fitted on (reservoir sample)")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="allowed relative deviation of a node from its share of its parent")
    p.add_argument("--text-key", default="text")
    p.set_defaults(func=_cmd_cluster)

    _add_eval_parsers(sub)
    _add_explicit_parsers(sub, data)
    _add_bench_parsers(sub)
    _add_submit_parser(sub)
    _add_infer_parsers(sub)
    _add_export_parsers(sub)
    _add_fetch_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    silence_third_party_warnings()
    args = build_parser().parse_args(argv)
    resolve_old_positionals(args)
    from memtron.data.loader import DataError
    from memtron.infer.generate import GenerationError
    from memtron.parallel.launch import LaunchError
    from memtron.slurm import SlurmError
    from memtron.storage.manifest import CheckpointError
    from memtron.storage.rowblock import BankError
    from memtron.storage.store import RemoteStoreError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, LaunchError, SlurmError, GenerationError,
            BankError, RemoteStoreError, FileNotFoundError) as e:
        print(f"memtron: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
