"""One place where a single-process model becomes this rank's part of a parallel job.

``build_parallel_model(cfg, state)`` builds the model from the seed with the table layout's
factories (a table too large for one process is only ever allocated as this rank's shard) and
hands it to ``parallelize(model, state, cfg)``, which applies each axis with one small function,
torchtitan-style:

- ``apply_tp``: megatron's column/row-parallel linears and vocab-parallel embedding in place of
  the dense layers, each loaded with this rank's slice of the seeded full weight;
- ``apply_cp``: the attention backend, chosen once: ring attention over the cp group;
- ``apply_table_layout``: lookups sliced over tp ranks where the layout says so;
- the dense engine (DDP, FSDP2, DeepSpeed ZeRO) wraps what this returns (train/trainer.py).

The model code never branches on the layout: it has the hooks (``input_hook``, ``head_input``,
``backend``, ``lookup_via``), and this module is the only one that fills them.

Dense weights are still initialised whole on the CPU from the seeded global generator and
then sliced: a shard materialised from the meta device could only hold the same values by
replaying that generator over every earlier draw (each layer's default init, the table seeds),
i.e. by computing the full tensors anyway. A counter-based dense init (value = f(seed, row,
column), as the tables have) would allow it, at the price of new initial values.
"""

from __future__ import annotations

import torch

from memtron.config import Config
from memtron.model.attention import CausalSelfAttention
from memtron.model.transformer import TableFactory, Transformer, build_model
from memtron.parallel.context import RingBackend
from memtron.parallel.memory import table_factory
from memtron.parallel.state import ParallelState
from memtron.parallel.tensor import (
    CopyToTensorParallel,
    column_linear,
    row_linear,
    vocab_embedding,
)
from memtron.parallel.token_slice import slice_lookups_over_tp


def table_layout(cfg: Config, state: ParallelState) -> TableFactory:
    """The factory of this layout's tables (value tables and tree-memory levels alike): whole,
    row- or column-sharded over ep (parallel/memory.py)."""
    return table_factory(cfg, state)


def build_parallel_model(cfg: Config, state: ParallelState,
                         device: torch.device | None = None) -> Transformer:
    """This rank's model: the same seeded initialisation on every rank (so tp shards and table
    shards are slices of one model), parallelised, on ``device``."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, table_layout(cfg, state))
    return parallelize(model, state, cfg).to(device or torch.device("cpu"))


def parallelize(model: Transformer, state: ParallelState, cfg: Config) -> Transformer:
    """Apply tp, cp and the table layout to ``model`` in place; returns it."""
    apply_tp(model, state)
    apply_cp(model, state)
    apply_table_layout(model, state, cfg)
    return model


def apply_tp(model: Transformer, state: ParallelState) -> None:
    """Megatron's scheme: q/k/v and gate/up column-parallel behind one shared input copy (one
    gradient all-reduce), attention output and FFN down row-parallel, the embedding
    vocab-parallel, the head vocab-sharded. Memory layers stay replicated: every tp rank sees
    the same activations and computes the same lookups."""
    if state.tp == 1:
        return
    for block in model.blocks:
        attn = block.attn
        attn.input_hook = CopyToTensorParallel()
        attn.wq, attn.wk, attn.wv = (column_linear(attn.wq, state, shared_input=True),
                                     column_linear(attn.wk, state, shared_input=True),
                                     column_linear(attn.wv, state, shared_input=True))
        attn.wo = row_linear(attn.wo, state)
        if block.ffn is not None:
            ffn = block.ffn
            ffn.input_hook = CopyToTensorParallel()
            ffn.w_gate = column_linear(ffn.w_gate, state, shared_input=True)
            ffn.w_up = column_linear(ffn.w_up, state, shared_input=True)
            ffn.w_down = row_linear(ffn.w_down, state)
    model.embed = vocab_embedding(model.embed, state)
    if model.head is None:  # tied: logits = x @ E_shard^T needs x's gradient summed over tp
        model.head_input = CopyToTensorParallel()
    else:
        model.head = column_linear(model.head, state)


def apply_cp(model: Transformer, state: ParallelState) -> None:
    """Every attention layer's backend: ring attention over the zigzag layout under cp > 1,
    the local SDPA backend otherwise (whole-sequence evaluation: ``local_attention``)."""
    if state.cp == 1:
        return
    backend = RingBackend(state)
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.backend = backend


def apply_table_layout(model: Transformer, state: ParallelState, cfg: Config) -> None:
    """What of the table layout acts after construction: under tp, each tp rank looks up a
    slice of the tokens and the results are all-gathered (parallel/token_slice.py). The
    tables themselves were built by :func:`table_layout`'s factories."""
    slice_lookups_over_tp(model, cfg, state)
