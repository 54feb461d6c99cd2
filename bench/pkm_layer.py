"""One product-key memory layer, forward + backward + optimizer step: memtron against the peer.

memtron: ``ProductKeyMemory`` over a ``LocalValueTable`` (sparse row gradient kept on the table),
dense parameters with AdamW and the table with ``SparseRowOptimizer``
(``train.optim.build_optimizers`` with the default ``OptimConfig``, no clipping). Peer:
lucidrains' ``product_key_memory.PKM`` at the same dim / heads / num_keys / topk / half-key
width, its values an ``nn.EmbeddingBag`` with a dense gradient, and the optimizer its README
recommends: ``Adam(fetch_optimizer_parameters(pkm))``,
i.e. dense Adam over every parameter with lr 1e-2 for the values and 1e-3 for the rest.

Both sides run plain PKM (memtron ``memory_plus=False``, value dim = model dim); memtron with
Memory+ (gate and output projection) is reported beside, without a peer counterpart
(``--no-memory-plus`` drops it). Step times are medians over ``--repeats`` steps after
``--warmup`` steps, both sides timed in this process one after the other (never two tables held
at once). Peak memory is measured in a fresh 'spawn' child per (side, size): the kernels are
warmed on a tiny layer, the RSS high-water mark is reset (``/proc/self/clear_refs`` = 5), then
the layer is built and stepped; peak = VmHWM - VmRSS at the reset. (Plain ``ru_maxrss`` is not
usable in a spawn child: it starts at the parent's high-water mark.) A side whose estimated peak
does not fit in MemAvailable is skipped and reported with its estimate.

Gather bandwidth: bytes of value rows the lookup reads (T*H*k*d*4) over the time of
``table.lookup`` forward alone (no autograd) and over the time of its backward alone (which
gathers the same rows again for the weight gradient and builds the row gradients), as a fraction
of the machine's memcpy bandwidth (``dst.copy_(src)`` on 256 MiB, bytes read + written per s).

    python bench/pkm_layer.py                       # full run (< 10 min on 2 cores)
    python bench/pkm_layer.py --quick               # smoke test (< 60 s)
    python bench/pkm_layer.py --sizes 1M --dims 512 --no-memory --profile none
    THP_MEM_ALLOC_ENABLE=1 python bench/pkm_layer.py   # torch CPU tensors on huge pages
    python bench/pkm_layer.py --device cuda         # on a GPU: N = 1M/4M, d = 512/1024, T = 8192
    python bench/pkm_layer.py --device cuda --quick # GPU smoke test

With ``--device cuda`` both sides run on the GPU: times are wall-clock with
``torch.cuda.synchronize`` before each mark, peak memory is ``torch.cuda.max_memory_allocated``
over build + steps in this process minus what was allocated before the build (no children),
sides are skipped by the free GPU memory, the copy bandwidth is a device-to-device ``copy_`` of
1 GiB, and memtron's table rows are drawn on the GPU (``LocalValueTable(spec, device=...)``: the
host init's counter-based values, computed by torch ops on the GPU, never held on the host).

Other processes on the cores wreck CPU timings (a parallel torch op waits on a preempted
thread): the share of CPU they took is measured per row, and rows above 10% are starred.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from memtron.bench.harness import (
    BenchRun,
    ForeignCpu,
    GiB,
    MiB,
    add_output_args,
    cpu_model,
    fmt_count,
    mem_available,
    parse_count,
    peak_rss,
    reset_peak_rss,
    rss,
    spawn_ranks,
    warn_if_busy,
)

CPU = torch.device("cpu")
HEADROOM = int(1.0 * GiB)  # kept free when deciding whether a side fits
BUSY = 0.10  # foreign CPU share above which a row's timings are flagged


# -- sizes and estimates -------------------------------------------------------------------------
def parse_slots(text: str) -> int:
    """'64K' / '1M' / '4M' / '65536' (slots, a perfect square) -> n_sub_keys."""
    slots = parse_count(text)
    n = math.isqrt(slots)
    if n * n != slots:
        raise argparse.ArgumentTypeError(f"{text}: slot count {slots} is not a perfect square")
    return n


def fmt_slots(n: int) -> str:
    return fmt_count(n * n)


def estimate_bytes(side: str, n: int, d: int, a: argparse.Namespace) -> int:
    """Peak bytes the side adds, from the sizes of what it holds (checked against measurements).

    memtron: table + two fp32 Adam moments (3 N d), per-slot hit counts, and a handful of
    [touched rows, d] temporaries in backward and in the sparse step. Peer: table, its dense
    gradient, two Adam moments, and the two [N, d] temporaries of torch's single-tensor Adam
    (``exp_avg_sq.sqrt() / bias_correction2_sqrt``) alive at once (6 N d).
    """
    slots, hits = n * n, a.tokens * a.heads * a.topk
    touched = min(slots, hits)
    retrieval = 8 * a.tokens * a.heads * n * 4 + 4 * hits * 8
    dense = 4 * (a.heads * a.d_key * d + 2 * a.heads * n * a.d_key // 2 + 2 * d * d) * 4
    fixed = 256 * MiB + retrieval + dense
    if side == "peer":
        return 6 * slots * d * 4 + fixed
    return 3 * slots * d * 4 + 4 * slots + 6 * touched * d * 4 + fixed


# -- the two sides -------------------------------------------------------------------------------
class MemtronSide:
    """ProductKeyMemory + LocalValueTable, AdamW (dense) + SparseRowOptimizer (table)."""

    def __init__(self, n: int, d: int, a: argparse.Namespace, memory_plus: bool = False) -> None:
        from memtron.config import MemoryConfig, OptimConfig
        from memtron.model.memory.product_key import ProductKeyMemory
        from memtron.model.tables import LocalValueTable, TableSpec
        from memtron.train.optim import build_optimizers

        cfg = MemoryConfig(layers=[0], memory_plus=memory_plus, n_heads=a.heads, topk=a.topk,
                           d_key=a.d_key, n_sub_keys=n, value_dim=d)
        if a.device.type == "cuda":
            self.table = LocalValueTable(TableSpec("values", n * n, d), device=a.device)
        else:
            self.table = LocalValueTable(TableSpec("t", n * n, d))
        self.layer = ProductKeyMemory(d, cfg, self.table, init_std=0.02,
                                      out_std=0.02).to(a.device)
        self.dense, self.sparse = build_optimizers(self.layer, {"values": self.table},
                                                   OptimConfig())

    def step(self, x: torch.Tensor, gy: torch.Tensor) -> None:
        self.layer(x).backward(gy)
        self.dense.step()
        self.sparse.step()
        self.dense.zero_grad(set_to_none=True)
        self.sparse.zero_grad()

    def phases(self, x: torch.Tensor, gy: torch.Tensor) -> dict[str, float]:
        """One plain-PKM step with each phase timed (forward written out as ``layer.forward``)."""
        marks: dict[str, float] = {}
        now = clock(x.device)
        t0 = now()
        ids, weights = self.layer.retrieve(x)
        t1 = now()
        y = self.table.lookup(ids, weights)
        t2 = now()

        def mark(grad: torch.Tensor) -> None:
            marks.setdefault("lookup_bwd_done", now())

        weights.register_hook(mark)
        y.backward(gy)
        t3 = now()
        self.dense.step()
        t4 = now()
        self.table.sparse_grad()  # the coalescing pass SparseRowOptimizer.step starts with
        t5 = now()
        self.sparse.step()
        t6 = now()
        self.dense.zero_grad(set_to_none=True)
        self.sparse.zero_grad()
        t7 = now()
        mid = marks["lookup_bwd_done"]
        return {
            "fwd: retrieve (query, scores, top-k)": t1 - t0,
            "fwd: table.lookup (embedding_bag gather)": t2 - t1,
            "bwd: lookup backward (row dot + row grads)": mid - t2,
            "bwd: retrieve backward": t3 - mid,
            "opt: AdamW dense step": t4 - t3,
            "opt: sparse_grad coalesce (2nd dedup)": t5 - t4,
            "opt: SparseRowOptimizer row update": t6 - t5,
            "zero_grad": t7 - t6,
        }

    def lookup_bandwidth(self, x: torch.Tensor, gy: torch.Tensor,
                         repeats: int) -> tuple[float, float, int]:
        """(forward s, backward s, value bytes read) of ``table.lookup`` alone."""
        with torch.no_grad():
            ids, weights = self.layer.retrieve(x)
        nbytes = ids.numel() * self.table.dim * self.table.weight.element_size()

        def fwd() -> None:
            with torch.no_grad():
                self.table.lookup(ids, weights)

        now = clock(x.device)
        bwd_times = []
        for i in range(repeats + 1):
            w = weights.clone().requires_grad_(True)
            y = self.table.lookup(ids, w)
            t0 = now()
            y.backward(gy)
            if i:
                bwd_times.append(now() - t0)
            self.table.zero_grad_rows()
        return median_time(fwd, 1, repeats, x.device), statistics.median(bwd_times), nbytes


class PeerSide:
    """product_key_memory.PKM with Adam(fetch_optimizer_parameters(pkm)), as its README says."""

    def __init__(self, n: int, d: int, a: argparse.Namespace) -> None:
        from product_key_memory import PKM, fetch_optimizer_parameters

        with torch.device(a.device):  # parameters made and initialised where they run
            self.layer = PKM(dim=d, heads=a.heads, num_keys=n, topk=a.topk,
                             dim_head=a.d_key // 2)
        self.opt = torch.optim.Adam(fetch_optimizer_parameters(self.layer), lr=1e-3)

    def step(self, x: torch.Tensor, gy: torch.Tensor) -> None:
        self.layer(x.unsqueeze(0)).backward(gy.unsqueeze(0))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def phases(self, x: torch.Tensor, gy: torch.Tensor) -> dict[str, float]:
        now = clock(x.device)
        t0 = now()
        y = self.layer(x.unsqueeze(0))
        t1 = now()
        y.backward(gy.unsqueeze(0))
        t2 = now()
        self.opt.step()
        t3 = now()
        self.opt.zero_grad(set_to_none=True)
        t4 = now()
        return {"fwd": t1 - t0, "bwd (dense [N, d] value grad)": t2 - t1,
                "opt: dense Adam over all params": t3 - t2, "zero_grad": t4 - t3}


SIDES = ("memtron", "peer", "memtron+")


def build(side: str, n: int, d: int, a: argparse.Namespace) -> MemtronSide | PeerSide:
    if side == "peer":
        return PeerSide(n, d, a)
    return MemtronSide(n, d, a, memory_plus=side == "memtron+")


def inputs(d: int, tokens: int, device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234 + d)
    x, gy = torch.randn(tokens, d, generator=g), torch.randn(tokens, d, generator=g)
    return x.to(device), gy.to(device)


def clock(device: torch.device) -> Callable[[], float]:
    """``time.perf_counter``; on a GPU it first waits for the work queued so far, so that the
    time between two marks is the time of the work issued between them."""
    if device.type != "cuda":
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def median_time(fn: Callable[[], object], warmup: int, repeats: int,
                device: torch.device = CPU) -> float:
    now = clock(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times)


def free() -> None:
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# -- peak memory in a fresh child ----------------------------------------------------------------
def warm_kernels(side: str, d: int, a: argparse.Namespace) -> None:
    """A few steps of a tiny layer (n = 2k sub-keys), so first-call costs stay out of the way."""
    tiny = build(side, 2 * a.topk, d, a)
    x, gy = inputs(d, 64, a.device)
    for _ in range(2):
        tiny.step(x, gy)


def _peak_child(rank: int, world: int, side: str, n: int, d: int,
                opts: dict) -> tuple[int, bool]:
    a = argparse.Namespace(**opts)
    # Warm the kernels (oneDNN / MKL / topk / embedding_bag) on a tiny layer first, so that
    # one-off library buffers are not charged to the layer.
    warm_kernels(side, d, a)
    x, gy = inputs(d, a.tokens)
    gc.collect()
    hwm = reset_peak_rss()
    base = rss()
    obj = build(side, n, d, a)
    for _ in range(a.warmup + a.mem_steps):
        obj.step(x, gy)
    return peak_rss(hwm) - base, hwm


def measure_peak_cuda(side: str, n: int, d: int, a: argparse.Namespace) -> float:
    """MiB the side adds on the GPU over build + steps, from the caching allocator's own count:
    ``max_memory_allocated`` minus what was allocated right before the build (kernels and
    library workspaces were warmed first, by ``run_config``)."""
    x, gy = inputs(d, a.tokens, a.device)
    free()
    torch.cuda.reset_peak_memory_stats(a.device)
    base = torch.cuda.memory_allocated(a.device)
    obj = build(side, n, d, a)
    for _ in range(a.warmup + a.mem_steps):
        obj.step(x, gy)
    torch.cuda.synchronize(a.device)
    peak = torch.cuda.max_memory_allocated(a.device) - base
    del obj
    free()
    return peak / MiB


def measure_peak(side: str, n: int, d: int, a: argparse.Namespace) -> float | str:
    if a.device.type == "cuda":
        return measure_peak_cuda(side, n, d, a)
    child = spawn_ranks(_peak_child, 1, (side, n, d, vars(a)), threads=a.threads)
    if not child.ok:
        return "child failed: " + child.errors[0].strip().splitlines()[-1][:100]
    value, hwm = child.results[0]
    if not hwm:
        print("  (no /proc/self/clear_refs: fell back to ru_maxrss, which a spawn child "
              "inherits from its parent's peak; numbers may be too high)", flush=True)
    return value / MiB


# -- machine -------------------------------------------------------------------------------------
def copy_bytes(device: torch.device) -> int:
    return GiB if device.type == "cuda" else 256 * MiB


def memcpy_bandwidth(device: torch.device = CPU, repeats: int = 7) -> float:
    """``dst.copy_(src)``, bytes read + written per second (host memory, or the GPU's)."""
    nbytes = copy_bytes(device)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), 2, repeats, device)


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Row:
    n: int
    d: int
    ms: dict[str, float | None] = field(default_factory=dict)
    mib: dict[str, float | str | None] = field(default_factory=dict)
    fwd_gbs: float | None = None
    bwd_gbs: float | None = None
    foreign: float = 0.0  # largest share of CPU other processes took while a side was timed
    notes: list[str] = field(default_factory=list)


def available(device: torch.device) -> int:
    """Bytes a side may take: MemAvailable, or the GPU's free memory."""
    if device.type == "cuda":
        free()
        return torch.cuda.mem_get_info(device)[0]
    return mem_available()


def fits(side: str, n: int, d: int, a: argparse.Namespace) -> tuple[bool, str]:
    need, avail = estimate_bytes(side, n, d, a), available(a.device)
    if need + HEADROOM <= avail:
        return True, ""
    return False, (f"skipped (needs ~{need / GiB:.1f} GiB, {avail / GiB:.1f} GiB available)")


def run_config(n: int, d: int, a: argparse.Namespace, sides: list[str], memcpy: float) -> Row:
    row = Row(n, d)
    x, gy = inputs(d, a.tokens, a.device)
    for side in sides:
        warm_kernels(side, d, a)
    runnable = []
    for side in sides:
        ok, why = fits(side, n, d, a)
        if not ok:
            row.ms[side] = row.mib[side] = None
            row.notes.append(f"{side}: {why}")
            print(f"  N={fmt_slots(n)} d={d} {side}: {why}", flush=True)
            continue
        runnable.append(side)
        t0 = time.perf_counter()
        obj = build(side, n, d, a)
        t_build = time.perf_counter() - t0
        with ForeignCpu() as meter:
            row.ms[side] = 1e3 * median_time(lambda obj=obj: obj.step(x, gy), a.warmup,
                                             a.repeats, a.device)
            if side == "memtron":
                fwd, bwd, nbytes = obj.lookup_bandwidth(x, gy, max(3, a.repeats))
        row.foreign = max(row.foreign, meter.share)
        line = (f"  N={fmt_slots(n)} d={d} {side}: build {t_build:.1f} s, "
                f"step {row.ms[side]:.0f} ms")
        if side == "memtron":
            row.fwd_gbs, row.bwd_gbs = nbytes / fwd / 1e9, nbytes / bwd / 1e9
            line += (f", lookup fwd {1e3 * fwd:.1f} ms ({row.fwd_gbs:.1f} GB/s = "
                     f"{1e9 * row.fwd_gbs / memcpy:.0%} of memcpy), bwd {1e3 * bwd:.1f} ms")
        line += f", other processes {meter.share:.0%} CPU"
        print(line, flush=True)
        del obj
        free()
    for side in runnable:
        if a.no_memory:
            row.mib[side] = None
            continue
        row.mib[side] = measure_peak(side, n, d, a)
        peak = row.mib[side]
        shown = f"{peak:.0f} MiB" if isinstance(peak, float) else peak
        est = estimate_bytes(side, n, d, a) / MiB
        print(f"  N={fmt_slots(n)} d={d} {side}: peak +{shown} (estimate {est:.0f} MiB)",
              flush=True)
    return row


def profile(n: int, d: int, a: argparse.Namespace) -> None:
    x, gy = inputs(d, a.tokens, a.device)
    print(f"\nWhere the step goes at N={fmt_slots(n)}, d={d}, T={a.tokens} "
          f"(median of {a.repeats} steps, ms):")
    for side in ("memtron", "peer"):
        ok, why = fits(side, n, d, a)
        if not ok:
            print(f"  {side}: {why}")
            continue
        obj = build(side, n, d, a)
        for _ in range(a.warmup):
            obj.step(x, gy)
        with ForeignCpu() as meter:
            runs = [obj.phases(x, gy) for _ in range(a.repeats)]
        parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        total = sum(parts.values())
        print(f"  {side} (sum {1e3 * total:.0f} ms; other processes {meter.share:.0%} CPU)")
        for name, sec in parts.items():
            print(f"    {name:<44} {1e3 * sec:8.1f}  {sec / total:6.1%}")
        del obj, runs
        free()


def fmt(value: float | str | None, spec: str, width: int) -> str:
    if value is None:
        return f"{'skip':>{width}}"
    if isinstance(value, str):
        return f"{'fail':>{width}}"
    return f"{value:>{width}{spec}}"


def ratio(num: float | str | None, den: float | str | None) -> float | None:
    if isinstance(num, float) and isinstance(den, float) and den > 0:
        return num / den
    return None


def print_table(rows: list[Row], a: argparse.Namespace, memcpy: float) -> None:
    plus = "memtron+" in a.sides
    head = (f"{'N':>5} {'d':>4} | {'memtron':>8} {'peer':>8} {'peer/mt':>7} | "
            f"{'memtron':>8} {'peer':>8} {'peer/mt':>7} | {'fwd GB/s':>8} {'of cpy':>6} "
            f"{'bwd GB/s':>8} {'of cpy':>6}")
    if plus:
        head += f" | {'mem+ ms':>8} {'mem+ MiB':>8}"
    top = (" " * 12 + "step time, ms" + " " * 15 + "peak memory, MiB" + " " * 14
           + "value gather (memtron lookup)")
    if plus:
        top += " " * 7 + "Memory+"
    print("\n" + top)
    print(head)
    print("-" * len(head))
    for r in rows:
        mark = "*" if r.foreign > BUSY else " "
        line = (f"{fmt_slots(r.n):>4}{mark} {r.d:>4} | {fmt(r.ms.get('memtron'), '.0f', 8)} "
                f"{fmt(r.ms.get('peer'), '.0f', 8)} "
                f"{fmt(ratio(r.ms.get('peer'), r.ms.get('memtron')), '.2f', 7)} | "
                f"{fmt(r.mib.get('memtron'), '.0f', 8)} {fmt(r.mib.get('peer'), '.0f', 8)} "
                f"{fmt(ratio(r.mib.get('peer'), r.mib.get('memtron')), '.2f', 7)} | "
                f"{fmt(r.fwd_gbs, '.1f', 8)} "
                f"{fmt(None if r.fwd_gbs is None else 1e9 * r.fwd_gbs / memcpy, '.0%', 6)} "
                f"{fmt(r.bwd_gbs, '.1f', 8)} "
                f"{fmt(None if r.bwd_gbs is None else 1e9 * r.bwd_gbs / memcpy, '.0%', 6)}")
        if plus:
            line += (f" | {fmt(r.ms.get('memtron+'), '.0f', 8)} "
                     f"{fmt(r.mib.get('memtron+'), '.0f', 8)}")
        print(line)
    notes = [f"  N={fmt_slots(r.n)} d={r.d} {note}" for r in rows for note in r.notes]
    notes += [f"  N={fmt_slots(r.n)} d={r.d} {side}: {v}" for r in rows
              for side, v in r.mib.items() if isinstance(v, str)]
    if any(r.foreign > BUSY for r in rows):
        notes.append(f"  * other processes took > {BUSY:.0%} of the CPUs while this row was "
                     "timed: its times are unreliable (rerun on an idle machine)")
    if notes:
        print("notes:\n" + "\n".join(notes))
    copied = copy_bytes(a.device) // MiB
    where = "device copy" if a.device.type == "cuda" else "memcpy"
    print(f"{where} bandwidth {memcpy / 1e9:.1f} GB/s (read + written, {copied} MiB copy_). "
          "Gather GB/s = T*H*k*d*4 value bytes / time of table.lookup forward (no autograd), "
          "resp. of its backward alone; > 100% of memcpy = rows reused from cache (small N).")
    if a.no_memory:
        mem = "not measured (--no-memory)"
    elif a.device.type == "cuda":
        mem = ("torch.cuda.max_memory_allocated over build + "
               f"{a.warmup + a.mem_steps} steps, minus the memory allocated right before the "
               "build")
    else:
        mem = ("peak RSS (VmHWM, reset via /proc/self/clear_refs) of a fresh spawn child per "
               f"cell over build + {a.warmup + a.mem_steps} steps, minus its RSS right before "
               "the build")
    print(f"peak memory: {mem}.")
    print("peer/mt > 1 means memtron is faster / smaller.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=parse_slots, default=None,
                   help="slot counts N = n_sub_keys^2, e.g. 64K 1M 4M (default)")
    p.add_argument("--dims", nargs="+", type=int, default=None, help="value dims (256 512)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step T (2048)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps, median (5; 3 in --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (1)")
    p.add_argument("--mem-steps", type=int, default=1, help="steps after warmup in the "
                   "peak-memory child (1)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--d-key", type=int, default=512, help="full query width; peer dim_head = "
                   "d_key / 2")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--memory-plus", action=argparse.BooleanOptionalAction, default=None,
                   help="add a memtron Memory+ column (default: on, off in --quick)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--profile", default=None, help="N:d for the phase split (default 1M:512; "
                   "'none' to skip; off in --quick)")
    p.add_argument("--quick", action="store_true", help="N=64K, d=256, T=512 smoke run")
    add_output_args(p)
    p.add_argument("--device", type=torch.device, default=CPU,
                   help="cpu (default) or cuda: sizes default to 1M 4M, dims 512 1024, T 8192, "
                        "profile 1M:1024")
    a = p.parse_args(argv)
    quick, gpu = a.quick, a.device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    default_sizes = ("1M", "4M") if gpu else ("64K", "1M", "4M")
    a.sizes = a.sizes or ([parse_slots("64K")] if quick else
                          [parse_slots(s) for s in default_sizes])
    a.dims = a.dims or ([256] if quick else [512, 1024] if gpu else [256, 512])
    a.tokens = a.tokens or (512 if quick else 8192 if gpu else 2048)
    a.repeats = a.repeats or (3 if quick else 5)
    a.memory_plus = (not quick) if a.memory_plus is None else a.memory_plus
    a.profile = a.profile or ("none" if quick else "1M:1024" if gpu else "1M:512")
    a.sides = list(SIDES if a.memory_plus else SIDES[:2])
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    t_start = time.perf_counter()
    bench = BenchRun("pkm_layer", a).start()
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    print(f"memtron PKM layer bench: {cpu_model()}, {os.cpu_count()} cores "
          f"({len(os.sched_getaffinity(0))} usable), RAM {ram / GiB:.1f} GiB "
          f"({mem_available() / GiB:.1f} available)")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    if gpu:
        from memtron.model.memory import kernels

        props = torch.cuda.get_device_properties(a.device)
        triton = kernels.use_triton(torch.empty(0, 1, device=a.device))
        print(f"device: {props.name}, {props.total_memory / GiB:.1f} GiB "
              f"({torch.cuda.mem_get_info(a.device)[0] / GiB:.1f} free), CUDA "
              f"{torch.version.cuda}; memtron value-table kernels: "
              f"{'Triton' if triton else 'torch (MEMTRON_TRITON=0 or no triton)'}")
    print(f"H={a.heads} k={a.topk} d_key={a.d_key} T={a.tokens} fp32; warmup {a.warmup}, "
          f"median of {a.repeats}; sides {', '.join(a.sides)}")
    peer_adam = "foreach Adam on the GPU" if gpu else "single-tensor Adam on CPU"
    print("memtron: ProductKeyMemory(memory_plus=False) + LocalValueTable, AdamW + "
          "SparseRowOptimizer; peer: product_key_memory.PKM + Adam(fetch_optimizer_parameters) "
          f"(dense value grad, {peer_adam})")
    warn_if_busy("start")
    memcpy = memcpy_bandwidth(a.device)
    print(f"{'device copy' if gpu else 'memcpy'}: {memcpy / 1e9:.1f} GB/s", flush=True)

    rows = []
    for n in a.sizes:
        for d in a.dims:
            rows.append(run_config(n, d, a, a.sides, memcpy))
            free()
    print_table(rows, a, memcpy)
    if a.profile != "none":
        size, dim = a.profile.split(":")
        profile(parse_slots(size), int(dim), a)
    warn_if_busy("end")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s, load average "
          f"{os.getloadavg()[0]:.2f} (1 min)")
    bench.baseline = {"kind": "product_key_memory.PKM (lucidrains) step, same N/d/T, and "
                      f"{'device copy' if gpu else 'memcpy'} bandwidth",
                      "memcpy_gbs": memcpy / 1e9,
                      "peer_ms": {f"{fmt_slots(r.n)}/{r.d}": r.ms.get("peer") for r in rows}}
    bench.results = [{**asdict(r), "slots": fmt_slots(r.n), "busy": r.foreign > BUSY}
                     for r in rows]
    bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
