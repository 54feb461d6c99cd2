"""A small C++ extension for value tables on CPU (``csrc/rows.cpp``), built with gcc by
``torch.utils.cpp_extension`` the first time it is needed (or ahead: ``python -m
memtron.model.memory.cpu_kernels``, which ``scripts/install.sh`` runs) and cached under
``~/.cache/memtron``:

* the sparse backward of the weighted bag gather in one pass over the distinct rows (hits
  radix-sorted by id), writing the row gradients into the table's reused arena with streaming
  stores, where the torch path takes two passes (``embedding_bag``'s per-sample-weight backward
  gathers each hit's row, ``sum_rows_by_id`` sorts and sums again) into a fresh [U, d] tensor;
* the sparse optimizer's update of every mode in place, one pass over each touched row and its
  state, where the torch path gathers rows and moments into [U, d] temporaries, updates them in
  several passes and scatters them back;
* the table's init (``counter_rng.normal``) in one pass that writes each row once, fp32 or bf16,
  where the torch path runs ~150 ops over int64 and fp32 temporaries. Built for the CPU's
  vector width (``ISA_FLAGS``) without fused multiply-adds (``-ffp-contract=off``), so it gives
  the torch ops' bits on any x86 CPU.

On by default on CPU tensors; ``MEMTRON_CPU_EXT=0`` runs the torch ops (the reference), as does
a machine where the extension does not build. Measured at 1M x 256 (``bench/README.md``): the
update is 2-4x faster than the torch ops, the backward on par to 1.3x faster.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from memtron.model.memory import counter_rng

ENABLED = os.environ.get("MEMTRON_CPU_EXT", "1") != "0"
SOURCE = Path(__file__).parent / "csrc" / "rows.cpp"


# Instruction sets the extension is compiled for, by the vector capability torch's own CPU
# kernels run at here (``torch.backends.cpu.get_cpu_capability``; ``ATEN_CPU_CAPABILITY=avx2``
# or ``default`` lowers it, as it does for torch). The row loops run inside ``at::parallel_for``
# lambdas, which per-function ``target_clones`` cannot reach, so the whole file is built once per
# capability. Measured on the AVX-512 VM against the baseline SSE2 build (bench/README.md): the
# update 1.6-2.8x faster, the backward 1.2-1.5x (64K-16M rows, 262K hits). Every build draws the
# same init bits (no multiply-add is fused: ``-ffp-contract=off``); sums may differ in order.
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2",
                        "-mfma", "-mf16c", "-mprefer-vector-width=512"],
             "AVX2": ["-mavx2", "-mfma", "-mf16c"]}


def capability() -> str:
    """The vector capability the extension is built for: torch's own on x86, else DEFAULT."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in ISA_FLAGS else "DEFAULT"


@functools.cache
def _extension() -> ModuleType | None:
    """The compiled extension, or None (with a warning) where it does not build."""
    from torch.utils.cpp_extension import load

    # An empty XDG_CACHE_HOME counts as unset (the XDG spec), not as the current directory.
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    cap = capability()
    build = Path(cache) / "memtron" / f"cpu_ext-torch{torch.__version__}-{cap.lower()}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load("memtron_cpu_rows", [str(SOURCE)], build_directory=str(build),
                    extra_cflags=["-O3", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=off",
                                  *ISA_FLAGS.get(cap, [])],
                    verbose=False)
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


def sparse_update(mode: str, weight: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor,
                  exp_avg: torch.Tensor | None, second: torch.Tensor,
                  last_step: torch.Tensor | None, *, decay: float | torch.Tensor,
                  betas: tuple[float, float], eps: float, step_size: float, step: int,
                  round_keys: torch.Tensor | None = None, col_start: int = 0) -> None:
    """``SparseRowOptimizer``'s update of rows ``ids`` (unique) of ``weight`` [N, d] with fp32
    ``grad`` [U, d] and the mode's state (``exp_avg``; ``second``: exp_avg_sq or sum_sq;
    ``last_step``), in place: one pass over each row and its state, no [U, d] temporaries.
    ``decay``: the factor every row takes first (1.0 = none), or one per row [U]. A bf16 table
    rounds stochastically with ``round_keys`` [U] (``counter_rng.row_keys``) and columns from
    ``col_start``, bit for bit as the reference ``memtron::sparse_update``."""
    none = weight.new_empty(0)
    per_row = isinstance(decay, torch.Tensor)
    _extension().sparse_update(
        mode, weight, ids.contiguous(), grad.contiguous(),
        none if exp_avg is None else exp_avg, second, none if last_step is None else last_step,
        decay.reshape(-1).float().contiguous() if per_row else none.float(),
        1.0 if per_row else float(decay), betas[0], betas[1], eps, step_size, step,
        none.long() if round_keys is None else round_keys.contiguous(), col_start)


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


def init_normal(weight: torch.Tensor, row_start: int, col_start: int, seed: int, stream: int,
                std: float) -> None:
    """``weight`` [R, n] (fp32 or bf16) = ``counter_rng.normal`` of global rows ``row_start
    ...`` and columns ``col_start ...``, the same bits, written in place (no temporaries)."""
    _extension().init_normal(weight, row_start, col_start,
                             counter_rng.stream_base(seed, stream, 0),
                             counter_rng.stream_base(seed, stream, 1), -2.0 * std * std)


if __name__ == "__main__":  # build ahead
    sys.exit(0 if _extension() is not None else 1)
