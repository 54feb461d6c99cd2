"""Tables: :class:`TableSpec`, the table contract, the local table, :class:`SparseGrad`
(DESIGN §4). Sharded storage kinds and routed lookups live in ``memtron.parallel``."""

from memtron.model.tables.grad import SparseGrad, bag_index, sum_rows_by_id
from memtron.model.tables.spec import STORAGE_DTYPES, TableKind, TableSpec
from memtron.model.tables.table import (
    LazyDecay,
    LocalValueTable,
    ValueTable,
    init_rows,
    rounding_keys,
    store_rows,
)

__all__ = ["STORAGE_DTYPES", "LazyDecay", "LocalValueTable", "SparseGrad", "TableKind",
           "TableSpec", "ValueTable", "bag_index", "init_rows", "rounding_keys", "store_rows",
           "sum_rows_by_id"]
