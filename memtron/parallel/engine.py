"""The dense engine: how the dense weights' gradients meet across the dp x cp ranks.

One interface, three engines (config ``train.engine``), each averaging the dense gradient over
the dp x cp group (cp ranks see other tokens of the same sequences, so they average too; tp
shards average with their own shard's replicas only):

* ``ddp``: torch ``DistributedDataParallel``: buckets all-reduced while the backward runs
  (overlapped); under gradient accumulation only the last micro-batch reduces (``no_sync``).
* ``fsdp2``: torch ``fully_shard``: parameters, gradients and AdamW state sharded over dp x cp;
  each block gathered for its forward and backward, its gradient reduce-scattered.
* ``deepspeed``: DeepSpeed ZeRO-1/2 (optimizer state, and with stage 2 gradients, partitioned).

Value tables are none of their business: their rows train with the sparse optimizer and their
own exchange (parallel/memory.py). The engines see a :class:`DenseView` of the model, a module
holding every child but ``value_tables``, so tables are never broadcast, bucketed or sharded
(public APIs only; no ignore lists). Without dp x cp replicas (one process, or tp alone) no
wrapper is applied.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memtron.config import Config
from memtron.parallel.launch import collective_device
from memtron.parallel.state import ParallelState
from memtron.parallel.tensor import is_tp_sharded

BUCKET_MB = 25  # DDP's default bucket size


class DenseView(nn.Module):
    """The model's dense part as a module: every child of ``model`` but ``value_tables``, under
    the same names; its forward runs the whole model (which reaches its tables through its
    own references)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if next(model.parameters(recurse=False), None) is not None:
            raise ValueError("DenseView: the model holds parameters outside its submodules; "
                             "the engine would leave them unsynchronised")
        for name, child in model.named_children():
            if name != "value_tables":
                self.add_module(name, child)
        self._model = [model]  # a list: not a submodule, so its tables stay out of this module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._model[0](*args, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local shard, or ``t`` itself)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class DenseEngine:
    """Dense weights with no dp x cp replicas: plain backward and AdamW step. The base of the
    replicated engines, which change how gradients are reduced and who counts in the norm."""

    name = "local"
    # The AdamW state lives in the engine's own files (``checkpoint_files``), not in DCP.
    own_optimizer_state = False

    def __init__(self, model: nn.Module, state: ParallelState) -> None:
        self.model, self.state = model, state
        self.module: nn.Module = model  # what forwards run through
        self.optimizer: torch.optim.Optimizer | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """The AdamW over the dense parameters, built after wrapping (FSDP2 replaces them)."""
        self.optimizer = optimizer

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward; gradients are reduced only in the
        ``last`` of a step's micro-batches."""
        yield

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Around forwards without a backward (evaluation)."""
        yield

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        (loss / grad_accum).backward()

    def local_grads(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(parameter, this rank's part of its gradient) for every dense parameter."""
        return [(p, None if p.grad is None else _local(p.grad)) for p in self.params()]

    def _counts_replicas(self) -> bool:
        """Whether this rank's gradient counts in the global norm: one replica of the dense
        weights per tp group (here the only one)."""
        return True

    def grad_norm_share(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's share of the squared global gradient norm, 1 if any of its gradients is
        not finite) as fp64 scalars on the gradients' device, with no host sync. The shares
        summed over all ranks give the squared norm with each weight counted once: tp shards
        on every tp rank, replicated weights on tp rank 0, of one dp x cp replica."""
        grads = [(p, g) for p, g in self.local_grads() if g is not None]
        if not grads:
            zero = torch.zeros((), dtype=torch.float64)
            return zero, zero.clone()
        norms = torch.stack(torch._foreach_norm([g for _, g in grads])).double()
        counted = [is_tp_sharded(p) or self.state.tp_rank == 0 for p, _ in grads]
        mask = torch.tensor(counted, device=norms.device) & self._counts_replicas()
        share = torch.where(mask, norms.square(), 0.0).sum()
        return share, (~torch.isfinite(norms).all()).double()

    def clip_(self, scale: float) -> None:
        """Multiply the dense gradient by ``scale`` (the global-norm clip)."""
        grads = [g for _, g in self.local_grads() if g is not None]
        if grads:
            torch._foreach_mul_(grads, scale)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def checkpoint_files(self) -> dict[str, Any]:
        return {}

    def load(self, directory: Path) -> None:
        """Restore what :meth:`checkpoint_files` saved (nothing: DCP holds the state)."""


class DDPEngine(DenseEngine):
    """torch DistributedDataParallel over the dp x cp group, gradient reduction overlapped
    with the backward. Dense weights start identical on every rank (one seeded init), which
    DDP's start-up broadcast checks for shapes and keeps bit for bit."""

    name = "ddp"

    def __init__(self, model: nn.Module, state: ParallelState) -> None:
        super().__init__(model, state)
        from torch.nn.parallel import DistributedDataParallel

        # forward_sync_buffers=False: the dense buffers (RoPE tables) are constants.
        # find_unused_parameters=False: every trained dense weight takes part in each forward.
        self.module = self.ddp = DistributedDataParallel(
            DenseView(model), process_group=state.dp_cp_group, bucket_cap_mb=BUCKET_MB,
            forward_sync_buffers=False)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            yield

    def _counts_replicas(self) -> bool:  # the replicas hold the same averaged gradient
        return self.state.dp_rank == 0 and self.state.cp_rank == 0


class FSDP2Engine(DenseEngine):
    """torch ``fully_shard`` over the dp x cp group: each transformer block is one unit
    (gathered for its forward and backward), the rest (embedding, final norm, head, bank
    generic blocks) the root unit. Gradients are reduce-scattered in the last micro-batch."""

    name = "fsdp2"

    def __init__(self, model: nn.Module, state: ParallelState) -> None:
        super().__init__(model, state)
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        device = next(model.parameters()).device
        mesh = DeviceMesh.from_group(state.dp_cp_group, device.type)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        self.module = self.root = fully_shard(DenseView(model), mesh=mesh)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.root.set_requires_gradient_sync(last)
        yield

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        try:
            yield
        finally:  # the root unit stays gathered after a forward until its backward
            self.root.reshard()


class ZeroEngine(DenseEngine):
    """Dense parameters under a DeepSpeed ZeRO-1/2 engine: optimizer state (and with stage 2
    gradients) partitioned over the dp group. The engine wraps the caller's AdamW, so
    hyper-parameters and the LR schedule are the other engines'; it reduces, clips and steps
    in the backward of a step's last micro-batch."""

    name = "deepspeed"
    own_optimizer_state = True

    def __init__(self, model: nn.Module, state: ParallelState, cfg: Config) -> None:
        super().__init__(model, state)
        if not dist.is_initialized():
            raise RuntimeError("train.engine=deepspeed needs a launched job (torchrun, srun, "
                               "mpirun) with a process group")
        self.cfg = cfg
        self.engine: Any = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        os.environ.setdefault("DS_ACCELERATOR", collective_device().type)  # the backend's
        try:
            import deepspeed
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("train.engine=deepspeed needs: pip install 'memtron[deepspeed]'") \
                from e
        cfg = self.cfg
        config = {
            "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "zero_optimization": {"stage": cfg.train.zero_stage},
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_allow_untested_optimizer": True,  # a plain torch AdamW
            "communication_data_type": "fp32",
            "steps_per_print": 2**62,
        }
        # DeepSpeed broadcasts every module parameter from rank 0 at start-up: it sees the
        # dense view, so the other ranks' value-table shards are left alone.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=DenseView(self.model), optimizer=optimizer, config=config,
            dist_init_required=False)

    def params(self) -> list[torch.Tensor]:
        return []  # gradients live in DeepSpeed's partitions

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        """DeepSpeed divides by the accumulation steps itself; at the accumulation boundary
        its step reduces, clips and applies the dense update."""
        self.engine.backward(loss)
        self.engine.step()

    def grad_norm_share(self) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSpeed's global norm (every rank has it) counted on rank 0."""
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(0.0 if norm is None else float(norm), dtype=torch.float64)
        share = norm.square() if self.state.rank == 0 else torch.zeros_like(norm)
        return share, (~torch.isfinite(norm)).double()

    def clip_(self, scale: float) -> None:
        """DeepSpeed clipped in its step."""

    def step(self) -> None:
        """DeepSpeed stepped in the backward (unless its grad norm was not finite)."""

    def zero_grad(self) -> None:
        """DeepSpeed zeroes its own gradients."""

    def checkpoint_files(self) -> dict[str, Any]:
        """Each dp rank's partition of the optimizer state, saved next to the DCP tensors."""
        return {f"zero-rank{dist.get_rank():05d}.pt": self.optimizer.state_dict()}

    def load(self, directory: Path) -> None:
        files = sorted(directory.glob("zero-rank*.pt"))
        if len(files) != dist.get_world_size():
            raise RuntimeError(f"{directory}: {len(files)} ZeRO partitions for "
                               f"{dist.get_world_size()} ranks; DeepSpeed optimizer state "
                               "resumes only at the layout it was saved with")
        states = [torch.load(f, weights_only=False) for f in files]  # our checksummed files
        self.optimizer.load_state_dict(states, load_optimizer_states=True)


def build_dense_engine(model: nn.Module, cfg: Config, state: ParallelState) -> DenseEngine:
    """The engine ``train.engine`` names, over ``model``'s dense weights (after TP and CP are
    applied; before the dense optimizer is built, which :meth:`DenseEngine.attach` takes)."""
    engine = cfg.train.engine
    if engine == "deepspeed":
        return ZeroEngine(model, state, cfg)
    if state.dp * state.cp == 1:
        return DenseEngine(model, state)
    if engine == "fsdp2":
        return FSDP2Engine(model, state)
    return DDPEngine(model, state)

