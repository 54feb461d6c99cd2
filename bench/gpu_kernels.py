"""Value-table kernels on a GPU: bandwidth as a fraction of the card's practical HBM peak.

(a) peak: device-to-device ``copy_`` of 2 GiB, bytes read + written per second, in this run.
(b) forward gather at a PKM step's size (T tokens x H heads x k hits, bags of H*k hits): the
    Triton ``kernels.bag_gather`` and torch's ``F.embedding_bag`` (mode sum, per-sample
    weights), bytes of value rows read (T*H*k*d*element size) per second.
(c) backward + update, through the code a training step runs (``LocalValueTable.lookup``'s
    backward, then ``SparseRowOptimizer.step``), with the Triton kernels on and off
    (``kernels.ENABLED``): bytes touched per second, where the bytes are
      backward: hit indices and weights read, weight gradients written (M x 24 B), the output
      gradient read once (T*d*4), each touched row read once for the weight gradient and its
      fp32 row gradient written once (U*d*(elem + 4));
      update: each touched row and its two fp32 moments read and written, its gradient read
      (U*d*(2 elem + 20)) and its id (U*8).
    The sort of the hits by id is charged to the time but not to the bytes.
Goals: (b) >= 0.85 of (a), (c) >= 0.4 of (a). Timings: CUDA events, warmup, median.

    python bench/gpu_kernels.py --quick --out gpu_kernels.json   # 1M rows, d=1024 (< 1 min)
    python bench/gpu_kernels.py --out gpu_kernels.json           # 1M/16M rows x d 768/1024 x
                                                                 # fp32/bf16 (< 1 min)

The forward is also timed with the gather's other settings (``GATHER_SWEEP``, passed to
``bag_gather`` as its ``config`` argument in place of ``kernels.GATHER_CONFIG``), for the
record. A case that fails (out of memory, a kernel error) prints its error and the run goes
on, as does a failing part of a case (another gather setting, one side of backward + update),
whose error is kept next to the parts that ran; cases that cannot fit in the free GPU memory
are skipped with the memory they need, and cases not started within ``--budget`` seconds (50)
are skipped.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memtron.bench.harness import BenchRun, add_output_args  # noqa: E402
from memtron.model.memory import kernels  # noqa: E402
from memtron.model.tables import LocalValueTable, TableSpec  # noqa: E402
from memtron.train.optim import SparseRowOptimizer  # noqa: E402

GiB = 1 << 30
DEVICE = "cuda"  # every tensor of the run
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GOALS = {"forward": 0.85, "backward+update": 0.4}
# (elements a program loads per step, warps) of the gather, timed besides the default
GATHER_SWEEP = [(4096, 4), (4096, 8), (2048, 4), (2048, 8), (1024, 4)]


def cuda_time(fn: Callable[[], object], warmup: int, repeats: int,
              setup: Callable[[], object] | None = None) -> float:
    """Median seconds of ``fn`` on the GPU timeline (CUDA events around it; ``setup`` runs
    before each call, untimed)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    pairs = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3


def copy_bandwidth(nbytes: int, warmup: int, repeats: int) -> float:
    """Device-to-device copy: bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src), warmup, repeats)


def free_bytes() -> int:
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def run_case(rows: int, dim: int, dtype_name: str, a: argparse.Namespace, peak: float) -> dict:
    dtype = DTYPES[dtype_name]
    elem = torch.empty((), dtype=dtype).element_size()
    hits_per_token = a.heads * a.topk
    n_hits = a.tokens * hits_per_token
    case: dict = {"rows": rows, "dim": dim, "dtype": dtype_name, "tokens": a.tokens,
                  "hits": n_hits}
    table_bytes = rows * dim * elem
    need_fwd = table_bytes + 2 * a.tokens * dim * 4 + n_hits * 16 + GiB // 2
    if need_fwd > free_bytes():
        case["skipped"] = f"needs {need_fwd / GiB:.1f} GiB, {free_bytes() / GiB:.1f} free"
        return case
    g = torch.Generator(device=DEVICE).manual_seed(rows + dim)
    table = LocalValueTable(TableSpec("t", rows, dim, dtype=dtype), device=DEVICE).eval()
    ids = torch.randint(0, rows, (a.tokens, hits_per_token), device=DEVICE, generator=g)
    weights = torch.softmax(torch.randn(a.tokens, hits_per_token, device=DEVICE, generator=g), -1)
    grad = torch.randn(a.tokens, dim, device=DEVICE, generator=g)
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    offsets = torch.arange(0, n_hits, hits_per_token, device=DEVICE)

    # (b) forward gather
    fwd_bytes = n_hits * dim * elem
    weight = table.weight.detach()
    w_table = flat_w.to(dtype)
    t_triton = cuda_time(lambda: kernels.bag_gather(weight, flat_ids, flat_w, offsets),
                         a.warmup, a.repeats)
    t_torch = cuda_time(lambda: F.embedding_bag(flat_ids, weight, offsets,
                                                per_sample_weights=w_table, mode="sum"),
                        a.warmup, a.repeats)
    case["forward"] = {
        "bytes": fwd_bytes,
        "triton": {"ms": 1e3 * t_triton, "GBps": fwd_bytes / t_triton / 1e9,
                   "of_peak": fwd_bytes / t_triton / peak},
        "torch": {"ms": 1e3 * t_torch, "GBps": fwd_bytes / t_torch / 1e9,
                  "of_peak": fwd_bytes / t_torch / peak},
    }
    # the gather's other settings (kernels.GATHER_CONFIG for this element size), for the
    # record only: the goal is judged on the default above
    default = kernels.GATHER_CONFIG
    case["forward"]["triton"]["config"] = list(default)
    others = []
    for config in GATHER_SWEEP:
        if config == default:
            continue
        entry: dict = {"config": list(config)}
        try:
            t_alt = cuda_time(lambda config=config: kernels.bag_gather(
                weight, flat_ids, flat_w, offsets, config), a.warmup, a.repeats)
            entry.update(ms=1e3 * t_alt, of_peak=fwd_bytes / t_alt / peak)
        except Exception as exc:  # fail soft
            entry["error"] = _error(exc)
        others.append(entry)
    case["forward"]["triton_other_configs"] = others

    # (c) backward + update
    unique = int(torch.unique(flat_ids).numel())
    need_upd = rows * dim * 8 + 6 * unique * dim * 4 + GiB
    if need_upd > free_bytes():
        case["backward+update"] = {"skipped": f"Adam moments and temporaries need "
                                              f"{need_upd / GiB:.1f} GiB more, "
                                              f"{free_bytes() / GiB:.1f} free"}
        return case
    bwd_bytes = n_hits * 24 + a.tokens * dim * 4 + unique * dim * (elem + 4)
    upd_bytes = unique * dim * (2 * elem + 20) + unique * 8
    opt = SparseRowOptimizer({"t": table}, lr=1e-3, betas=(0.9, 0.999))
    result = {"unique_rows": unique, "backward_bytes": bwd_bytes, "update_bytes": upd_bytes}
    for side, enabled in (("triton", True), ("torch", False)):
        try:
            t_bwd, t_upd = backward_update(table, opt, ids, weights, grad, enabled, a)
        except Exception as exc:  # fail soft: keep the forward and the other side
            traceback.print_exc()
            result[side] = {"error": _error(exc)}
            continue
        total = t_bwd + t_upd
        result[side] = {
            "backward_ms": 1e3 * t_bwd, "update_ms": 1e3 * t_upd, "ms": 1e3 * total,
            "backward_of_peak": bwd_bytes / t_bwd / peak,
            "update_of_peak": upd_bytes / t_upd / peak,
            "GBps": (bwd_bytes + upd_bytes) / total / 1e9,
            "of_peak": (bwd_bytes + upd_bytes) / total / peak,
        }
    case["backward+update"] = result
    return case


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def backward_update(table: LocalValueTable, opt: SparseRowOptimizer, ids: torch.Tensor,
                    weights: torch.Tensor, grad: torch.Tensor, enabled: bool,
                    a: argparse.Namespace) -> tuple[float, float]:
    """Seconds of one lookup backward and of one SparseRowOptimizer step, Triton on or off."""
    graph: list[torch.Tensor] = []

    def forward() -> None:
        table.zero_grad_rows()
        w = weights.clone().requires_grad_(True)
        graph[:] = [table.lookup(ids, w)]

    try:
        with kernels.triton_enabled(enabled):
            t_bwd = cuda_time(lambda: graph[0].backward(grad), a.warmup, a.repeats,
                              setup=forward)
            grad_ids, grad_rows = table.sparse_grad()

            def one_backward() -> None:
                table.zero_grad_rows()
                table.accumulate_grad(grad_ids, grad_rows)

            t_upd = cuda_time(opt.step, a.warmup, a.repeats, setup=one_backward)
    finally:
        graph.clear()
        table.zero_grad_rows()
    return t_bwd, t_upd


def cell(entry: dict | None, side: str) -> str:
    if not entry or side not in entry:
        return f"{'-':>22}"
    e = entry[side]
    if "error" in e:
        return f"{'error (see below)':>22}"
    return f"{e['ms']:8.2f} {e['GBps']:7.0f} {e['of_peak']:5.0%}"


HEAD = (f"{'rows':>5} {'d':>5} {'dtype':>5} | {'fwd triton ms GB/s peak':>22} | "
        f"{'fwd torch':>22} | {'bwd+upd triton':>22} | {'bwd+upd torch':>22}")


def print_row(c: dict) -> None:
    label = f"{c['rows'] >> 20}M" if c["rows"] % (1 << 20) == 0 else str(c["rows"])
    line = f"{label:>5} {c['dim']:>5} {c['dtype']:>5} | "
    if "error" in c or "skipped" in c:
        print(line + (c.get("error") or f"skipped: {c['skipped']}"), flush=True)
        return
    bu = c.get("backward+update")
    line += (f"{cell(c['forward'], 'triton')} | {cell(c['forward'], 'torch')} | "
             f"{cell(bu, 'triton')} | {cell(bu, 'torch')}")
    if bu and "skipped" in bu:
        line += f"  (bwd+upd skipped: {bu['skipped']})"
    print(line, flush=True)
    pad = f"{'':>19}  "
    others = c["forward"].get("triton_other_configs")
    if others:
        default = c["forward"]["triton"].get("config")
        print(f"{pad} triton forward (elements a step, warps): {default} (default) "
              f"{c['forward']['triton']['of_peak']:.0%}; "
              + ", ".join(f"{o['config']} " + (o["error"] if "error" in o
                                                 else f"{o['of_peak']:.0%}") for o in others),
              flush=True)
    if bu and "triton" in bu and "error" not in bu["triton"]:
        t = bu["triton"]
        print(f"{pad} triton backward {t['backward_ms']:.2f} ms "
              f"({t['backward_of_peak']:.0%} of peak), update {t['update_ms']:.2f} ms "
              f"({t['update_of_peak']:.0%}); {bu['unique_rows']} distinct rows", flush=True)
    for side in ("triton", "torch"):
        if bu and "error" in bu.get(side, {}):
            print(f"{pad} {side} backward+update: {bu[side]['error']}", flush=True)


def print_summary(cases: list[dict], peak: float) -> None:
    print(f"peak = device-to-device copy {peak / 1e9:.0f} GB/s (read + written). Goals: forward "
          f">= {GOALS['forward']:.0%}, backward+update >= {GOALS['backward+update']:.0%} of peak.")
    for goal, need in GOALS.items():
        got = [c[goal]["triton"]["of_peak"] for c in cases
               if isinstance(c.get(goal), dict) and "of_peak" in c[goal].get("triton", {})]
        if got:
            verdict = "met" if min(got) >= need else "NOT met"
            print(f"  {goal}: Triton {min(got):.0%} .. {max(got):.0%} of peak: goal {verdict}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", type=int, default=None,
                   help="table rows (default 1M 16M; 1M in --quick)")
    p.add_argument("--dims", nargs="+", type=int, default=None,
                   help="row widths (default 768 1024; 1024 in --quick)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=None, help="timed calls, median (10; 5 quick)")
    p.add_argument("--quick", action="store_true", help="1M rows, d=1024: a smoke run")
    add_output_args(p)
    p.add_argument("--budget", type=float, default=50.0,
                   help="seconds: cases not started by then are skipped (default 50)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: needs a CUDA GPU")
        return 1
    a.rows = a.rows or ([1 << 20] if a.quick else [1 << 20, 16 << 20])
    a.dims = a.dims or ([1024] if a.quick else [768, 1024])
    a.repeats = a.repeats or (5 if a.quick else 10)
    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"device": props.name, "memory_GiB": props.total_memory / GiB,
            "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "tokens": a.tokens, "heads": a.heads,
            "topk": a.topk, "warmup": a.warmup, "repeats": a.repeats}
    print(f"gpu_kernels: {props.name} ({props.total_memory / GiB:.0f} GiB), torch "
          f"{torch.__version__}, triton {triton_version}; T={a.tokens} H={a.heads} k={a.topk}; "
          f"warmup {a.warmup}, median of {a.repeats}", flush=True)
    if not triton_version:
        print("triton is not installed: the Triton columns will fail")
    t0 = time.perf_counter()
    bench = BenchRun("gpu_kernels", a).start()
    peak = copy_bandwidth(2 * GiB, a.warmup, a.repeats)
    print(f"(a) device-to-device copy: {peak / 1e9:.0f} GB/s", flush=True)
    print("\n" + HEAD + "\n" + "-" * len(HEAD), flush=True)
    cases = []
    for rows in a.rows:
        for dim in a.dims:
            for dtype_name in a.dtypes:
                spent = time.perf_counter() - t0
                if spent > a.budget:
                    case = {"rows": rows, "dim": dim, "dtype": dtype_name,
                            "skipped": f"time budget: {spent:.0f} s of {a.budget:.0f} spent"}
                    cases.append(case)
                    print_row(case)
                    continue
                try:
                    case = run_case(rows, dim, dtype_name, a, peak)
                except Exception as exc:  # fail soft: report, free, go on
                    case = {"rows": rows, "dim": dim, "dtype": dtype_name, "error": _error(exc)}
                    traceback.print_exc()
                torch.cuda.empty_cache()
                cases.append(case)
                print_row(case)
    print_summary(cases, peak)
    print(f"total {time.perf_counter() - t0:.0f} s")
    bench.results = {"info": info, "cases": cases}
    bench.baseline = {"kind": "device-to-device copy bandwidth, same run", "copy_GBps": peak / 1e9}
    bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
