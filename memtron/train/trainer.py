"""The training loop: step, eval, log, checkpoint, signals.

One step = ``grad_accum`` micro-batches; dense gradients are clipped and applied by AdamW, the
value tables' row gradients by the sparse row-wise Adam. Checkpoints are taken between steps,
so a resumed run replays exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memtron.config import Config, ConfigError, config_from_dict
from memtron.data.loader import ShardLoader, eval_batches
from memtron.data.prepare import INDEX_NAME
from memtron.data.synthetic import load_questions
from memtron.data.tokenizer import load_tokenizer
from memtron.model.forward import ForwardContext, autocast
from memtron.model.transformer import Transformer, build_model
from memtron.parallel.context import local_attention, parallelize_context, zigzag_indices
from memtron.parallel.data_parallel import DeepSpeedZero, average_dense_grads, average_scalar
from memtron.parallel.launch import (
    init_distributed,
    shutdown_distributed,
    to_backend,
    training_device,
)
from memtron.parallel.memory import (
    Traffic,
    norm_group,
    reduce_table_grads,
    table_factory,
    tables_sharded,
)
from memtron.parallel.sharding import CheckpointLayout
from memtron.parallel.state import ParallelState, build_parallel_state, destroy_parallel_state
from memtron.parallel.tensor import (
    clip_grad_norm,
    gather_logits,
    is_tp_sharded,
    parallel_lm_loss,
    parallelize_tensor,
)
from memtron.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from memtron.train.evaluate import fact_accuracy
from memtron.train.metrics import MetricsLogger, flops_per_token
from memtron.train.optim import (
    build_optimizers,
    clip_sparse_grad_norm,
    lr_at,
    set_lr,
)

# SIGUSR1 is SLURM's pre-emption warning (sbatch --signal=USR1@secs): checkpoint, requeue.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped_by: int | None = None  # the signal that interrupted the run, if any


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
    if cfg.data.questions and not Path(cfg.data.questions).is_file():
        raise ConfigError(f"data.questions: {cfg.data.questions} does not exist")


def _same_architecture(saved: Config, cfg: Config, where: Path) -> None:
    layout_only = {"parallel", "usage_window"}  # how tables are spread, not what they hold
    for section in ("model", "memory"):
        old, new = getattr(saved, section).__dict__, getattr(cfg, section).__dict__
        diff = [k for k in new if k not in layout_only and old.get(k) != new[k]]
        if diff:
            key = f"{section}.{diff[0]}"
            raise CheckpointError(f"{where}: saved with {key}={old.get(diff[0])!r}, config has "
                                  f"{new[diff[0]]!r}; architecture keys must match to resume")


class Trainer:
    """Expects the process group (if any) to be up: see :func:`train`."""

    def __init__(self, cfg: Config) -> None:
        check_inputs(cfg)
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.state: ParallelState = build_parallel_state(
            cfg, timeout_minutes=max(1, math.ceil(cfg.parallel.timeout_s / 60)))
        mem = cfg.memory
        if mem.parallel == "colwise" and (mem.value_dim or cfg.model.d_model) % self.state.ep:
            raise ConfigError(f"memory.value_dim: {mem.value_dim or cfg.model.d_model} is not "
                              f"divisible by ep={self.state.ep} (memory.parallel=colwise)")
        torch.manual_seed(cfg.train.seed)  # the same full init on every rank, then sharded
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.device = training_device()
        model = build_model(cfg, table_factory(cfg, self.state))
        self.model: Transformer = parallelize_context(parallelize_tensor(model, self.state),
                                                      self.state).to(self.device)
        self.positions = None  # this rank's token positions under context parallelism
        if self.state.cp > 1:
            self.positions = zigzag_indices(cfg.data.seq_len, self.state.cp,
                                            self.state.cp_rank).to(self.device)
        self.layout = CheckpointLayout(self.state)
        self.tables = dict(self.model.value_tables.items())
        self.dense_opt, self.sparse_opt = build_optimizers(self.model, self.tables, cfg.optim)
        self.dense_params = [p for g in self.dense_opt.param_groups for p in g["params"]]
        self.zero: DeepSpeedZero | None = None
        if cfg.train.engine == "deepspeed":
            self.zero = DeepSpeedZero(self.model, self.dense_opt, cfg.train.zero_stage,
                                      cfg.data.micro_batch_size, cfg.train.grad_accum,
                                      cfg.optim.grad_clip)
        self.loader = ShardLoader(cfg.data.train, cfg.data.micro_batch_size, cfg.data.seq_len,
                                  dp_rank=self.state.dp_rank, dp_size=self.state.dp,
                                  num_workers=cfg.data.num_workers, seed=cfg.train.seed)
        self.questions = load_questions(cfg.data.questions) if cfg.data.questions else []
        self.step = 0
        self._stop_signal: int | None = None
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
        if self.zero is not None:
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
        s = self.state
        meta = {"config": self.cfg.to_dict(), "data_state": self.loader.state_dict(),
                "layout": {"world_size": s.world_size, "tp": s.tp, "cp": s.cp, "dp": s.dp,
                           "ep": s.ep}}
        if self.zero is not None:  # ZeRO keeps its own (partitioned) AdamW state
            meta["engine"] = "deepspeed"
        return save_checkpoint(self.ckpt_root, self.step, self._tensor_state(), meta,
                               self.cfg.checkpoint.keep_last,
                               write_extra=self.zero.save if self.zero is not None else None)

    def resume_path(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            return latest_checkpoint(self.ckpt_root)
        return Path(resume)

    def load(self, path: Path) -> None:
        manifest = read_manifest(path)
        _same_architecture(config_from_dict(manifest["config"]), self.cfg, path)
        if manifest.get("engine", "native") != self.cfg.train.engine:
            raise CheckpointError(f"{path}: written by the {manifest.get('engine', 'native')} "
                                  f"engine, config has train.engine={self.cfg.train.engine}")
        load_checkpoint(path, self._tensor_state())  # in place: views share storage
        if self.zero is not None:
            self.zero.load(path)
        self.loader.load_state_dict(manifest["data_state"])
        self.step = manifest["step"]

    # ----------------------------------------------------------------------- steps
    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.cfg.train.dtype)

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss over this rank's tokens of a [B, L + 1] batch (its zigzag
        chunks under context parallelism; the vocab shard under tensor parallelism)."""
        tokens = tokens.to(self.device, non_blocking=True)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if self.positions is not None:
            inputs, targets = inputs[:, self.positions], targets[:, self.positions]
        with self._autocast():
            logits = self.model(inputs, ForwardContext(positions=self.positions))
        return parallel_lm_loss(logits, targets, self.state)

    def train_step(self, batches) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(self.step + 1, cfg.train.steps, cfg.optim)
        set_lr(self.dense_opt, self.sparse_opt, lr, cfg.optim.memory_lr_mult)
        if self.zero is not None:
            self.zero.set_lr(lr)
        self.model.train()
        total = 0.0
        for _ in range(cfg.train.grad_accum):
            loss = self._loss(next(batches))
            if self.zero is not None:
                self.zero.backward(loss)  # applies the dense update at the last micro-batch
            else:
                (loss / cfg.train.grad_accum).backward()
            total += loss.item()
        if self.zero is not None:
            grad_norm = self.zero.grad_norm()
        else:
            average_dense_grads(self.dense_params, self.state.dp_cp_group)
            grad_norm = clip_grad_norm(self.dense_params, cfg.optim.grad_clip, self.state)
            self.dense_opt.step()
            self.dense_opt.zero_grad(set_to_none=True)
        tables = list(self.tables.values())
        reduce_table_grads(tables, cfg, self.state)
        memory_norm = clip_sparse_grad_norm(tables, cfg.optim.memory_grad_clip,
                                            norm_group(cfg, self.state))
        self.sparse_opt.step()
        self.sparse_opt.zero_grad()
        self.step += 1
        loss = average_scalar(total / cfg.train.grad_accum, self.state.dp_cp_group)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "memory_grad_norm": memory_norm,
                **self._memory_traffic()}

    def _memory_traffic(self) -> dict[str, float]:
        """Memory-parallel load per step: bytes this rank exchanged per token it looked up,
        and how unevenly hits landed on the owners (max / mean over ranks)."""
        sent, received = Traffic.take()
        served = sum(t.take_served() for t in self.tables.values())
        if not self.tables or not tables_sharded(self.cfg, self.state):
            return {}
        per_rank = to_backend(torch.tensor([float(served)]))
        gathered = [torch.empty_like(per_rank) for _ in range(self.state.world_size)]
        dist.all_gather(gathered, per_rank)
        loads = torch.cat(gathered)
        cfg = self.cfg
        lookups = (cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum
                   * len(self.model.memory_layers()))
        return {"memory/bytes_sent_per_token": sent / lookups,
                "memory/bytes_received_per_token": received / lookups,
                "memory/hit_imbalance": float(loads.max() / loads.mean().clamp_min(1e-9))}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.eval()
        losses = []
        for tokens in eval_batches(cfg.data.valid, cfg.data.micro_batch_size, cfg.data.seq_len,
                                   cfg.train.eval_batches, dp_rank=self.state.dp_rank,
                                   dp_size=self.state.dp):
            losses.append(self._loss(tokens).item())
        result: dict[str, Any] = {}
        if losses:
            result["loss"] = average_scalar(sum(losses) / len(losses), self.state.dp_cp_group)
            result["perplexity"] = math.exp(min(result["loss"], 50.0))
        if self.questions:
            def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
                with self._autocast():
                    return gather_logits(self.model(tokens.to(self.device)), self.state).float()

            with local_attention(self.model):  # questions are whole sequences on every rank
                accuracy = fact_accuracy(logits_fn, self.tokenizer, self.questions,
                                         max_len=cfg.model.max_seq_len)
            result.update({f"fact_acc/{k}": v for k, v in accuracy.items()})
        self.model.train()
        return result

    # ----------------------------------------------------------------------- loop
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _agreed_stop(self) -> int | None:
        """Ranks may see a signal at different steps; all stop at the first step any saw it."""
        if self.state.world_size == 1:
            return self._stop_signal
        flag = to_backend(torch.tensor([self._stop_signal or 0]))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def run(self) -> TrainResult:
        cfg = self.cfg
        resume = self.resume_path()
        if resume is not None:
            self.load(resume)
        result = TrainResult(self.run_dir, self.step)
        log = MetricsLogger(self.run_dir, cfg, self.step, enabled=self.state.is_main)
        n_params = sum(p.numel() for p in self.model.parameters())
        n_memory = sum(t.weight.numel() for t in self.tables.values())
        tokens_per_step = (cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum
                           * self.state.dp)
        log.print(f"memtron: {n_params / 1e6:.2f}M parameters ({n_memory / 1e6:.2f}M in "
                  f"{len(self.tables)} value table(s), {len(self.model.memory_layers())} memory "
                  f"layer(s)); {tokens_per_step} tokens/step; "
                  f"{self.state.describe()}; run dir {self.run_dir}")
        if resume is not None:
            log.print(f"resumed from {resume} at step {self.step}")
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        batches = iter(self.loader)
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
                result.losses[self.step] = metrics["loss"]
                log.log("train", self.step, metrics)
                log.progress(self.step, metrics["loss"], metrics["tokens_per_s"])
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
                    result.checkpoint = self.save()
                stop = self._agreed_stop()
            if stop is not None:
                result.stopped_by = stop
                result.checkpoint = self.save()
                log.print(f"stopped by signal {stop} at step {self.step}; "
                          f"checkpoint {result.checkpoint}")
                if stop == signal.SIGUSR1 and self.state.is_main:
                    from memtron.slurm import requeue_current_job

                    log.print(requeue_current_job())
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            log.close()
        result.step = self.step
        return result


def train(cfg: Config) -> TrainResult:
    """Run a training job in this process: one rank of a launched job, or the whole job."""
    init_distributed(cfg.parallel.timeout_s, cfg.parallel.backend)
    try:
        return Trainer(cfg).run()
    finally:
        destroy_parallel_state()
        shutdown_distributed()
