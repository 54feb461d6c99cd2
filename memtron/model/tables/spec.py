"""What a table is, apart from where its rows live: :class:`TableSpec` (DESIGN §4)."""

from __future__ import annotations

import dataclasses
import typing

import torch

# Storage types of tables (``memory.value_dtype``) and of their first moments.
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# What a table's rows are: product-key / n-gram value rows, or tree-memory FFN blocks (whole
# rows fetched per context; row-sharded under every layout, never column-sharded).
TableKind = typing.Literal["values", "tree"]


@dataclasses.dataclass(frozen=True, eq=False)
class TableSpec:
    """A table as the model declares it, whatever its storage kind or lookup strategy: the
    factories of ``memtron.parallel`` and ``memtron.infer`` build the table a spec names, and
    the optimizer, checkpoints and row stores address it by ``name``.

    Rows are drawn by the counter-based init (``counter_rng.normal``): the value of (row, column)
    is N(0, std[column]^2) from ``(seed, row, column)`` alone, so every shard draws its part of
    the whole table. ``std``: one float for every column (default ``dim ** -0.5``) or one per
    column [dim]. ``optimizer``: the sparse row optimizer's mode for this table (None: the
    optimizer's own); ``lr_mult``, ``wd_mult``: its learning rate and weight decay relative to
    the sparse optimizer's."""

    name: str
    rows: int
    dim: int
    seed: int = 0
    dtype: torch.dtype = torch.float32
    std: float | torch.Tensor | None = None
    kind: TableKind = "values"
    optimizer: str | None = None
    lr_mult: float = 1.0
    wd_mult: float = 1.0

    def column_std(self, columns: slice) -> float | torch.Tensor:
        """The init std of ``columns`` (a float when every column shares it)."""
        if self.std is None:
            return self.dim**-0.5
        if isinstance(self.std, torch.Tensor):
            return self.std[columns]
        return float(self.std)
