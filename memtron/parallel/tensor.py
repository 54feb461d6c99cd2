"""Tensor parallelism with megatron-core's layers (DESIGN §2), and the tp collectives of the
loss, the logits and the gradient norm.

The layers are built here and put in place by ``apply_tp`` (parallel/parallelize.py): attention
q/k/v and the FFN gate/up column-parallel, attention output and FFN down row-parallel, the
embedding vocab-parallel. Each takes this rank's slice of a full, seeded weight, so the tp=2
model *is* the tp=1 model split, and equivalence tests can compare them.

Communication per block (Megatron's scheme): the input shared by the column layers (q/k/v;
gate/up) is copied once (identity forward, one all-reduce of its gradient backward); the row
layers' output is all-reduced.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from memtron.model.transformer import lm_loss
from memtron.parallel.launch import to_backend
from memtron.parallel.state import ParallelState


def _megatron():
    try:
        with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed"
            warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
            from megatron.core import tensor_parallel
            from megatron.core.model_parallel_config import ModelParallelConfig
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("tensor parallelism needs megatron-core: pip install "
                          "'memtron[megatron]'") from e
    return tensor_parallel, ModelParallelConfig


def _no_init(_weight: torch.Tensor) -> None:
    """Weights are copied from the full model, never initialised by megatron."""


def _mp_config(state: ParallelState, dtype: torch.dtype):
    _, model_parallel_config = _megatron()
    return model_parallel_config(tensor_model_parallel_size=state.tp, use_cpu_initialization=True,
                                 perform_initialization=False, params_dtype=dtype)


def _load_shard(param: torch.Tensor, full: torch.Tensor, dim: int, state: ParallelState) -> None:
    """Copy this rank's slice of ``full`` and tag the parameter as a tp shard along ``dim``
    (megatron tags only inside its own init, which is skipped here)."""
    tensor_parallel, _ = _megatron()
    with torch.no_grad():
        param.copy_(full.chunk(state.tp, dim=dim)[state.tp_rank])
    tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim,
                                                         stride=1)


@functools.cache
def _layer_classes() -> tuple[type, type]:
    """Megatron's parallel linears without the (output, bias) tuple, so they drop in for
    nn.Linear; parameter names stay ``weight``, so checkpoints keep single-process names."""
    tensor_parallel, _ = _megatron()

    class ColumnLinear(tensor_parallel.ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    class RowLinear(tensor_parallel.RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    return ColumnLinear, RowLinear


def column_linear(full: nn.Linear, state: ParallelState, shared_input: bool = False) -> nn.Module:
    """This rank's output rows of ``full``. ``shared_input``: several column layers read one
    input that goes through a single :class:`CopyToTensorParallel`, so this layer must not
    all-reduce the input gradient too."""
    cls, _ = _layer_classes()
    layer = cls(full.in_features, full.out_features, bias=False, gather_output=False,
                          config=_mp_config(state, full.weight.dtype), init_method=_no_init,
                          disable_grad_reduce=shared_input)
    _load_shard(layer.weight, full.weight, 0, state)
    return layer


def row_linear(full: nn.Linear, state: ParallelState) -> nn.Module:
    """This rank's input columns of ``full``; its output is all-reduced over tp."""
    _, cls = _layer_classes()
    layer = cls(full.in_features, full.out_features, bias=False, input_is_parallel=True,
                skip_bias_add=False, config=_mp_config(state, full.weight.dtype),
                init_method=_no_init)
    _load_shard(layer.weight, full.weight, 1, state)
    return layer


def vocab_embedding(full: nn.Embedding, state: ParallelState) -> nn.Module:
    """This rank's vocabulary rows of ``full``; the lookup is all-reduced over tp."""
    tensor_parallel, _ = _megatron()
    embed = tensor_parallel.VocabParallelEmbedding(
        full.num_embeddings, full.embedding_dim, init_method=_no_init,
        config=_mp_config(state, full.weight.dtype))
    _load_shard(embed.weight, full.weight, 0, state)
    return embed


class CopyToTensorParallel(nn.Module):
    """Identity forward; all-reduce of the gradient over tp backward (before a sharded head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensor_parallel, _ = _megatron()
        return tensor_parallel.copy_to_tensor_model_parallel_region(x)


# --------------------------------------------------------------------------- loss


def parallel_lm_loss(logits: torch.Tensor, targets: torch.Tensor,
                     state: ParallelState) -> torch.Tensor:
    """Mean next-token cross entropy over vocab-sharded logits (no full-vocab gather)."""
    if state.tp == 1:
        return lm_loss(logits, targets)
    tensor_parallel, _ = _megatron()
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets).mean()


def gather_logits(logits: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Full-vocab logits on every tp rank, on ``logits``' device (evaluation and generation: no
    gradient). An all-gather over the tp group on the backend's device: megatron's
    ``gather_from_tensor_model_parallel_region`` allocates on ``torch.cuda.current_device()``."""
    if state.tp == 1:
        return logits
    local = to_backend(logits.detach(), state.tp_group).contiguous()
    parts = [torch.empty_like(local) for _ in range(state.tp)]
    torch.distributed.all_gather(parts, local, group=state.tp_group)
    return torch.cat(parts, dim=-1).to(logits.device)


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))

