"""The training loop: step, eval, log, checkpoint, signals.

One step = ``grad_accum`` micro-batches; dense gradients are clipped and applied by AdamW, the
value tables' row gradients by the sparse row-wise Adam. A step whose loss or gradient norms are
not finite on any rank is skipped on every rank, and ``train.max_bad_steps`` of them in a row
stop the run without checkpointing the diverged state. Checkpoints are taken between steps, so a
resumed run replays exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import statistics
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memtron.config import Config, ConfigError, architecture_diff, config_from_dict
from memtron.data.clustering import ClusterTree
from memtron.data.loader import Batch, ShardLoader, eval_batches
from memtron.data.prepare import INDEX_NAME, TREE_DIR
from memtron.data.synthetic import load_questions
from memtron.data.tokenizer import load_tokenizer
from memtron.model.forward import ExplicitKV, ForwardContext, autocast
from memtron.model.tables import ValueTable
from memtron.model.transformer import Transformer
from memtron.parallel.context import local_attention, zigzag_indices
from memtron.parallel.data_parallel import agree, average_scalar
from memtron.parallel.engine import build_dense_engine
from memtron.parallel.launch import (
    init_distributed,
    shutdown_distributed,
    to_backend,
    training_device,
)
from memtron.parallel.memory import (
    Traffic,
    reduce_table_grads,
    table_norm_share,
    tables_sharded,
)
from memtron.parallel.mesh import build_mesh, destroy_mesh
from memtron.parallel.parallelize import build_parallel_model
from memtron.parallel.sharding import CheckpointLayout
from memtron.parallel.state import ParallelState
from memtron.parallel.tensor import (
    gather_logits,
    is_tp_sharded,
    parallel_lm_loss,
)
from memtron.parallel.token_slice import GatherTraffic
from memtron.train.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    list_checkpoints,
    load_checkpoint,
    newest_valid_checkpoint,
    read_manifest,
    remove_stale_temp,
)
from memtron.train.explicit import (
    MEMORY_FIELD,
    MemoryPrefetcher,
    check_memory_field,
    open_training_memories,
)
from memtron.train.facts import fact_accuracy, question_paths
from memtron.train.metrics import MetricsLogger, flops_per_token
from memtron.train.optim import build_optimizers, clip_scale, lr_at, scale_sparse_grads, set_lr

# SIGUSR1 is SLURM's pre-emption warning (sbatch --signal=USR1@secs): checkpoint, requeue.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# The per-step stop flag's value when a background checkpoint write failed: above any signal.
WRITE_FAILED = 1 << 16
SPIKE_MIN_WINDOW = 10  # losses in the window before a z-score means anything


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped_by: int | None = None  # the signal that interrupted the run, if any
    skipped: list[int] = field(default_factory=list)  # steps whose update was non-finite
    diverged: str | None = None  # why the run stopped early on non-finite steps


def check_inputs(cfg: Config) -> None:
    """Fail before any work if the data or tokenizer does not fit the config."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size}")
    for key in ("train", "valid"):
        index_path = Path(getattr(cfg.data, key)) / INDEX_NAME
        if not index_path.is_file():
            raise ConfigError(f"data.{key}: no prepared shards at {index_path.parent} "
                              f"({INDEX_NAME} missing); run `memtron data prepare` first")
        index = json.loads(index_path.read_text())
        if index.get("tokenizer") != tokenizer.spec:
            raise ConfigError(f"data.tokenizer: {tokenizer.spec!r}, but {index_path} was "
                              f"tokenized with {index.get('tokenizer')!r}")
        if cfg.bank.layers and cfg.bank.levels:
            check_bank_data(cfg, index, index_path, f"data.{key}")
    if cfg.data.questions and not Path(cfg.data.questions).is_file():
        raise ConfigError(f"data.questions: {cfg.data.questions} does not exist")


def check_bank_data(cfg: Config, index: dict[str, Any], where: Path, key: str) -> None:
    """A bank needs every sample's tree path, from a tree of the bank's shape."""
    clusters = index.get("clusters") or {}
    if "bank_path" not in index.get("fields", {}):
        raise ConfigError(f"{key}: bank.layers is set but {where} has no bank_path field; "
                          "prepare the data with --clusters TREE_DIR (memtron data cluster)")
    tree = (clusters.get("levels"), clusters.get("branching"))
    if tree != (cfg.bank.levels, cfg.bank.branching):
        raise ConfigError(f"bank.levels: the bank is {cfg.bank.levels} levels x "
                          f"{cfg.bank.branching} branches, {where}'s tree is {tree[0]} x {tree[1]}")


def _same_architecture(saved: Config, cfg: Config, where: Path) -> None:
    diff = architecture_diff(saved, cfg)
    if diff is not None:
        key, old, new = diff
        raise CheckpointError(f"{where}: saved with {key}={old!r}, config has {new!r}; "
                              "architecture keys must match to resume")


class Trainer:
    """Expects the process group (if any) to be up: see :func:`train`."""

    def __init__(self, cfg: Config) -> None:
        check_inputs(cfg)
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.state: ParallelState = build_mesh(cfg)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.device = training_device(cfg.train.device)
        self.model: Transformer = build_parallel_model(cfg, self.state, self.device)
        self.positions = None  # this rank's token positions under context parallelism
        if self.state.cp > 1:
            self.positions = zigzag_indices(cfg.data.seq_len, self.state.cp,
                                            self.state.cp_rank).to(self.device)
        self.layout = CheckpointLayout(self.state)
        self.tables = dict(self.model.value_tables.items())
        # -- the dense engine (DDP | FSDP2 | ZeRO over dp x cp): wraps the dense weights before
        # their AdamW is built (FSDP2 replaces them), then takes that AdamW.
        self.engine = build_dense_engine(self.model, cfg, self.state)
        self.dense_opt, self.sparse_opt = build_optimizers(self.model, self.tables, cfg.optim,
                                                           cfg.bank.lr_mult)
        self.engine.attach(self.dense_opt)
        # --
        self.dense_params = [p for g in self.dense_opt.param_groups for p in g["params"]]
        self.loader = ShardLoader(cfg.data.train, cfg.data.micro_batch_size, cfg.data.seq_len,
                                  dp_rank=self.state.dp_rank, dp_size=self.state.dp,
                                  num_workers=cfg.data.num_workers, seed=cfg.train.seed)
        self.questions = load_questions(cfg.data.questions) if cfg.data.questions else []
        # A bank model answers each question with its prompt's path down the data's tree.
        tree = None
        if self.questions and cfg.bank.layers and cfg.bank.levels:
            tree = ClusterTree.load(Path(cfg.data.train) / TREE_DIR).expect_shape(
                cfg.bank.levels, cfg.bank.branching)
        self.question_paths = question_paths(tree, self.questions) if self.questions else None
        self.explicit = None  # explicit memories (memory.explicit.store), fetched per sample
        self.prefetcher: MemoryPrefetcher | None = None
        if cfg.memory.explicit.store:
            check_memory_field(self.loader, cfg, "data.train")
            self.explicit = open_training_memories(cfg, self.state)
        self.step = 0
        self._stop_signal: int | None = None
        self._stop_agreed: int | None = None  # the stop request of the last step, on all ranks
        self.checkpoints = CheckpointWriter(self.ckpt_root, cfg.checkpoint.keep_last,
                                            cfg.checkpoint.async_save, cfg.parallel.timeout_s)
        self.loss_window: deque[float] = deque(maxlen=cfg.train.loss_spike_window)
        n_dense = sum(p.numel() * (self.state.tp if is_tp_sharded(p) else 1)
                      for p in self.dense_params)  # the whole model's dense weights
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len, n_dense)

    # ----------------------------------------------------------------------- state
    def _tensor_state(self) -> dict[str, Any]:
        """Checkpoint tensors under single-process names; tp shards as DTensors. Views share
        storage with the live tensors, so a load writes straight into the model."""
        params = dict(self.model.named_parameters())
        model = {name: self.layout.view(t, params.get(name, t))
                 for name, t in self.model.state_dict().items()}
        if self.engine.own_optimizer_state:
            return {"model": model, "memory_optim": self._memory_optim_state()}
        dense = {id(p) for p in self.dense_params}
        optim = {}
        for name, param in params.items():
            if id(param) not in dense:
                continue
            state = self.dense_opt.state[param]
            if not state:  # AdamW's own lazy init, done early so a load has somewhere to go
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                             exp_avg_sq=torch.zeros_like(param))
            optim[name] = {"step": state["step"],
                           "exp_avg": self.layout.view(state["exp_avg"], param),
                           "exp_avg_sq": self.layout.view(state["exp_avg_sq"], param)}
        return {"model": model, "optim": optim, "memory_optim": self._memory_optim_state()}

    def _memory_optim_state(self) -> dict[str, Any]:
        """Sparse Adam moments live with their rows, sharded the way the table is."""
        state = self.sparse_opt.state_dict()
        return {name: {key: self.layout.view(value, self.tables[name].weight)
                       if value.dim() else value for key, value in moments.items()}
                for name, moments in state.items()}

    def save(self) -> Path:
        """Checkpoint this step (collective). With ``checkpoint.async_save`` it returns once the
        state is staged, and the write goes on in the background."""
        s = self.state
        data = self.prefetcher.state_dict() if self.prefetcher else self.loader.state_dict()
        meta = {"config": self.cfg.to_dict(), "data_state": data,
                "layout": {"world_size": s.world_size, "tp": s.tp, "cp": s.cp, "dp": s.dp,
                           "ep": s.ep},
                "loss_window": list(self.loss_window)}
        files = None
        if self.engine.own_optimizer_state:  # ZeRO keeps its own (partitioned) AdamW state
            meta["engine"] = self.engine.name
            files = self.engine.checkpoint_files()
        return self.checkpoints.save(self.step, self._tensor_state(), meta, files)

    def _resume_path(self) -> tuple[Path | None, bool, list[str]]:
        """(checkpoint to resume from, already verified, warnings). ``auto`` takes the newest
        checkpoint that verifies; an explicit path is never replaced by another."""
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None, False, []
        if resume != "auto":
            return Path(resume), False, []
        path, skipped = newest_valid_checkpoint(self.ckpt_root, self.checkpoints.group)
        if skipped:
            target = f"resuming from {path.name}" if path else "no valid checkpoint: starting " \
                "from scratch"
            skipped = [f"warning: {line}" for line in skipped] + [f"warning: {target}"]
        return path, True, skipped

    def load(self, path: Path, verify: bool = True) -> None:
        manifest = read_manifest(path)
        _same_architecture(config_from_dict(manifest["config"]), self.cfg, path)
        # DDP and FSDP2 checkpoints are the same DCP tensors; ZeRO adds its own partitions.
        saved = manifest.get("engine", "ddp")
        if (saved == "deepspeed") != self.engine.own_optimizer_state:
            raise CheckpointError(f"{path}: written by the {saved} engine, config has "
                                  f"train.engine={self.cfg.train.engine}")
        load_checkpoint(path, self._tensor_state(), verify)  # in place: views share storage
        self.engine.load(path)
        self.loader.load_state_dict(manifest["data_state"])
        self.loss_window.extend(manifest.get("loss_window", []))
        self.step = manifest["step"]

    # ----------------------------------------------------------------------- steps
    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.cfg.train.dtype)

    def _loss(self, batch: Batch, explicit: ExplicitKV | None = None) -> torch.Tensor:
        """Mean next-token loss over this rank's tokens of a [B, L + 1] batch (its zigzag
        chunks under context parallelism; the vocab shard under tensor parallelism).
        ``batch.fields`` holds the per-sample fields (e.g. ``bank_path`` [B, levels]);
        ``explicit`` the memories of its chunks (continual stage of explicit memory)."""
        tokens = batch.tokens.to(self.device, non_blocking=True)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if self.positions is not None:
            inputs, targets = inputs[:, self.positions], targets[:, self.positions]
        with self._autocast():
            logits = self.engine.module(inputs, ForwardContext(
                positions=self.positions, bank_path=batch.fields.get("bank_path"),
                explicit=explicit))
        return parallel_lm_loss(logits, targets, self.state)

    def train_step(self, batches: Iterator[tuple[Batch, ExplicitKV | None]]) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` items of ``batches`` (from :meth:`batches`).
        Its only host sync is reading the step's control collective (see :meth:`_agree`)."""
        cfg = self.cfg
        lr = lr_at(self.step + 1, cfg.train.steps, cfg.optim)
        set_lr(self.dense_opt, self.sparse_opt, lr, cfg.optim.memory_lr_mult)
        self.engine.set_lr(lr)
        self.model.train()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(cfg.train.grad_accum):
            with self.engine.micro_batch(last=i == cfg.train.grad_accum - 1):
                loss = self._loss(*next(batches))
                self.engine.backward(loss, cfg.train.grad_accum)
            total += loss.detach()  # a tensor: no host sync per micro-batch
        tables = list(self.tables.values())
        reduce_table_grads(tables, cfg, self.state)
        values = self._agree(total / cfg.train.grad_accum, tables)
        bad = [k for k in ("loss", "grad_norm", "memory_grad_norm") if not math.isfinite(values[k])]
        metrics: dict[str, Any] = {"lr": lr, **values}
        if bad:
            metrics["skipped"] = 1
            metrics["nonfinite"] = "non-finite " + ", ".join(
                f"{k} ({values[k]})" for k in bad) + self._nonfinite_grads()
        else:
            scale = clip_scale(values["grad_norm"], cfg.optim.grad_clip)
            if scale is not None:
                self.engine.clip_(scale)
            scale = clip_scale(values["memory_grad_norm"], cfg.optim.memory_grad_clip)
            if scale is not None:
                scale_sparse_grads(tables, scale)
            self.engine.step()
            self.sparse_opt.step()
        self.engine.zero_grad()
        self.sparse_opt.zero_grad()
        self.step += 1
        if self.explicit is not None:
            metrics.update({f"explicit/{k}": v for k, v in self.explicit.stats().items()})
        return {**metrics, **self._memory_traffic(values.pop("loads"))}

    def _agree(self, loss: torch.Tensor, tables: list[ValueTable]) -> dict[str, Any]:
        """What every rank must know after the backward, in one small all-reduce (the step's
        control collective, and its one host sync: each rank needs the non-finite flags before
        the update): the mean loss over dp x cp, the global dense and row gradient norms (NaN
        where a gradient is not finite on some rank, so that every rank skips the same
        steps), the stop request (signal, or a failed background write), and with sharded
        tables each rank's served lookups."""
        dense_sq, dense_bad = self.engine.grad_norm_share()
        table_sq, table_bad = table_norm_share(tables, self.cfg, self.state)
        loss_share = loss if self.state.tp_rank == 0 else torch.zeros_like(loss)
        stop = WRITE_FAILED if self.checkpoints.failed() else (self._stop_signal or 0)
        served = sum(t.take_served() for t in tables)
        (loss_sum, dense_sq, table_sq, dense_bad, table_bad), (stops, loads) = agree(
            [loss_share, dense_sq, table_sq, dense_bad, table_bad], [stop, served])
        self._stop_agreed = int(max(stops)) or None
        return {"loss": loss_sum / (self.state.dp * self.state.cp),
                "grad_norm": math.nan if dense_bad else math.sqrt(dense_sq),
                "memory_grad_norm": math.nan if table_bad else math.sqrt(table_sq),
                "loads": loads}

    def _nonfinite_grads(self) -> str:
        """Which dense weights and value tables hold non-finite gradients on any rank: the
        diagnostic of a bad step (a pass over the gradients, so only then)."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        grads = [(names[id(p)], g) for p, g in self.engine.local_grads()]
        for name, table in self.tables.items():
            sparse = table.sparse_grad()
            grads.append((f"value table {name}", sparse[1] if sparse is not None else None))
        flags = to_backend(torch.tensor([g is not None and not bool(torch.isfinite(g).all())
                                         for _, g in grads], dtype=torch.int32))
        if self.state.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        names = [name for (name, _), flag in zip(grads, flags.tolist()) if flag]
        if not names:
            return ""
        more = f" and {len(names) - 6} more" if len(names) > 6 else ""
        return f"; non-finite gradients in {', '.join(names[:6])}{more}"

    def _loss_z(self, loss: float) -> float | None:
        """How many standard deviations ``loss`` lies above the running window, which it then
        joins. The spread is floored at 0.1% of the mean so a flat window does not cry wolf."""
        window = self.loss_window
        z = None
        if window.maxlen and len(window) >= min(SPIKE_MIN_WINDOW, window.maxlen):
            mean = statistics.fmean(window)
            z = (loss - mean) / max(statistics.pstdev(window), 1e-3 * abs(mean), 1e-12)
        window.append(loss)
        return z

    def _memory_traffic(self, served: list[float]) -> dict[str, float]:
        """Memory-parallel load per step: bytes this rank exchanged per token it looked up,
        and how unevenly hits landed on the owners (max / mean over ranks of the lookups each
        rank ``served``)."""
        sent, received = Traffic.take()
        tp_gathered, _ = GatherTraffic.take()  # tp all-gathers of token-sliced lookups
        if not self.tables or not tables_sharded(self.cfg, self.state):
            return {}
        loads = torch.tensor(served)
        cfg = self.cfg
        lookups = (cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum
                   * max(1, len(self.model.memory_layers()) + len(cfg.bank.layers)))
        return {"memory/bytes_sent_per_token": sent / lookups,
                "memory/bytes_received_per_token": received / lookups,
                "memory/tp_gather_bytes_per_token": tp_gathered / lookups,
                "memory/hit_imbalance": float(loads.max() / loads.mean().clamp_min(1e-9))}

    def evaluate(self) -> dict[str, Any]:
        with self.engine.evaluating():
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.eval()
        losses = []
        for batch in eval_batches(cfg.data.valid, cfg.data.micro_batch_size, cfg.data.seq_len,
                                  cfg.train.eval_batches, dp_rank=self.state.dp_rank,
                                  dp_size=self.state.dp):
            explicit = None  # memories in the continual stage, if the shards name them
            if (self.explicit is not None and self.step >= cfg.memory.explicit.start_step
                    and MEMORY_FIELD in batch.fields):
                explicit = self.explicit.kv(batch.fields[MEMORY_FIELD], self.device,
                                            self.positions)
            losses.append(self._loss(batch, explicit).double())
        result: dict[str, Any] = {}
        if losses:
            result["loss"] = average_scalar(float(torch.stack(losses).mean()),
                                            self.state.dp_cp_group)
            result["perplexity"] = math.exp(min(result["loss"], 50.0))
        if self.questions:
            def logits_fn(tokens: torch.Tensor,
                          bank_path: torch.Tensor | None = None) -> torch.Tensor:
                with self._autocast():
                    logits = self.engine.module(tokens.to(self.device),
                                                ForwardContext(bank_path=bank_path))
                    return gather_logits(logits, self.state).float()

            with local_attention(self.model):  # questions are whole sequences on every rank
                accuracy = fact_accuracy(logits_fn, self.tokenizer, self.questions,
                                         max_len=cfg.model.max_seq_len,
                                         bank_paths=self.question_paths)
            result.update({f"fact_acc/{k}": v for k, v in accuracy.items()})
        self.model.train()
        return result

    # ----------------------------------------------------------------------- loop
    def batches(self) -> Iterator[tuple[Batch, ExplicitKV | None]]:
        """(batch, its explicit memories or None) from where the loader stands; with explicit
        memories configured, through the prefetching loader (memories from start_step on)."""
        if self.explicit is None:
            return ((batch, None) for batch in self.loader)
        x = self.cfg.memory.explicit
        self.prefetcher = MemoryPrefetcher(self.loader, self.explicit, x.start_step,
                                           self.cfg.train.grad_accum, x.prefetch, self.device,
                                           self.positions)
        return iter(self.prefetcher)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _agreed_stop(self) -> int | None:
        """Ranks may see a signal at different steps; all stop after the first step whose
        control collective (:meth:`_agree`) carried one. A background checkpoint write that
        failed is raised here, on every rank alike."""
        if self._stop_agreed == WRITE_FAILED:
            self.checkpoints.wait()  # raises the write's CheckpointError
        return self._stop_agreed

    def _divergence(self, bad_streak: int, detail: str) -> str:
        """The diagnostic of a run stopped on non-finite steps (after any write in flight)."""
        self.checkpoints.wait()
        newest = list_checkpoints(self.ckpt_root)
        advice = (f"the newest is {newest[-1]}: resume from it with a lower optim.lr or a "
                  "tighter optim.grad_clip") if newest else "there is no checkpoint"
        return (f"training diverged: {bad_streak} steps in a row up to step {self.step} were "
                f"non-finite (train.max_bad_steps={self.cfg.train.max_bad_steps}); at step "
                f"{self.step}: {detail}. No checkpoint was written from the diverged state; "
                f"{advice}")

    def _checkpoint(self, log: MetricsLogger, bad_streak: int) -> Path | None:
        """Save unless the last step was non-finite (a diverging state is never checkpointed,
        so ``keep_last`` never rotates a good checkpoint out for it); report the blocked time."""
        if bad_streak:
            log.print(f"checkpoint at step {self.step} not written: the last {bad_streak} "
                      "step(s) were non-finite")
            return None
        start = time.perf_counter()
        path = self.save()
        blocked = time.perf_counter() - start
        log.log("checkpoint", self.step, {"blocked_s": blocked})
        how = " (writing in the background)" if self.checkpoints.asynchronous else ""
        log.print(f"checkpoint {path.name}: training blocked {blocked:.2f} s{how}")
        return path

    def run(self) -> TrainResult:
        cfg = self.cfg
        notes = remove_stale_temp(self.ckpt_root) if self.state.is_main else []
        resume, verified, skipped = self._resume_path()
        if resume is not None:
            self.load(resume, verify=not verified)
        result = TrainResult(self.run_dir, self.step)
        log = MetricsLogger(self.run_dir, cfg, self.step, enabled=self.state.is_main)
        self.checkpoints.log = log.print
        n_params = sum(p.numel() for p in self.model.parameters())
        n_memory = sum(t.weight.numel() for t in self.tables.values())
        tokens_per_step = (cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum
                           * self.state.dp)
        log.print(f"memtron: {n_params / 1e6:.2f}M parameters ({n_memory / 1e6:.2f}M in "
                  f"{len(self.tables)} value table(s), {len(self.model.memory_layers())} memory "
                  f"layer(s)); {tokens_per_step} tokens/step; "
                  f"{self.state.describe()}; run dir {self.run_dir}")
        for line in notes + skipped:
            log.print(line)
        if resume is not None:
            log.print(f"resumed from {resume} at step {self.step}")
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        batches = self.batches()
        bad_streak = 0
        try:
            stop = None
            while self.step < cfg.train.steps and stop is None:
                start = time.perf_counter()
                metrics = self.train_step(batches)
                elapsed = time.perf_counter() - start
                metrics["tokens_per_s"] = tokens_per_step / elapsed
                metrics["tflops"] = metrics["tokens_per_s"] * self.flops_per_token / 1e12
                if self.step % cfg.memory.usage_window == 0:
                    for name, table in self.tables.items():
                        metrics.update({f"{name}/{k}": v for k, v in table.usage().items()})
                bad_streak = bad_streak + 1 if "skipped" in metrics else 0
                z = None if bad_streak else self._loss_z(metrics["loss"])
                if z is not None:
                    metrics["loss_z"] = z
                result.losses[self.step] = metrics["loss"]
                log.log("train", self.step, metrics)
                log.progress(self.step, metrics["loss"], metrics["tokens_per_s"])
                if bad_streak:
                    result.skipped.append(self.step)
                    log.print(f"step {self.step}: {metrics['nonfinite']}; update skipped "
                              f"({bad_streak} in a row, train.max_bad_steps="
                              f"{cfg.train.max_bad_steps})")
                    if bad_streak >= cfg.train.max_bad_steps:
                        result.diverged = self._divergence(bad_streak, metrics["nonfinite"])
                        break
                elif z is not None and z > cfg.train.loss_spike_z:
                    log.print(f"step {self.step}: loss spike, {metrics['loss']:.4f} is {z:.1f} "
                              "standard deviations above the running mean")
                if self.step % cfg.train.log_every == 0 and not cfg.logging.progress:
                    log.print(f"step {self.step} loss {metrics['loss']:.4f} "
                              f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:,.0f} tok/s")
                is_last = self.step == cfg.train.steps
                if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or is_last):
                    evaluation = self.evaluate()
                    result.evals[self.step] = evaluation
                    log.log("eval", self.step, evaluation)
                    log.print(f"eval @ {self.step}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in evaluation.items()))
                every = cfg.checkpoint.every
                if is_last or (every and self.step % every == 0):
                    result.checkpoint = self._checkpoint(log, bad_streak) or result.checkpoint
                stop = self._agreed_stop()
            if stop is not None:
                result.stopped_by = stop
                result.checkpoint = self._checkpoint(log, bad_streak) or result.checkpoint
                log.print(f"stopped by signal {stop} at step {self.step}; "
                          f"checkpoint {result.checkpoint}")
                if stop == signal.SIGUSR1 and self.state.is_main:
                    from memtron.slurm import requeue_current_job

                    log.print(requeue_current_job())
        finally:
            if self.prefetcher is not None:
                self.prefetcher.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            try:
                self.checkpoints.wait()  # a background write lands (or raises) before the end
            finally:
                log.close()
        result.step = self.step
        return result


def train(cfg: Config) -> TrainResult:
    """Run a training job in this process: one rank of a launched job, or the whole job."""
    init_distributed(cfg.parallel.timeout_s, cfg.parallel.backend, cfg.train.device)
    try:
        return Trainer(cfg).run()
    finally:
        destroy_mesh()
        shutdown_distributed()
