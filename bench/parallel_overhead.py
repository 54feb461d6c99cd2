"""What data and tensor parallelism cost on a small CPU box: tokens/s and bytes moved per step.

The tiny model of ``configs/tiny-cpu.yaml`` (4 blocks, d 128, one Memory+ layer beside the FFN
of block 2, a 4,096 x 128 value table) is trained at one global batch of 16 x 128 tokens in
these layouts, each in fresh processes started the way torchrun would (env:// over gloo):

    1p/1t   one process, micro-batch 16, 1 intra-op thread
    1p/2t   one process, micro-batch 16, 2 intra-op threads
    dp=2    two ranks, micro-batch 8 each, 1 thread each
    tp=2    two ranks (Megatron tensor parallel), micro-batch 16, 1 thread each
    dp=2, ep=2 (not with --quick) as dp=2, the table row-sharded over both ranks

The 2-rank dp and tp layouts set ``parallel.ep=1``: every rank holds the whole value table and
the touched rows' gradients are exchanged with all-gathers (the scheme the analytic volumes
describe). The last layout is the config's default on 2 ranks (``parallel.ep=0`` = all ranks,
``memory.parallel=rowwise``): lookups go through all-to-alls; it is measured, not modelled.

Both single-process rows are fair baselines on a 2-core machine: 1p/1t uses half the cores the
2-rank layouts use, 1p/2t all of them. Each rank builds memtron's ``Trainer`` and calls its
public ``train_step`` in a loop of warm-up + measured steps (memtron as shipped: nothing of it is
patched; eval, checkpoints and the loop's signal handling are not part of a step). Timing wraps
each ``train_step`` call: tokens/s = measured steps x 2,048 tokens / the summed step times (the
same quantity as metrics.jsonl's ``tokens_per_s``), the slowest rank counting for 2 ranks.
memtron's own count of memory-exchange bytes comes from the step's metrics
(``memory/bytes_sent_per_token`` x the lookups of a step).

Bytes are counted inside every rank by the harness's ``ByteMeter``, which wraps the collectives
as attributes of ``torch.distributed`` (``all_reduce``, ``all_gather``,
``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_to_all_single``, ``broadcast``,
``send``/``recv``, ``batch_isend_irecv``, ... : megatron-core and memtron call them through the
module, so wrapping it before they are imported catches every call). The count is the payload
handed to the collective by the rank (all_reduce: the tensor; all_gather: the rank's input),
only during the measured steps (init, warm-up and shutdown traffic excluded), attributed to the
first memtron/megatron function on the Python stack. On 2 ranks the payload is also what a ring
or pairwise exchange sends per rank. As an independent check, the methods of gloo's
``ProcessGroup`` (one level below) are wrapped too; both totals must agree.

The measured bytes are printed next to an analytic volume computed from the config (formulas in
:func:`analytic_dp` and :func:`analytic_tp`).

Each layout runs ``--repeats`` times, the rounds interleaved (1p/1t, 1p/2t, dp=2, tp=2, then
again) so that a burst of foreign load hits one round rather than one layout; the best round per
layout is reported, with the median over rounds beside it. The share of the cores used by other
processes during the measured steps (/proc/stat minus the ranks' own CPU time) is printed per
layout; rows above 10 % are flagged.

    python bench/parallel_overhead.py              # 3 rounds of 5 warm-up + 30 steps (~3 min)
    python bench/parallel_overhead.py --quick      # 1 round of 2 + 4 steps, 4 layouts (< 90 s)
    python bench/parallel_overhead.py --steps 50 --warmup 5 --repeats 2

``--tree PATH`` measures another source tree through its CLI only, so that the old and the new
core give the same figure (issue 23: dp=2 time per token / dp=1): the 1p/1t, 1p/2t and dp=2
layouts above (dp=2, ep=2 too without --quick), each a fresh ``memtron train`` process
(``torchrun --standalone`` for 2 ranks) with ``PYTHONPATH=PATH``, step times from memtron's own
``tokens_per_s`` in ``metrics.jsonl`` (rank 0, whose step waits for the collectives),
the foreign CPU share sampled around the measured steps (bench/memory_overhead.py's runner).
No bytes are counted in that mode (the byte meter needs a process of this script).

    python bench/parallel_overhead.py --tree /work/base --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memtron.bench.harness import (  # noqa: E402 - after the sys.path line
    BYTE_LEVEL,
    BenchRun,
    ByteMeter,
    Call,
    add_output_args,
    machine_busy_seconds,
    own_cpu_seconds,
    spawn_ranks,
)

CONFIG = REPO / "configs" / "tiny-cpu.yaml"
REUSE_DATA = REPO / "runs" / "data" / "tiny"
SEQ_LEN = 128
GLOBAL_BATCH = 16
TOKENS_PER_STEP = GLOBAL_BATCH * SEQ_LEN
RUN_TIMEOUT_S = 600.0
BUSY = 0.10  # foreign CPU share above which a layout's timing is flagged
# memtron's sparse value-row exchange (renamed in newer trees).
ROW_EXCHANGE = ("average_replicated_table_grads", "sum_table_grads")


@dataclass(frozen=True)
class Layout:
    key: str
    label: str
    world: int
    tp: int
    micro_batch: int
    threads: int
    ep: int = 1  # value tables whole on every rank (sparse row exchange), unless 2
    memory_parallel: str = "rowwise"


LAYOUTS = (
    Layout("1p1t", "1 process, 1 thread", 1, 1, 16, 1),
    Layout("1p2t", "1 process, 2 threads", 1, 1, 16, 2),
    Layout("dp2", "dp=2, ep=1 (2 ranks x 1t)", 2, 1, 8, 1),
    Layout("tp2", "tp=2, ep=1 (2 ranks x 1t)", 2, 2, 16, 1),
    # The config default on 2 ranks (parallel.ep=0 -> all ranks): the table row-sharded.
    Layout("dp2ep2", "dp=2, ep=2 rowwise tables", 2, 1, 8, 1, ep=2),
)


# -- one rank ---------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, layout: Layout, data: str, warmup: int,
               steps: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    meter = ByteMeter().install()  # before memtron/megatron bind torch.distributed's names
    longest_rows: list[int] = []  # per step: the padded row count of the table exchange
    local_rows: list[int] = []  # per step: this rank's touched rows

    def row_counts(call: Call, _result: Any) -> None:
        """The count exchange of the sparse row sync: an all-gather of [count] per rank."""
        counts, mine = call.bound.get("tensor_list"), call.bound.get("tensor")
        if (call.api == "all_gather" and call.origin.endswith(ROW_EXCHANGE)
                and mine is not None and mine.dtype == torch.int64 and mine.numel() == 1):
            local_rows.append(int(mine.item()))
            longest_rows.append(max(int(t.item()) for t in counts))

    meter.listeners.append(row_counts)
    from memtron.config import load_config
    from memtron.parallel.launch import init_distributed, shutdown_distributed
    from memtron.parallel.mesh import destroy_mesh
    from memtron.train.trainer import Trainer

    run_tmp = tempfile.TemporaryDirectory(prefix=f"memtron-bench-{layout.key}-r{rank}-")
    overrides = {
        "data.train": f"{data}/train", "data.valid": f"{data}/valid", "data.questions": "",
        "data.seq_len": SEQ_LEN, "data.micro_batch_size": layout.micro_batch,
        "parallel.tp": layout.tp, "parallel.ep": layout.ep, "parallel.backend": "gloo",
        "memory.parallel": layout.memory_parallel, "train.threads": layout.threads,
        "train.steps": warmup + steps, "train.eval_every": 0, "train.log_every": 10**9,
        "train.run_dir": run_tmp.name, "checkpoint.every": 0, "checkpoint.resume": "none",
        "logging.tensorboard": "false", "logging.progress": "false", "logging.jsonl": "false",
    }
    cfg = load_config(CONFIG, [*BYTE_LEVEL, *(f"{k}={v}" for k, v in overrides.items())])
    init_distributed(cfg.parallel.timeout_s, cfg.parallel.backend)
    durations: list[float] = []
    traffic = [0, 0]  # memtron's own memory-exchange bytes (sent, received), from its metrics
    try:
        with run_tmp:
            trainer = Trainer(cfg)
            info = {"n_dense_local": sum(p.numel() for p in trainer.dense_params),
                    "n_dense_sharded": sum(p.numel() for p in trainer.dense_params
                                           if getattr(p, "tensor_model_parallel", False)),
                    "state": trainer.state.describe()}
            lookups = (cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum
                       * len(trainer.model.memory_layers()))
            batches = trainer.batches()
            loss = None
            for step in range(1, warmup + steps + 1):
                measured = step > warmup
                if step == warmup + 1:
                    window = {"wall": time.perf_counter(), "busy": machine_busy_seconds(),
                              "own": own_cpu_seconds()}
                with meter.measuring() if measured else contextlib.nullcontext():
                    start = time.perf_counter()
                    metrics = trainer.train_step(batches)  # memtron's step, as shipped
                    elapsed = time.perf_counter() - start
                if measured:
                    durations.append(elapsed)
                    traffic[0] += round(metrics.get("memory/bytes_sent_per_token", 0) * lookups)
                    traffic[1] += round(
                        metrics.get("memory/bytes_received_per_token", 0) * lookups)
                loss = metrics["loss"]
            window = {"wall": time.perf_counter() - window["wall"],
                      "busy": machine_busy_seconds() - window["busy"],
                      "own": own_cpu_seconds() - window["own"]}
    finally:
        destroy_mesh()
        shutdown_distributed()
    counted = meter.take()
    return {
        "steps": len(durations), "durations": durations, "window": window, "info": info,
        "final_loss": loss, "api": counted["rows"],
        "pg_calls": counted["pg_calls"], "pg_bytes": counted["pg_bytes"],
        "longest_rows": longest_rows, "local_rows": local_rows, "traffic": traffic,
        "threads": torch.get_num_threads(),
    }


# -- orchestration ----------------------------------------------------------------------------
def run_layout(layout: Layout, data: Path, warmup: int, steps: int) -> list[dict[str, Any]]:
    """Start ``layout.world`` fresh spawned ranks and return their results in rank order."""
    ranks = spawn_ranks(_rank_main, layout.world, (layout, str(data), warmup, steps),
                        timeout=RUN_TIMEOUT_S, threads=layout.threads, quiet=True)
    return ranks.raise_errors(f"{layout.key} failed")


def prepare_data() -> tuple[Path, str, tempfile.TemporaryDirectory | None]:
    """``runs/data/tiny`` when it holds byte-tokenized shards at seq_len 128, else the default
    synthetic corpus generated and prepared in a temporary directory."""
    try:
        ok = all(json.loads((REUSE_DATA / part / "index.json").read_text()).get("seq_len")
                 == SEQ_LEN for part in ("train", "valid"))
    except (OSError, ValueError):
        ok = False
    if ok:
        return REUSE_DATA, f"reused {REUSE_DATA}", None
    from memtron.data.prepare import prepare
    from memtron.data.synthetic import generate_corpus

    tmp = tempfile.TemporaryDirectory(prefix="memtron-bench-data-")
    root = Path(tmp.name)
    start = time.perf_counter()
    generate_corpus(root)
    prepare([root / "raw" / "train.jsonl"], root / "train", seq_len=SEQ_LEN)
    prepare([root / "raw" / "valid.jsonl"], root / "valid", seq_len=SEQ_LEN)
    return root, f"generated the default corpus in {time.perf_counter() - start:.1f} s", tmp


# -- analytic volumes -------------------------------------------------------------------------
def dense_param_count(cfg: Any) -> int:
    """Parameters the dense AdamW owns (everything but the value tables), from the config."""
    m, mem = cfg.model, cfg.memory
    d, head_dim = m.d_model, m.d_model // m.n_heads
    d_value = mem.value_dim or d
    # attention: wq [H*hd, d], wk and wv [Hkv*hd, d], wo [d, H*hd]; two RMSNorm weights [d]
    attn = 2 * d * m.n_heads * head_dim + 2 * d * m.n_kv_heads * head_dim
    ffn = 3 * d * m.d_ff  # SwiGLU: w_gate, w_up [d_ff, d], w_down [d, d_ff]
    # memory layer: query [Hm*d_key, d], query RMSNorm [d_key], sub-keys [Hm, 2, n, d_key/2],
    # Memory+ gate [d_v, d] and out [d, d_v]
    memory = (d * mem.n_heads * mem.d_key + (mem.d_key if mem.query_norm else 0)
              + mem.n_heads * 2 * mem.n_sub_keys * (mem.d_key // 2)
              + (2 * d * d_value if mem.memory_plus else 0))
    total = m.vocab_size * d + d  # embedding (tied head adds nothing) + final RMSNorm
    total += 0 if m.tie_embeddings else m.vocab_size * d
    for i in range(m.n_layers):
        total += attn + 2 * d
        total += ffn if _has_ffn(cfg, i) else 0
        total += memory if i in mem.layers else 0
    return total


def _has_ffn(cfg: Any, block: int) -> bool:
    return block not in cfg.memory.layers or cfg.memory.placement == "beside"


def analytic_dp(cfg: Any, longest_rows: float) -> list[tuple[str, Any, str, float]]:
    """dp=2 bytes per step per rank: (term, origin it is matched to, formula, bytes).

    * dense gradients: one all-reduce (25 MiB buckets; this model fits one) of every dense
      gradient in fp32:                     4 * n_dense
    * value-table rows (ep = 1, every rank holds the whole table): per table an all-gather of
      the [1] int64 row count, then of the ids (int64) and rows (fp32, d_v wide) padded to
      the largest rank's count R (measured):    8 + R * (8 + 4 * d_v)
    * the mean loss, one float64 all-reduce:   8
    * the non-finite flags of loss and both gradient norms, one int32 all-reduce:  12
    """
    n_dense = dense_param_count(cfg)
    return [
        ("dense-grad all-reduce", "average_dense_grads", f"4 x {n_dense:,} dense params",
         4.0 * n_dense),
        _row_term(cfg, longest_rows),
        ("loss scalar", "average_scalar", "8 (fp64)", 8.0),
        ("non-finite flags", "_agreed_nonfinite", "12 (3 x int32)", 12.0),
    ]


def _row_term(cfg: Any, longest_rows: float) -> tuple[str, Any, str, float]:
    d_value = cfg.memory.value_dim or cfg.model.d_model
    n_tables = len(cfg.memory.layers) - sum(len(g) - 1 for g in cfg.memory.shared_tables)
    return ("value-row all-gathers", ROW_EXCHANGE,
            f"{n_tables} x (8 + R x (8 + 4 x {d_value})), R = {longest_rows:,.0f}",
            n_tables * (8 + longest_rows * (8 + 4 * d_value)))


def analytic_tp(cfg: Any, batch: int) -> list[tuple[str, Any, str, float]]:
    """tp=2 bytes per step per rank, Megatron's scheme without sequence parallelism.

    With A = B * L * d * 4 bytes (one fp32 activation [B, L, d]), per transformer block:
    * forward all-reduce of the row-parallel outputs: attention wo, and FFN w_down when the
      block has an FFN (memory.placement = beside, or a block without memory):
                                                        (1 + ffn) * A
    * backward all-reduce of the gradient of the input shared by the column-parallel layers
      (copy-to-region; one for q/k/v, one for gate/up):    (1 + ffn) * A
    plus the vocab-parallel embedding's forward all-reduce (A), the tied head's copy-to-region
    backward all-reduce (A), vocab-parallel cross entropy's three [B, L] fp32 all-reduces
    (max, target logit, sum of exps: 3 * B * L * 4), the gradient-norm float64 scalar (8) and
    the int32 non-finite flags (12). Memory layers are replicated
    over tp and both ranks compute the same row gradients from the same tokens, so tables need
    no traffic (ep = 1).
    """
    m = cfg.model
    act = batch * SEQ_LEN * m.d_model * 4
    n_ffn = sum(_has_ffn(cfg, i) for i in range(m.n_layers))
    return [
        ("fwd: row-parallel outputs", "RowParallelLinear.forward",
         f"({m.n_layers} wo + {n_ffn} w_down) x A", (m.n_layers + n_ffn) * act),
        ("fwd: vocab-parallel embedding", "VocabParallelEmbedding.forward", "A", act),
        ("bwd: copy-to-region input grads", "_CopyToModelParallelRegion.backward",
         f"({m.n_layers} qkv + {n_ffn} gate/up + 1 head) x A", (m.n_layers + n_ffn + 1) * act),
        ("vocab-parallel cross entropy", "cross_entropy.", "3 x B x L x 4",
         3.0 * batch * SEQ_LEN * 4),
        ("grad-norm scalar", "clip_grad_norm", "8 (fp64)", 8.0),
        ("non-finite flags", "_agreed_nonfinite", "12 (3 x int32)", 12.0),
        ("value-row all-gathers", ROW_EXCHANGE, "none (tp peers hold the same rows)", 0.0),
    ]


# -- report -----------------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _summarise(layout: Layout, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    steps = ranks[0]["steps"]
    total = max(sum(r["durations"]) for r in ranks)
    per_step = [max(ds) for ds in zip(*(r["durations"] for r in ranks))]
    window = ranks[0]["window"]
    own = sum(r["window"].get("own", 0.0) for r in ranks)
    cores = os.cpu_count() or 1
    foreign = None
    if window.get("wall") and window.get("busy"):
        foreign = max(0.0, window["busy"] - own) / (cores * window["wall"])
    return {
        "layout": layout, "ranks": ranks, "steps": steps,
        "tok_s": steps * TOKENS_PER_STEP / total, "median_ms": 1e3 * statistics.median(per_step),
        "tok_s_median": TOKENS_PER_STEP / statistics.median(per_step), "foreign": foreign,
        "loss": ranks[0]["final_loss"],
    }


def _measured(rank: dict[str, Any], steps: int) -> dict[str, float]:
    """Bytes per step by origin suffix, for matching against the analytic terms."""
    out: dict[str, float] = {}
    for row in rank["api"]:
        out[row["origin"]] = out.get(row["origin"], 0.0) + row["bytes"] / steps
    return out


def _matches(origin: str, key: str | tuple[str, ...]) -> bool:
    """``origin`` (module.qualname) contains ``key`` (or one of them)."""
    return any(k in origin for k in ((key,) if isinstance(key, str) else key))


def print_comm(s: dict[str, Any], cfg: Any) -> tuple[float, float]:
    layout, steps = s["layout"], s["steps"]
    r0 = s["ranks"][0]
    print(f"\n{layout.label}: collectives per step, rank 0 (payload handed to the call, "
          f"mean over {steps} measured steps)")
    print(f"  {'collective':<14} {'origin':<62} {'dtype':<8} {'calls':>6} {'bytes/step':>13}")
    api_total = 0.0
    for row in sorted(r0["api"], key=lambda r: -r["bytes"]):
        api_total += row["bytes"] / steps
        shapes = row["shapes"][0] if len(row["shapes"]) == 1 else "varies"
        origin = row["origin"]
        origin = origin if len(origin) <= 44 else "..." + origin[-41:]
        print(f"  {row['api']:<14} {origin + ' ' + shapes:<62.62} {row['dtype']:<8} "
              f"{row['calls'] / steps:>6.2f} {_fmt_bytes(row['bytes'] / steps):>13}")
    pg_total = r0["pg_bytes"] / steps
    match = "agree" if abs(pg_total - api_total) <= 1e-9 * max(1.0, api_total) else "DISAGREE"
    print(f"  {'total':<14} {'':<62} {'':<8} {sum(r['calls'] for r in r0['api']) / steps:>6.2f} "
          f"{_fmt_bytes(api_total):>13}")
    if api_total == 0:
        print("  ERROR: no collective was counted; the torch.distributed patch missed the calls")
    print(f"  check one level down (gloo ProcessGroup methods): {r0['pg_calls'] / steps:.2f} "
          f"calls, {_fmt_bytes(pg_total)} per step -> {match} with the torch.distributed count")
    others = [r for r in s["ranks"][1:]]
    for i, r in enumerate(others, start=1):
        same = abs(r["pg_bytes"] - r0["pg_bytes"]) / max(1, r0["pg_bytes"])
        print(f"  rank {i}: {_fmt_bytes(r['pg_bytes'] / steps)} per step "
              f"({'same as rank 0' if same < 1e-9 else f'{same:.1%} off rank 0'})")

    measured = _measured(r0, steps)
    longest = statistics.mean(r0["longest_rows"]) if r0["longest_rows"] else 0.0
    local = statistics.mean(r0["local_rows"]) if r0["local_rows"] else 0.0
    if longest:
        print(f"  touched value rows per step: this rank {local:,.0f}, padded to the largest "
              f"rank's {longest:,.0f} (of {cfg.memory.n_slots:,} slots)")
    if layout.ep > 1:
        sent, received = r0["traffic"]
        exchanged = sum(row["bytes"] for row in r0["api"]
                        if _matches(row["origin"], "dispatch._exchange")) / steps
        print(f"  memory all-to-alls: {_fmt_bytes(exchanged)} payload per step, of which to the "
              f"other rank (memtron's Traffic counter): sent {_fmt_bytes(sent / steps)}, "
              f"received {_fmt_bytes(received / steps)}")
        print("  (no analytic model: the per-pair partial-sum/row choice depends on the hits)")
        return api_total, 0.0
    if layout.tp == 1:
        variants = [("", analytic_dp(cfg, longest))]
        if info := r0["info"]:
            print(f"  dense params (trainer's AdamW): {info['n_dense_local']:,}; from the config "
                  f"formula: {dense_param_count(cfg):,}")
    else:
        variants = [("Megatron scheme", analytic_tp(cfg, 16))]
    totals = (api_total, 0.0)
    for title, terms in variants:
        print(f"  analytic{' - ' + title if title else ''}:")
        print(f"    {'term':<34} {'formula':<44} {'analytic':>11} {'measured':>11} {'ratio':>6}")
        matched = 0.0
        analytic_total = 0.0
        for term, suffix, formula, value in terms:
            got = sum(v for origin, v in measured.items() if _matches(origin, suffix))
            matched += got
            analytic_total += value
            ratio = f"{got / value:.3f}" if value else "-"
            print(f"    {term:<34} {formula:<44.44} {_fmt_bytes(value):>11} {_fmt_bytes(got):>11} "
                  f"{ratio:>6}")
        rest = api_total - matched
        if rest > 0:
            print(f"    {'(not in any term)':<34} {'':<44} {'':>11} {_fmt_bytes(rest):>11}")
        print(f"    {'total':<34} {'':<44} {_fmt_bytes(analytic_total):>11} "
              f"{_fmt_bytes(api_total):>11} {api_total / analytic_total:>6.3f}")
        totals = (api_total, analytic_total)
    return totals


def reading(summary: dict[str, dict[str, Any]], comm: dict[str, tuple[float, float]],
            cfg: Any) -> str:
    names = {layout.key: layout.label.split(" (")[0] for layout in LAYOUTS
             if layout.key in summary}
    names.update({"1p1t": "one process with 1 thread", "1p2t": "one process with 2 threads"})
    b1, b2 = summary["1p1t"]["tok_s"], summary["1p2t"]["tok_s"]
    dp, tp = summary["dp2"]["tok_s"], summary["tp2"]["tok_s"]
    (dp_bytes, dp_model), (tp_bytes, tp_model) = comm["dp2"], comm["tp2"]
    best = max(names, key=lambda k: summary[k]["tok_s"])
    busy = [k for k in names if (summary[k]["foreign"] or 0.0) > BUSY]
    two_threads = (f"2 threads speed one process up {b2 / b1:.2f}x over 1 thread"
                   if b2 >= b1 else f"2 threads make one process slower ({b2 / b1:.2f}x of 1 "
                   "thread)")
    act = GLOBAL_BATCH * SEQ_LEN * cfg.model.d_model * 4
    tp_rows = sum(row["bytes"] for row in summary["tp2"]["ranks"][0]["api"]
                  if _matches(row["origin"], ROW_EXCHANGE)) / summary["tp2"]["steps"]
    text = (
        f"At one global batch of {TOKENS_PER_STEP:,} tokens, {two_threads}; dp=2 runs at "
        f"{dp / b1:.2f}x the 1-thread and {dp / b2:.2f}x the 2-thread process, tp=2 at "
        f"{tp / b1:.2f}x and {tp / b2:.2f}x, and the fastest layout here is {names[best]}. "
        f"dp=2 puts {_fmt_bytes(dp_bytes)} per rank per step into collectives "
        f"({dp_bytes / dp_model:.2f}x the analytic volume): the fp32 dense gradients, fixed by "
        f"the model, plus the touched value rows, which grow with the tokens per rank until the "
        f"{cfg.memory.n_slots:,} slots are covered. tp=2 puts {_fmt_bytes(tp_bytes)} "
        f"({tp_bytes / max(dp_bytes, 1):.1f}x dp), almost all of it fp32 [B, L, d] activations "
        f"of {_fmt_bytes(act)} each, so it grows with the batch; that is "
        f"{tp_bytes / tp_model:.2f}x Megatron's volume"
    )
    if tp_rows:
        text += (f", plus value-row gradients ({_fmt_bytes(tp_rows)}) exchanged between tp "
                 f"ranks that computed the same rows")
    text += (
        "; tp also runs the memory layer (query net, top-k, lookup, sparse update) replicated "
        "on both ranks. On one 2-core host the bytes cross loopback TCP in gloo on the same "
        "cores that compute, so every byte costs compute time"
    )
    if tp < dp:
        text += (f"; at this model size tp's halved matmuls do not pay for "
                 f"{_fmt_bytes(tp_bytes)} of blocking all-reduces per step, and dp, with "
                 f"{tp_bytes / max(dp_bytes, 1):.0f}x fewer bytes and no duplicated work, is the "
                 "better 2-rank layout")
    if "dp2ep2" in summary:
        ep2 = summary["dp2ep2"]["tok_s"]
        text += (f". With the config's default ep (tables row-sharded over both ranks) dp=2 runs "
                 f"at {ep2 / dp:.2f}x its ep=1 speed and moves {_fmt_bytes(comm['dp2ep2'][0])} "
                 "per step (all-to-all lookups instead of the row all-gather)")
    text += "."
    if busy:
        text += (f" Caution: other processes used more than {BUSY:.0%} of the cores during "
                 f"{'; '.join(names[k] for k in busy)}; those tokens/s are lower bounds and the "
                 "ratios between layouts are only indicative.")
    return text


def cli_main(args: argparse.Namespace, steps: int, warmup: int, repeats: int) -> int:
    """``--tree``: the layouts through the tree's ``memtron train`` CLI; tokens/s only."""
    from memory_overhead import Tree, prepare_corpus, train  # bench/, next to this script

    bench = BenchRun("parallel_overhead", args).start()
    start = time.perf_counter()
    load0 = os.getloadavg()
    layouts = [x for x in LAYOUTS if x.tp == 1 and not (args.quick and x.ep > 1)]
    print(f"memtron parallel overhead through the CLI of {args.tree.resolve()}: torch "
          f"{torch.__version__}, {os.cpu_count()} CPU cores, load average {load0[0]:.2f} / "
          f"{load0[1]:.2f} / {load0[2]:.2f} (1/5/15 min)", flush=True)
    rounds: dict[str, list[Any]] = {layout.key: [] for layout in layouts}
    with tempfile.TemporaryDirectory(prefix="memtron-bench-parallel-") as tmp:
        work = Path(tmp)
        tree = Tree.at(args.tree, work)
        train_dir, valid_dir = prepare_corpus(tree, work / "data", SEQ_LEN)
        config = args.tree.resolve() / "configs" / "tiny-cpu.yaml"
        print(f"data: synthetic corpus prepared by the tree's CLI; model {config}; {repeats} "
              f"round(s) of {warmup} warm-up + {steps} measured steps of {GLOBAL_BATCH} x "
              f"{SEQ_LEN} tokens per layout", flush=True)
        for r in range(repeats):
            for layout in layouts:
                overrides = [*BYTE_LEVEL, f"data.train={train_dir}", f"data.valid={valid_dir}",
                             "data.questions=", f"data.seq_len={SEQ_LEN}",
                             f"data.micro_batch_size={layout.micro_batch}",
                             "train.grad_accum=1", f"parallel.tp={layout.tp}",
                             f"parallel.ep={layout.ep}", "parallel.backend=gloo",
                             f"memory.parallel={layout.memory_parallel}",
                             f"train.threads={layout.threads}", "checkpoint.resume=none"]
                run = train(tree, config, overrides, work / "runs" / f"{layout.key}-r{r + 1}",
                            warmup, steps, TOKENS_PER_STEP, nproc=layout.world)
                rounds[layout.key].append(run)
                foreign = "n/a" if run.foreign is None else f"{run.foreign:.0%}"
                print(f"  round {r + 1}: {layout.label:<27} {run.tokens_per_s:>8,.0f} tokens/s,"
                      f" foreign CPU {foreign:>4} ({run.wall_s:.1f} s with start-up)", flush=True)
    best = {k: max(v, key=lambda run: run.tokens_per_s) for k, v in rounds.items()}
    b1, b2 = best["1p1t"].tokens_per_s, best["1p2t"].tokens_per_s
    print(f"\n{'layout':<27} {'mbs':>3} {'step ms':>8} {'tokens/s':>9} {'median':>8} "
          f"{'vs 1p/1t':>8} {'vs 1p/2t':>8} {'foreign':>7}")
    for layout in layouts:
        run = best[layout.key]
        med = statistics.median(x.tokens_per_s for x in rounds[layout.key])
        foreign = "n/a" if run.foreign is None else f"{run.foreign:.0%}"
        print(f"{layout.label:<27} {layout.micro_batch:>3} {run.median_ms:>8.1f} "
              f"{run.tokens_per_s:>9,.0f} {med:>8,.0f} {run.tokens_per_s / b1:>8.2f} "
              f"{run.tokens_per_s / b2:>8.2f} {foreign:>7}")
    dp = best["dp2"].tokens_per_s
    print(f"\ndp=2 time per token / dp=1: {b1 / dp:.3f} against one process with 1 thread, "
          f"{b2 / dp:.3f} against one with 2 threads (best rounds; tokens/s from memtron's "
          f"metrics.jsonl, rank 0)")
    load1 = os.getloadavg()
    print(f"load average at the end {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}; "
          f"total wall time {time.perf_counter() - start:.0f} s")
    bench.results = [{
        "key": layout.key, "label": layout.label, "world": layout.world, "tp": layout.tp,
        "ep": layout.ep, "micro_batch": layout.micro_batch, "threads": layout.threads,
        "tok_s": best[layout.key].tokens_per_s, "median_ms": best[layout.key].median_ms,
        "tok_s_rounds": [x.tokens_per_s for x in rounds[layout.key]],
        "foreign": best[layout.key].foreign, "loss": best[layout.key].records[-1].get("loss"),
    } for layout in layouts]
    bench.baseline = {"kind": "one process at the same global batch, 1 and 2 threads",
                      "tok_s_1p1t": b1, "tok_s_1p2t": b2, "tokens_per_step": TOKENS_PER_STEP,
                      "dp2_time_per_token_vs_1p1t": b1 / dp,
                      "dp2_time_per_token_vs_1p2t": b2 / dp, "tree": str(args.tree.resolve())}
    bench.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 30)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds over the four layouts, interleaved; the best round of each "
                             "layout is reported (default 3, --quick 1)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no further round once another would end past this many "
                             "seconds (keeps the default run under 6 minutes on a busy machine)")
    parser.add_argument("--quick", action="store_true",
                        help="few steps, one round, without the extra ep=2 layout: a smoke test")
    parser.add_argument("--tree", type=Path, default=None,
                        help="measure this source tree through its `memtron train` CLI "
                             "(tokens/s only, no byte counts; see above)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    repeats = args.repeats or (1 if args.quick else 3)
    if steps < 1 or warmup < 0 or repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if args.tree is not None:
        if warmup < 1:
            parser.error("--tree needs --warmup >= 1 (the window opens at a logged step)")
        return cli_main(args, steps, warmup, repeats)

    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    from memtron.config import load_config

    start = time.perf_counter()
    bench = BenchRun("parallel_overhead", args).start()
    load0 = os.getloadavg()
    print(f"memtron parallel overhead: torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"load average {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} (1/5/15 min)")
    data, how, tmp = prepare_data()
    cfg = load_config(CONFIG, [*BYTE_LEVEL, f"data.seq_len={SEQ_LEN}"])  # as the ranks
    print(f"data: {how}; model {CONFIG.relative_to(REPO)} (memory.layers={cfg.memory.layers}, "
          f"placement={cfg.memory.placement}); {repeats} round(s) of {warmup} warm-up + {steps} "
          f"measured steps of {GLOBAL_BATCH} x {SEQ_LEN} tokens per layout", flush=True)
    layouts = [x for x in LAYOUTS if not (args.quick and x.ep > 1)]
    rounds: dict[str, list[dict[str, Any]]] = {layout.key: [] for layout in layouts}
    try:
        for r in range(repeats):
            round_start = time.perf_counter()
            for layout in layouts:
                t0 = time.perf_counter()
                s = _summarise(layout, run_layout(layout, data, warmup, steps))
                rounds[layout.key].append(s)
                foreign = "n/a" if s["foreign"] is None else f"{s['foreign']:.0%}"
                print(f"  round {r + 1}: {layout.label:<27} {s['tok_s']:>8,.0f} tokens/s, "
                      f"foreign CPU {foreign:>4} ({time.perf_counter() - t0:.1f} s with "
                      "start-up)", flush=True)
            now = time.perf_counter()
            if r + 1 < repeats and now - start + (now - round_start) > args.budget_s:
                print(f"  stopping after {r + 1} round(s): another would end past "
                      f"--budget-s {args.budget_s:.0f}")
                break
    finally:
        if tmp is not None:
            tmp.cleanup()

    summary = {k: max(v, key=lambda s: s["tok_s"]) for k, v in rounds.items()}
    b1, b2 = summary["1p1t"]["tok_s"], summary["1p2t"]["tok_s"]
    print(f"\n{'layout':<27} {'mbs':>3} {'step ms':>8} {'tokens/s':>9} {'median':>8} "
          f"{'vs 1p/1t':>8} {'vs 1p/2t':>8} {'foreign':>7} {'loss':>6}")
    for layout in layouts:
        s = summary[layout.key]
        foreign = "n/a" if s["foreign"] is None else f"{s['foreign']:.0%}"
        med = statistics.median(x["tok_s"] for x in rounds[layout.key])
        print(f"{layout.label:<27} {layout.micro_batch:>3} {s['median_ms']:>8.1f} "
              f"{s['tok_s']:>9,.0f} {med:>8,.0f} {s['tok_s'] / b1:>8.2f} "
              f"{s['tok_s'] / b2:>8.2f} {foreign:>7} {s['loss']:>6.3f}")
    print(f"tokens/s: {steps} x {TOKENS_PER_STEP:,} tokens / summed step time (slowest rank), "
          f"best of {len(rounds['1p1t'])} round(s); median: over the rounds; step ms: median "
          "step of that round; foreign: share of all cores used by other processes in the "
          "measured steps; loss: at the last step (same data, same init: the layouts should agree)")
    for key in ("1p1t", "1p2t"):
        if summary[key]["ranks"][0]["api"] or summary[key]["ranks"][0]["pg_calls"]:
            print(f"warning: {key} made collective calls")
    comm = {layout.key: print_comm(summary[layout.key], cfg)
            for layout in layouts if layout.world > 1}
    print("\n" + reading(summary, comm, cfg))
    load1 = os.getloadavg()
    print(f"\nload average at the end {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}; "
          f"total wall time {time.perf_counter() - start:.0f} s")
    bench.results = [{
        "key": layout.key, "label": layout.label, "world": layout.world, "tp": layout.tp,
        "ep": layout.ep, "micro_batch": layout.micro_batch, "threads": layout.threads,
        "tok_s": summary[layout.key]["tok_s"], "median_ms": summary[layout.key]["median_ms"],
        "tok_s_rounds": [x["tok_s"] for x in rounds[layout.key]],
        "foreign": summary[layout.key]["foreign"], "loss": summary[layout.key]["loss"],
        "bytes_per_step": comm[layout.key][0] if layout.key in comm else 0.0,
        "analytic_bytes_per_step": comm[layout.key][1] if layout.key in comm else 0.0,
        "pg_bytes_per_step": (summary[layout.key]["ranks"][0]["pg_bytes"]
                              / summary[layout.key]["steps"]),
    } for layout in layouts]
    bench.baseline = {"kind": "one process at the same global batch, 1 and 2 threads",
                      "tok_s_1p1t": b1, "tok_s_1p2t": b2,
                      "tokens_per_step": TOKENS_PER_STEP}
    bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
