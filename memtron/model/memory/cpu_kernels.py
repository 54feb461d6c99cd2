"""A small C++ extension for value tables on CPU (``csrc/rows.cpp``): the sparse backward of
the weighted bag gather in one pass over the distinct rows, where the torch path takes two
(``embedding_bag``'s per-sample-weight backward gathers each hit's row; ``sum_rows_by_id``
sorts and sums again) and sorts with ``torch.sort``, whose parallel CPU sort stalls on a busy
machine. The same triple as :func:`kernels.bag_backward`, summed in fp32.

Opt-in (``MEMTRON_CPU_EXT=1``): measured on an idle 2-core machine it is 20-25% slower than the
torch ops at 1M rows (single-threaded sort), and faster only when the cores are oversubscribed.
Built with gcc by ``torch.utils.cpp_extension`` the first time it is needed (or ahead:
``python -m memtron.model.memory.cpu_kernels``), cached under ``~/.cache/memtron``. If it cannot
be built, the torch ops run.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

ENABLED = os.environ.get("MEMTRON_CPU_EXT", "0") == "1"
SOURCE = Path(__file__).parent / "csrc" / "rows.cpp"


@functools.cache
def _extension() -> ModuleType | None:
    """The compiled extension, or None (with a warning) where it does not build."""
    from torch.utils.cpp_extension import load

    build = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memtron" / \
        f"cpu_ext-torch{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load("memtron_cpu_rows", [str(SOURCE)], build_directory=str(build),
                    extra_cflags=["-O3", "-fopenmp-simd"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path serves
        warnings.warn(f"memtron CPU extension unavailable, using torch ops: {e}", stacklevel=2)
        return None


def builds() -> bool:
    """Whether the extension compiles and loads here."""
    return _extension() is not None


def available(t: torch.Tensor) -> bool:
    """Whether the extension takes value-table ops over ``t``: enabled, CPU tensors, and it
    builds."""
    return ENABLED and t.device.type == "cpu" and builds()


def bag_backward(grad_out: torch.Tensor, table: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor, offsets: torch.Tensor, weight_grad: bool,
                 arena: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(sorted unique ids [U], fp32 row gradients [U, d], fp32 weight gradients [M] or None),
    as :func:`kernels.bag_backward`, for bags starting at ``offsets`` (the ``embedding_bag``
    layout). The row gradients are the first U rows of ``arena`` (fp32 [R, d]) when it has
    that many, else a new tensor."""
    arena = grad_out.new_empty(0, table.shape[1]) if arena is None else arena
    unique, rows, grad_w = _extension().bag_backward(
        grad_out.float(), table, ids, weights.float(), offsets, weight_grad, arena)
    return unique, rows, grad_w if weight_grad else None


if __name__ == "__main__":  # build ahead
    sys.exit(0 if _extension() is not None else 1)
