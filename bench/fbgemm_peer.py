"""memtron's value table against FBGEMM's CPU TBE (issue 15): the same table step on each.

FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen`` (the table-batched embedding behind torchrec)
is the reference implementation of sparse embedding training, and its
``EXACT_ROWWISE_ADAGRAD`` is memtron's ``rowwise_adagrad`` (per touched row ``s += mean(g^2)``,
``row -= lr * g / (sqrt(s) + eps)``; FBGEMM's weight decay is off by default), so the two can be
checked against each other and timed on the same step:

* memtron as shipped: ``LocalValueTable`` (fp32) ``.lookup`` forward of T x hits uniform random
  ids with random weights, backward of a random output gradient (row and weight gradients),
  ``SparseRowOptimizer(mode="rowwise_adagrad")`` step and zero_grad, with the CPU kernels memtron
  picks (the C++ extension unless ``MEMTRON_CPU_EXT=0``).
* FBGEMM: one fp32 table, ``EmbeddingLocation.HOST``, ``ComputeDevice.CPU``, ``PoolingMode.SUM``,
  ``per_sample_weights`` (with their gradient), the same lr and eps, its default bounds check;
  forward, then the backward that updates the rows in place (fused).

Both get the same ids, weights and output gradients, one after the other in this process (one
table held at a time); the step time is the median of ``--steps`` after a warm-up step.
Before timing, an equivalence check at the smallest size: FBGEMM's table starts from memtron's
initial rows, both take one step on the same inputs, and the forward outputs, weight gradients,
row accumulators and updated rows are compared (max abs difference).

    pip install --no-deps fbgemm-gpu-cpu==1.8.0     # or scripts/install.sh peers
    python bench/fbgemm_peer.py --quick             # 64K / 256K rows, < 1 min
    python bench/fbgemm_peer.py                     # 64K / 1M / 4M rows, < 2 min
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from table_scale import build, table_step  # bench/ is the script's directory: memtron's step

from memtron.bench.harness import (
    BenchRun,
    ForeignCpu,
    GiB,
    add_output_args,
    fmt_count,
    mem_available,
    parse_count,
)

Inputs = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (ids, weights, output grad)
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
BUSY = 0.10  # other processes' CPU share above which a side's timings are flagged
TOLERANCE = 1e-5


def load_fbgemm() -> tuple[SimpleNamespace | None, str]:
    """FBGEMM's training TBE and its enums, or None and why not: a build for another torch
    raises OSError (an undefined symbol) from its libraries, not ImportError."""
    try:
        import fbgemm_gpu
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except (ImportError, OSError) as error:
        cause = f" ({error.__cause__})" if error.__cause__ else ""  # torch names only the file
        return None, f"{type(error).__name__}: {error}{cause}".splitlines()[0][:500]
    return SimpleNamespace(version=fbgemm_gpu.__version__,
                           TBE=SplitTableBatchedEmbeddingBagsCodegen, OptimType=EmbOptimType,
                           SparseType=SparseType, Location=EmbeddingLocation,
                           Pooling=PoolingMode, Device=ComputeDevice), ""


def make_inputs(n: int, d: int, tokens: int, hits: int, count: int, seed: int = 0) -> Inputs:
    """``count`` steps' uniform random ids over ``n`` rows, weights in [0, 1), output grads."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, n, (tokens, hits), generator=g),
             torch.rand(tokens, hits, generator=g), torch.randn(tokens, d, generator=g))
            for _ in range(count)]


def build_fbgemm(fb: SimpleNamespace, n: int, d: int, lr: float, eps: float) -> torch.nn.Module:
    """FBGEMM's CPU TBE with one fp32 n x d table and EXACT_ROWWISE_ADAGRAD (fused update)."""
    return fb.TBE([(n, d, fb.Location.HOST, fb.Device.CPU)],
                  optimizer=fb.OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=lr, eps=eps,
                  pooling_mode=fb.Pooling.SUM, weights_precision=fb.SparseType.FP32,
                  output_dtype=fb.SparseType.FP32, device="cpu")


def fbgemm_step(tbe: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor,
                grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One TBE step: forward over T bags of ``hits`` ids each, then the backward, which also
    updates the rows; (forward output, weight gradient)."""
    tokens, hits = ids.shape
    offsets = torch.arange(0, tokens * hits + 1, hits)
    w = weights.reshape(-1).clone().requires_grad_(True)
    out = tbe(ids.reshape(-1), offsets, per_sample_weights=w)
    out.backward(grad)
    return out.detach(), w.grad.view(tokens, hits)


def equivalence(fb: SimpleNamespace, n: int, d: int, inputs: Inputs, lr: float,
                eps: float) -> dict:
    """One step of each from the same initial rows on the same inputs: max abs differences of
    the forward outputs, weight gradients, row accumulators and updated rows."""
    table, opt = build(n, d, "fp32", "rowwise_adagrad", lr=lr, eps=eps)
    tbe = build_fbgemm(fb, n, d, lr, eps)
    initial = table.weight.detach().clone()
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(initial)
    ids, weights, grad = inputs[0]
    out_m, wgrad_m = table_step(table, opt, ids, weights, grad)
    out_f, wgrad_f = fbgemm_step(tbe, ids, weights, grad)
    rows_f = tbe.split_embedding_weights()[0]

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    result = {"rows": n, "output": diff(out_m, out_f), "weight_grad": diff(wgrad_m, wgrad_f),
              "accumulator": diff(opt.state["values"]["sum_sq"],
                                  tbe.get_optimizer_state()[0]["sum"]),
              "rows_after": diff(table.weight.detach(), rows_f),
              "largest_update": diff(table.weight.detach(), initial),
              "rows_touched": int(torch.unique(ids).numel())}
    result["match"] = max(result[k] for k in ("output", "weight_grad", "rows_after")) <= TOLERANCE
    return result


def time_steps(step: Step, inputs: Inputs) -> dict:
    """Seconds of each step after a warm-up step on ``inputs[0]``, their median, and the largest
    CPU share other processes took while one ran."""
    step(*inputs[0])
    totals, foreign = [], 0.0
    for args in inputs[1:]:
        with ForeignCpu() as meter:
            start = time.perf_counter()
            step(*args)
            totals.append(time.perf_counter() - start)
        foreign = max(foreign, meter.share)
    return {"step_s": statistics.median(totals), "times": totals, "foreign": foreign}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048, help="tokens (bags) per step T")
    p.add_argument("--hits", type=int, default=128, help="ids per token")
    p.add_argument("--sizes", nargs="+", type=parse_count, default=None,
                   help="table rows (64K 1M 4M; --quick: 64K 256K)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (median)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="64K and 256K rows, 3 steps")
    add_output_args(p)
    a = p.parse_args(argv)
    a.sizes = a.sizes or ([1 << 16, 1 << 18] if a.quick else [1 << 16, 1 << 20, 1 << 22])
    if a.quick:
        a.steps = min(a.steps, 3)
    torch.set_num_threads(a.threads)
    from memtron.model.memory import cpu_kernels

    bench = BenchRun("fbgemm_peer", a).start()
    fb, why = load_fbgemm()
    if fb is None:
        print(f"fbgemm_gpu does not load with torch {torch.__version__}: {why}\n"
              "nothing to compare against (pip install --no-deps fbgemm-gpu-cpu==1.8.0)")
        bench.notes.append(f"fbgemm_gpu not loaded: {why}")
        bench.finish()
        return 0
    d = a.dim
    kernels = "C++ extension" if cpu_kernels.available(torch.empty(0)) else "torch ops"
    print(f"memtron vs FBGEMM {fb.version} CPU TBE: d={d}, T={a.tokens}, hits={a.hits}, fp32, "
          f"row-wise AdaGrad (lr {a.lr}, eps {a.eps}), threads {torch.get_num_threads()}, "
          f"memtron CPU kernels: {kernels}", flush=True)
    bench.baseline = {"kind": "FBGEMM SplitTableBatchedEmbeddingBagsCodegen (CPU, HOST, "
                      "EXACT_ROWWISE_ADAGRAD, fused backward-update)", "version": fb.version}
    results: dict = {"kernels": kernels, "fbgemm_version": fb.version}

    n0 = min(a.sizes)
    check = equivalence(fb, n0, d, make_inputs(n0, d, a.tokens, a.hits, 1, seed=1), a.lr, a.eps)
    results["equivalence"] = check
    gc.collect()
    print(f"\n-- equivalence, one step from the same {fmt_count(n0)} x {d} rows "
          f"({check['rows_touched']:,} touched): max |diff| output {check['output']:.2e}, "
          f"weight grad {check['weight_grad']:.2e}, accumulator {check['accumulator']:.2e}, "
          f"rows {check['rows_after']:.2e} (largest update {check['largest_update']:.2e}): "
          f"{'match' if check['match'] else 'DIFFER'}", flush=True)

    print(f"\n-- table step (forward + backward + update), median of {a.steps}; "
          "* = other processes took > 10% of the CPUs", flush=True)
    results["steps"] = []
    for n in a.sizes:
        need = n * d * 4 * 1.1 + GiB
        if need > mem_available():
            print(f"  {fmt_count(n)}: skipped (needs ~{need / GiB:.1f} GiB)")
            continue
        inputs = make_inputs(n, d, a.tokens, a.hits, a.steps + 1)
        row: dict = {"rows": n}
        table, opt = build(n, d, "fp32", "rowwise_adagrad", lr=a.lr, eps=a.eps)
        row["memtron"] = time_steps(functools.partial(table_step, table, opt), inputs)
        del table, opt
        gc.collect()
        tbe = build_fbgemm(fb, n, d, a.lr, a.eps)
        row["fbgemm"] = time_steps(functools.partial(fbgemm_step, tbe), inputs)
        del tbe
        gc.collect()
        row["fbgemm_over_memtron"] = row["fbgemm"]["step_s"] / row["memtron"]["step_s"]
        row["busy"] = max(row["memtron"]["foreign"], row["fbgemm"]["foreign"]) > BUSY
        results["steps"].append(row)
        print(f" {'*' if row['busy'] else ' '}{fmt_count(n):>5} rows: memtron "
              f"{1e3 * row['memtron']['step_s']:7.1f} ms, FBGEMM "
              f"{1e3 * row['fbgemm']['step_s']:7.1f} ms, FBGEMM / memtron "
              f"{row['fbgemm_over_memtron']:.2f}x (others {row['memtron']['foreign']:.0%} / "
              f"{row['fbgemm']['foreign']:.0%})", flush=True)
    if not check["match"]:
        bench.notes.append("equivalence check failed: the two steps differ beyond 1e-5")
    bench.results = results
    bench.finish()
    return 0 if check["match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
