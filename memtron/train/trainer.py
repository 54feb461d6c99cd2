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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from memtron.config import Config, ConfigError, config_from_dict
from memtron.data.loader import ShardLoader, eval_batches
from memtron.data.prepare import INDEX_NAME
from memtron.data.synthetic import load_questions
from memtron.data.tokenizer import load_tokenizer
from memtron.model.transformer import Transformer, build_model, lm_loss
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

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    for section in ("model", "memory"):
        old, new = getattr(saved, section).__dict__, getattr(cfg, section).__dict__
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            key = f"{section}.{diff[0]}"
            raise CheckpointError(f"{where}: saved with {key}={old.get(diff[0])!r}, config has "
                                  f"{new[diff[0]]!r}; architecture keys must match to resume")


class Trainer:
    def __init__(self, cfg: Config) -> None:
        check_inputs(cfg)
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.model: Transformer = build_model(cfg)
        self.tables = dict(self.model.value_tables.items())
        self.dense_opt, self.sparse_opt = build_optimizers(self.model, self.tables, cfg.optim)
        self.loader = ShardLoader(cfg.data.train, cfg.data.micro_batch_size, cfg.data.seq_len,
                                  num_workers=cfg.data.num_workers, seed=cfg.train.seed)
        self.questions = load_questions(cfg.data.questions) if cfg.data.questions else []
        self.step = 0
        self._stop_signal: int | None = None
        n_dense = sum(p.numel() for g in self.dense_opt.param_groups for p in g["params"])
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len, n_dense)

    # ----------------------------------------------------------------------- state
    def _tensor_state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.dense_opt)
        return {"model": model_sd, "optim": optim_sd, "memory_optim": self.sparse_opt.state_dict()}

    def save(self) -> Path:
        meta = {"config": self.cfg.to_dict(), "data_state": self.loader.state_dict(),
                "world_size": 1}
        return save_checkpoint(self.ckpt_root, self.step, self._tensor_state(), meta,
                               self.cfg.checkpoint.keep_last)

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
        state = self._tensor_state()
        load_checkpoint(path, state)
        set_state_dict(self.model, self.dense_opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.sparse_opt.load_state_dict(state["memory_optim"])
        self.loader.load_state_dict(manifest["data_state"])
        self.step = manifest["step"]

    # ----------------------------------------------------------------------- steps
    def _autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.cfg.train.dtype == "bf16"
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)

    def train_step(self, batches) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(self.step + 1, cfg.train.steps, cfg.optim)
        set_lr(self.dense_opt, self.sparse_opt, lr, cfg.optim.memory_lr_mult)
        self.model.train()
        total = 0.0
        for _ in range(cfg.train.grad_accum):
            tokens = next(batches)
            with self._autocast():
                logits = self.model(tokens[:, :-1])
            loss = lm_loss(logits, tokens[:, 1:])
            (loss / cfg.train.grad_accum).backward()
            total += loss.item()
        dense_params = [p for g in self.dense_opt.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            dense_params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        memory_norm = clip_sparse_grad_norm(self.tables.values(), cfg.optim.memory_grad_clip)
        self.dense_opt.step()
        self.sparse_opt.step()
        self.dense_opt.zero_grad(set_to_none=True)
        self.sparse_opt.zero_grad()
        self.step += 1
        return {"loss": total / cfg.train.grad_accum, "lr": lr, "grad_norm": float(grad_norm),
                "memory_grad_norm": memory_norm}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.eval()
        losses = []
        for tokens in eval_batches(cfg.data.valid, cfg.data.micro_batch_size, cfg.data.seq_len,
                                   cfg.train.eval_batches):
            with self._autocast():
                logits = self.model(tokens[:, :-1])
            losses.append(lm_loss(logits, tokens[:, 1:]).item())
        result: dict[str, Any] = {}
        if losses:
            result["loss"] = sum(losses) / len(losses)
            result["perplexity"] = math.exp(min(result["loss"], 50.0))
        if self.questions:
            def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
                with self._autocast():
                    return self.model(tokens).float()

            accuracy = fact_accuracy(logits_fn, self.tokenizer, self.questions,
                                     max_len=cfg.model.max_seq_len)
            result.update({f"fact_acc/{k}": v for k, v in accuracy.items()})
        self.model.train()
        return result

    # ----------------------------------------------------------------------- loop
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def run(self) -> TrainResult:
        cfg = self.cfg
        resume = self.resume_path()
        if resume is not None:
            self.load(resume)
        result = TrainResult(self.run_dir, self.step)
        log = MetricsLogger(self.run_dir, cfg, self.step)
        n_params = sum(p.numel() for p in self.model.parameters())
        n_memory = sum(t.weight.numel() for t in self.tables.values())
        tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum
        log.print(f"memtron: {n_params / 1e6:.2f}M parameters ({n_memory / 1e6:.2f}M in "
                  f"{len(self.tables)} value table(s), {len(self.model.memory_layers())} memory "
                  f"layer(s)); {tokens_per_step} tokens/step; run dir {self.run_dir}")
        if resume is not None:
            log.print(f"resumed from {resume} at step {self.step}")
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        batches = iter(self.loader)
        try:
            while self.step < cfg.train.steps and self._stop_signal is None:
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
            if self._stop_signal is not None:
                result.stopped_by = self._stop_signal
                result.checkpoint = self.save()
                log.print(f"stopped by signal {self._stop_signal} at step {self.step}; "
                          f"checkpoint {result.checkpoint}")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            log.close()
        result.step = self.step
        return result


def train(cfg: Config) -> TrainResult:
    return Trainer(cfg).run()
