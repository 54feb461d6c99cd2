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
2-rank layouts use, 1p/2t all of them. Eval, checkpoints and progress output are off; the save
the trainer would still take after its last step is replaced by a no-op. Timing wraps
``Trainer.train_step``: tokens/s = measured steps x 2,048 tokens / the summed step times (the
same quantity as metrics.jsonl's ``tokens_per_s``), the slowest rank counting for 2 ranks.

Bytes are counted inside every rank by wrapping the collectives as attributes of
``torch.distributed`` (``all_reduce``, ``all_gather``, ``all_gather_into_tensor``,
``reduce_scatter_tensor``, ``all_to_all_single``, ``broadcast``, ``send``/``recv``,
``batch_isend_irecv``, ... : megatron-core and memtron call them through the module, so patching
it before they are imported catches every call). The count is the payload handed to the
collective by the rank (all_reduce: the tensor; all_gather: the rank's input), only during the
measured steps (init, warm-up and shutdown traffic excluded), attributed to the first
memtron/megatron function on the Python stack. On 2 ranks the payload is also what a ring or
pairwise exchange sends per rank. As an independent check, the methods of gloo's
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
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
REUSE_DATA = REPO / "runs" / "data" / "tiny"
SEQ_LEN = 128
GLOBAL_BATCH = 16
TOKENS_PER_STEP = GLOBAL_BATCH * SEQ_LEN
RUN_TIMEOUT_S = 600.0
BUSY = 0.10  # foreign CPU share above which a layout's timing is flagged
# memtron's sparse value-row exchange (renamed in newer trees).
ROW_EXCHANGE = ("average_replicated_table_grads", "sum_table_grads")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_RANK", "PMI_RANK")


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


# -- counting collectives (runs inside each rank) -------------------------------------------------
def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    tensor = getattr(obj, "tensor", None)  # a P2POp
    return [tensor] if isinstance(tensor, torch.Tensor) else []


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


# torch.distributed function -> (position, keyword) of the payload this rank hands over.
API_PAYLOAD = {
    "all_reduce": (0, "tensor"), "all_reduce_coalesced": (0, "tensors"),
    "broadcast": (0, "tensor"), "reduce": (0, "tensor"), "send": (0, "tensor"),
    "recv": (0, "tensor"), "isend": (0, "tensor"), "irecv": (0, "tensor"),
    "all_gather": (1, "tensor"), "all_gather_into_tensor": (1, "input_tensor"),
    "_all_gather_base": (1, "input_tensor"), "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input"), "_reduce_scatter_base": (1, "input"),
    "all_to_all_single": (1, "input"), "all_to_all": (1, "input_tensor_list"),
    "gather": (0, "tensor"), "scatter": (1, "scatter_list"),
    "batch_isend_irecv": (0, "p2p_op_list"), "barrier": (None, None),
}
# ProcessGroup method -> position of its input tensors (the check one level below); names of
# torch 2.13 (all_to_all_single, all_gather_single, ...) and of older releases.
PG_PAYLOAD = {
    "allreduce": 0, "allreduce_coalesced": 0, "broadcast": 0, "reduce": 0, "send": 0,
    "recv": 0, "recv_anysource": 0, "allgather": 1, "allgather_coalesced": 1,
    "all_gather_single": 1, "all_gather_single_coalesced": 1, "_allgather_base": 1,
    "allgather_into_tensor_coalesced": 1, "reduce_scatter": 1, "reduce_scatter_single": 1,
    "reduce_scatter_single_coalesced": 1, "_reduce_scatter_base": 1,
    "reduce_scatter_tensor_coalesced": 1, "all_to_all_single": 1, "alltoall_base": 1,
    "alltoall": 1, "gather": 1, "scatter": 1, "barrier": None, "monitored_barrier": None,
}


class Meter:
    """Per-rank counters; ``active`` is on only while a measured step (or its stop check) runs."""

    def __init__(self) -> None:
        self.active = False
        self.depth = 0  # > 0 inside a wrapped API call (nested calls are not counted twice)
        self.api: dict[str, dict[str, Any]] = {}
        self.pg_calls = 0
        self.pg_bytes = 0
        self.longest_rows: list[int] = []  # per step: the padded row count of the table exchange
        self.local_rows: list[int] = []  # per step: this rank's touched rows
        self.traffic = [0, 0]  # memtron's own memory-exchange count (sent, received)


METER = Meter()


def _origin() -> str:
    """The first memtron/megatron function up the stack, skipping megatron's mapping helpers
    (``_reduce`` ...) unless they are an autograd backward (the copy-to-region's gradient)."""
    frame = sys._getframe(2)
    first = ""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith(("memtron.", "megatron.")):
            name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
            label = f"{module.rsplit('.', 1)[-1]}.{name}"
            first = first or label
            if not module.endswith("tensor_parallel.mappings") or name.endswith(".backward"):
                return label
        frame = frame.f_back
    return first or "(outside memtron/megatron)"


def _wrap_api(name: str, fn: Any) -> Any:
    position, keyword = API_PAYLOAD[name]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        counted = METER.active and METER.depth == 0
        origin = dtype = ""
        if counted:
            payload = None
            if position is not None:
                payload = args[position] if len(args) > position else kwargs.get(keyword)
            tensors = _tensors(payload)
            dtype = str(tensors[0].dtype).removeprefix("torch.") if tensors else "-"
            origin = _origin()
            row = METER.api.setdefault(f"{name}|{origin}|{dtype}", {
                "api": name, "origin": origin, "dtype": dtype, "calls": 0, "bytes": 0,
                "shapes": []})
            row["calls"] += 1
            row["bytes"] += _nbytes(payload)
            shape = "+".join(str(list(t.shape)) for t in tensors[:1])
            if shape not in row["shapes"] and len(row["shapes"]) < 4:
                row["shapes"].append(shape)
        METER.depth += 1
        try:
            result = fn(*args, **kwargs)
        finally:
            METER.depth -= 1
        if (counted and name == "all_gather" and origin.endswith(ROW_EXCHANGE)
                and len(args) >= 2 and dtype == "int64" and args[1].numel() == 1):
            METER.local_rows.append(int(args[1].item()))  # the count exchange: [count] per rank
            METER.longest_rows.append(int(max(int(t.item()) for t in args[0])))
        return result

    wrapped.__wrapped__ = fn
    return wrapped


def _wrap_pg(name: str, fn: Any) -> Any:
    position = PG_PAYLOAD[name]

    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        if METER.active:
            METER.pg_calls += 1
            if position is not None and len(args) > position:
                METER.pg_bytes += _nbytes(args[position])
        return fn(self, *args, **kwargs)

    return wrapped


def install_counters() -> None:
    """Patch ``torch.distributed`` (and c10d's module, which shares the functions) and the
    ProcessGroup class; must run before memtron or megatron is imported."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    for name in API_PAYLOAD:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        wrapped = _wrap_api(name, fn)
        setattr(dist, name, wrapped)
        if getattr(c10d, name, None) is fn:
            setattr(c10d, name, wrapped)
    pg_class = dist.ProcessGroup
    for name in PG_PAYLOAD:
        fn = getattr(pg_class, name, None)
        if fn is not None:
            setattr(pg_class, name, _wrap_pg(name, fn))


# -- one rank ---------------------------------------------------------------------------------
def _cpu_busy_s() -> float:
    """Machine-wide busy CPU seconds (all cores) from /proc/stat; 0 where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _rank_main(rank: int, world: int, port: int, layout: Layout, data: str, warmup: int,
               steps: int, out: str) -> None:
    for var in LAUNCH_VARS:
        os.environ.pop(var, None)
    os.environ["OMP_NUM_THREADS"] = str(layout.threads)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    torch.set_num_threads(layout.threads)
    log = open(Path(out, f"rank{rank}.log"), "w")  # noqa: SIM115 - kept open until exit
    os.dup2(log.fileno(), 1)  # the trainer's banner lines would clutter the report
    os.dup2(log.fileno(), 2)
    try:
        install_counters()
        result = _train(layout, data, warmup, steps, rank)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"ok": result}))
    except BaseException:
        Path(out, f"rank{rank}.json").write_text(json.dumps({"error": traceback.format_exc()}))
        raise


def _train(layout: Layout, data: str, warmup: int, steps: int, rank: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    from memtron.config import load_config
    from memtron.train import trainer as trainer_mod

    run_tmp = tempfile.TemporaryDirectory(prefix=f"memtron-bench-{layout.key}-r{rank}-")
    run_dir = run_tmp.name
    overrides = {
        "data.train": f"{data}/train", "data.valid": f"{data}/valid", "data.questions": "",
        "data.seq_len": SEQ_LEN, "data.micro_batch_size": layout.micro_batch,
        "parallel.tp": layout.tp, "parallel.ep": layout.ep, "parallel.backend": "gloo",
        "memory.parallel": layout.memory_parallel, "train.threads": layout.threads,
        "train.steps": warmup + steps, "train.eval_every": 0, "train.log_every": 10**9,
        "train.run_dir": run_dir, "checkpoint.every": 0, "checkpoint.resume": "none",
        "logging.tensorboard": "false", "logging.progress": "false", "logging.jsonl": "false",
    }
    cfg = load_config(CONFIG, [f"{k}={v}" for k, v in overrides.items()])
    try:  # memtron's own count of memory-parallel exchange bytes (sharded tables only)
        from memtron.parallel.memory import Traffic

        traffic_add = Traffic.add.__func__

        def counted_add(cls: Any, sent: int, received: int) -> None:
            if METER.active:  # the trainer take()s (resets) it every step: count on the way in
                METER.traffic[0] += sent
                METER.traffic[1] += received
            traffic_add(cls, sent, received)

        Traffic.add = classmethod(counted_add)
    except ImportError:
        pass
    durations: list[float] = []
    window: dict[str, float] = {}
    info: dict[str, Any] = {}
    trainer_cls = trainer_mod.Trainer
    train_step, agreed_stop = trainer_cls.train_step, trainer_cls._agreed_stop

    def measured(step: int) -> bool:
        return warmup < step <= warmup + steps

    def timed_step(self: Any, batches: Any) -> dict[str, float]:
        step = self.step + 1
        if step == 1:
            info["n_dense_local"] = sum(p.numel() for p in self.dense_params)
            info["n_dense_sharded"] = sum(p.numel() for p in self.dense_params
                                          if getattr(p, "tensor_model_parallel", False))
            info["state"] = self.state.describe()
        if step == warmup + 1:
            window.update(wall=time.perf_counter(), busy=_cpu_busy_s(), own=_own_cpu_s())
        METER.active = measured(step)
        start = time.perf_counter()
        try:
            return train_step(self, batches)
        finally:
            if METER.active:
                durations.append(time.perf_counter() - start)
            METER.active = False
            if step == warmup + steps:
                window.update(wall=time.perf_counter() - window["wall"],
                              busy=_cpu_busy_s() - window["busy"],
                              own=_own_cpu_s() - window["own"])

    def counted_stop(self: Any) -> int | None:
        METER.active = measured(self.step)  # the loop's per-step stop-flag all-reduce
        try:
            return agreed_stop(self)
        finally:
            METER.active = False

    trainer_cls.train_step = timed_step
    trainer_cls._agreed_stop = counted_stop
    trainer_cls.save = lambda self: self.run_dir  # the end-of-run checkpoint is not timed
    with run_tmp:
        result = trainer_mod.train(cfg)
    return {
        "steps": len(durations), "durations": durations, "window": window, "info": info,
        "final_loss": result.losses.get(result.step), "api": list(METER.api.values()),
        "pg_calls": METER.pg_calls, "pg_bytes": METER.pg_bytes,
        "longest_rows": METER.longest_rows, "local_rows": METER.local_rows,
        "traffic": METER.traffic,
        "threads": torch.get_num_threads(),
    }


# -- orchestration ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(layout: Layout, data: Path, warmup: int, steps: int) -> list[dict[str, Any]]:
    """Start ``layout.world`` fresh spawned ranks and return their results in rank order."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, layout.world, port, layout, str(data),
                                                      warmup, steps, out))
                 for r in range(layout.world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for rank, p in enumerate(procs):
            path = Path(out, f"rank{rank}.json")
            if not path.exists():
                log_path = Path(out, f"rank{rank}.log")
                log = log_path.read_text()[-4000:] if log_path.exists() else ""
                raise RuntimeError(f"{layout.key} rank {rank}: no result (exit {p.exitcode})\n"
                                   f"{log}")
            record = json.loads(path.read_text())
            if "error" in record:
                log = Path(out, f"rank{rank}.log").read_text()[-4000:]
                raise RuntimeError(f"{layout.key} rank {rank} failed:\n{record['error']}\n"
                                   f"rank {rank} output (tail):\n{log}")
            results.append(record["ok"])
        return results


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
    * the loop's stop flag (Trainer._agreed_stop), one int64 all-reduce:  8
    * the non-finite flags of loss and both gradient norms, one int32 all-reduce:  12
    """
    n_dense = dense_param_count(cfg)
    return [
        ("dense-grad all-reduce", "average_dense_grads", f"4 x {n_dense:,} dense params",
         4.0 * n_dense),
        _row_term(cfg, longest_rows),
        ("loss scalar", "average_scalar", "8 (fp64)", 8.0),
        ("stop flag (loop)", "_agreed_stop", "8 (int64)", 8.0),
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
    (max, target logit, sum of exps: 3 * B * L * 4), the gradient-norm float64 scalar (8), the
    loop's int64 stop flag (8) and its int32 non-finite flags (12). Memory layers are replicated
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
        ("stop flag (loop)", "_agreed_stop", "8 (int64)", 8.0),
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


def main() -> None:
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
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    repeats = args.repeats or (1 if args.quick else 3)
    if steps < 1 or warmup < 0 or repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")

    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    from memtron.config import load_config

    start = time.perf_counter()
    load0 = os.getloadavg()
    print(f"memtron parallel overhead: torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"load average {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} (1/5/15 min)")
    data, how, tmp = prepare_data()
    cfg = load_config(CONFIG, [f"data.seq_len={SEQ_LEN}"])
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


if __name__ == "__main__":
    main()
