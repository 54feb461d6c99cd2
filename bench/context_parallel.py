"""Context parallelism on a small CPU box: step time, peak memory per rank and the share of time
in communication for one causal attention layer at long sequence lengths (DESIGN §7).

What is measured is the piece cp changes: the attention core's forward + backward for one layer,
shapes like the tiny model's but long (B=1, 4 query heads, 2 kv heads, head dim 32, fp32; see
the flags). Inputs are random q, k, v [B, heads, L/cp, D] that need grad and a random output
gradient; the projections, RoPE and the rest of the block are the same per token at any cp and
are left out.

Rows (each configuration runs in fresh processes, started the way torchrun would: env:// over
gloo, 1 intra-op thread per rank):

    sdpa     cp=1  ``memtron.model.attention.sdpa_attention`` (torch SDPA: what one process runs)
    blocked  cp=1  the exact blocked kernel of ``memtron.parallel.context`` over the whole
                   sequence: ``attention_lse(causal=True)`` forward and ``attention_lse_backward``
                   in a small autograd Function of this file (``ring_attention`` itself cannot run
                   at cp=1: its backward sends to itself and gloo has no self pair)
    ring     cp>1  ``ring_attention`` on the cp group of ``build_mesh``; each rank holds
                   its zigzag chunks (rank, 2cp-1-rank)

Step time: ranks meet at a barrier, then each times forward and backward; a step's time is the
slowest rank's, and the table gives the median over the measured steps. Before them every
process runs one small step (256 local tokens: lazy init, gloo connections) and ``--warmup``
full-size steps. tokens/s = L / step time (global tokens of the sequence per second).

Peak memory per rank (CPU has no allocator statistics): each configuration runs in a fresh
process; after imports, process-group set-up and the small warm-up step, the rank reads its
current RSS (/proc/self/statm), then allocates the inputs and runs every full-size step; the peak
is ``ru_maxrss`` at the end minus that RSS (inputs, their gradients, activations and kernel
temporaries; the ~0.3 GiB of the Python/torch/gloo runtime is shown separately as the RSS
column). The kernel tracks ``ru_maxrss`` exactly, so short-lived peaks are not missed. Flagged
"<=" when ``ru_maxrss`` did not grow during the steps (the peak is then below the set-up's).
This is what the process takes from the machine, glibc's retained free blocks included. As a
cross-check (``--profile-memory``, on by default for L <= 8K) one extra step runs under
``torch.profiler`` with ``profile_memory=True``; its per-allocation records are replayed to
the peak of live tensor bytes (plus the inputs and gradients already live), a lower bound.

Before a configuration starts, its peak is estimated (formulas in :func:`estimate_bytes`); a
configuration whose ranks together would need more than the machine's RAM, or more than is
available right now (other jobs share the machine), is reported as skipped with the estimate,
not run.

Communication: memtron's own ``RingTraffic`` counter (``memtron.parallel.context``) adds the
wall time of ``Ring.start`` (posting ``batch_isend_irecv``) and ``Ring.finish`` (waiting on the
requests) and the bytes sent, separately for forward and backward; nothing of memtron is
patched. comm = their time / the rank's step time, averaged over ranks. This is the time a
rank is not computing because of the ring: transfer not hidden behind compute plus waiting for
a slower peer. Forward posts the next K/V before computing on the current one (overlap
possible); backward posts and waits back to back, so its transfers are fully exposed. To
split transfer from waiting, each rank afterwards times the same hops alone (barrier, post,
wait; median of 5): the "isolated" columns.

The share of the cores used by other processes during each configuration (/proc/stat busy
time minus this benchmark's own CPU time) is printed per row. On a contended machine a layout
with more ranks also gets a larger share of the cores, so compare rows with similar "others".

At the end, the longest length that would fit in RAM is projected per layout from the two
longest runs (peak RSS per rank linear in L; all ranks share the machine's RAM), with the step
time that length would take (quadratic in L).

On 2 cores, cp=2 uses both cores and cp=4 oversubscribes them 2x (4 single-threaded ranks): its
step time includes time-slicing between ranks, and the waits in the ring include waiting for
a descheduled peer.

    python bench/context_parallel.py            # 2K, 8K, 32K x cp 1, 2, 4 (< 10 min)
    python bench/context_parallel.py --quick    # 2K, cp 1 and 2 (< 60 s)
    python bench/context_parallel.py --lengths 65536 --cps 4 --repeats 1 --warmup 0
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memtron.bench.harness import (  # noqa: E402 - after the sys.path line
    BenchRun,
    ForeignCpu,
    GiB,
    MiB,
    add_output_args,
    mem_available,
    meminfo,
    peak_rss,
    rss,
    spawn_ranks,
)

RUNTIME_BYTES = 400 * MiB  # per process: Python + torch + gloo (+ megatron for cp > 1), roughly
SAFETY_BYTES = 1 * GiB  # kept free on top of the estimate
WARM_LOCAL = 256  # local tokens of the small warm-up step
# Steps per length when --warmup/--repeats are not given: (warm-up, measured).
DEFAULT_STEPS = {2048: (2, 5), 8192: (1, 3)}
LONG_STEPS = (0, 1)  # lengths above 8K: one measured step, no full-size warm-up


@dataclass
class Shape:
    batch: int = 1
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    dtype: str = "float32"


@dataclass
class Run:
    length: int
    cp: int
    kernel: str  # sdpa | blocked | ring
    warmup: int
    repeats: int
    shape: Shape = field(default_factory=Shape)
    profile_memory: bool = False


# --------------------------------------------------------------------------- estimates


def score_work(length: int, cp: int, kernel: str) -> float:
    """Attention-score elements computed per rank, in units of L^2. The blocked kernel and
    SDPA's flash kernel both skip key blocks above the diagonal (~L^2/2); a ring rank runs
    2cp+1 chunk pairs of (L/2cp)^2 each (the diagonal ones half-skipped inside the kernel)."""
    if kernel in ("blocked", "sdpa"):
        return 0.5
    return (2 * cp + 1) / (4 * cp * cp)


def estimate_bytes(run: Run, sdpa_flash: bool) -> int:
    """Peak working set of one rank beyond the runtime, conservatively (x1.5 margin).

    Tensors per local token: q, dq, out, dout (heads x D each), k, v, dk, dv (kv_heads x D),
    fp32 copies/accumulators of all of them in the torch kernels, lse. Kernel temporaries: the
    blocked kernel and each ring pair hold ~6 [heads, queries, keys-in-block] fp32 tensors at once
    (scores, mask, exp, p, ds, dO V^T); SDPA's math path would hold ~3 [heads, L, L] ones, its
    flash path only per-thread tiles."""
    s = run.shape
    local = run.length // run.cp
    elt = torch.finfo(getattr(torch, s.dtype)).bits // 8
    per_token = (4 * s.heads + 4 * s.kv_heads) * s.head_dim * (elt + 4) + 4 * 4 * s.heads
    tensors = s.batch * local * per_token
    if run.kernel == "ring":
        tensors += 2 * s.batch * local * 4 * s.kv_heads * s.head_dim * 4  # blocks in flight
    if run.kernel == "sdpa":
        temps = 0 if sdpa_flash else 3 * s.batch * s.heads * run.length**2 * 4
    else:
        queries = local if run.kernel == "blocked" else local // 2
        keys = min(512, queries)
        temps = 6 * s.batch * s.heads * queries * keys * 4
    return int(1.5 * (tensors + temps))


def sdpa_uses_flash(shape: Shape) -> bool:
    from torch.nn.attention import SDPBackend

    q = torch.zeros(shape.batch, shape.heads, 64, shape.head_dim)
    k = torch.zeros(shape.batch, shape.kv_heads, 64, shape.head_dim)
    choice = torch._fused_sdp_choice(q, k, k, is_causal=True,
                                     enable_gqa=shape.heads != shape.kv_heads)
    return int(choice) == int(SDPBackend.FLASH_ATTENTION)


# --------------------------------------------------------------------------- inside a rank


class _Blocked(torch.autograd.Function):
    """The blocked exact kernel over the whole sequence, as one differentiable call."""

    @staticmethod
    def forward(ctx, q, k, v):
        from memtron.parallel.context import attention_lse

        out, lse = attention_lse(q, k, v, True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        from memtron.parallel.context import attention_lse_backward

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_lse_backward(q, k, v, out, lse, grad_out, True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _profiled_peak(step) -> int | None:
    """Peak of live CPU bytes allocated during one step above those live at its start, replayed
    from the profiler's per-allocation records (a private but stable field of torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in sorted(records):
        live += nbytes
        peak = max(peak, live)
    return peak


def _isolated_transfer(state, qkv, repeats: int = 5) -> dict:
    """Seconds one ring hop of the forward payload (K, V) and of the backward one (K, V and
    their fp32 dK/dV accumulators) takes with nothing else running: ranks aligned by a barrier,
    then post + wait, median over ``repeats``. Excludes waiting for a slower peer."""
    import torch.distributed as dist

    from memtron.parallel.context import Ring

    ring = Ring(state.cp_group, state.cp, state.cp_rank)
    k, v = (t.detach() for t in qkv[1:])
    payloads = {"fwd": [k, v], "bwd": [k, v, k.float(), v.float()],
                "last": [k.float(), v.float()]}
    out = {}
    for name, tensors in payloads.items():
        times = []
        for _ in range(repeats):
            dist.barrier(group=state.cp_group)
            t = time.perf_counter()
            ring.finish(ring.start(tensors))
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def rank_main(rank: int, run: Run) -> dict:
    import torch.distributed as dist

    from memtron.model.attention import sdpa_attention
    from memtron.parallel.context import RingTraffic, ring_attention

    s = run.shape
    dtype = getattr(torch, s.dtype)
    state = None
    if run.cp > 1:
        from memtron.config import load_config
        from memtron.parallel.launch import init_distributed
        from memtron.parallel.mesh import build_mesh

        init_distributed(timeout_s=900)
        state = build_mesh(load_config(None, [
            f"parallel.cp={run.cp}", f"data.seq_len={run.length}",
            f"model.max_seq_len={run.length}", "parallel.ep=1"]))
        assert state.cp == run.cp, state
    def core(q, k, v):
        if run.kernel == "sdpa":
            return sdpa_attention(q, k, v, None)
        if run.kernel == "blocked":
            return _Blocked.apply(q, k, v)
        return ring_attention(q, k, v, state.cp_group, state.cp, state.cp_rank)

    def inputs(local: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(s.batch, s.heads, local, s.head_dim, generator=g, dtype=dtype)
        k = torch.randn(s.batch, s.kv_heads, local, s.head_dim, generator=g, dtype=dtype)
        v = torch.randn(s.batch, s.kv_heads, local, s.head_dim, generator=g, dtype=dtype)
        grad = torch.randn(s.batch, s.heads, local, s.head_dim, generator=g, dtype=dtype)
        return [t.requires_grad_(True) for t in (q, k, v)], grad

    def step(qkv, grad) -> tuple[float, float]:
        for t in qkv:
            t.grad = None
        if state is not None:
            dist.barrier(group=state.cp_group)
        RingTraffic.take()
        t0 = time.perf_counter()
        out = core(*qkv)
        t1 = time.perf_counter()
        out.backward(grad)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    # Small step first: lazy initialisation, gloo connections, thread pools.
    step(*inputs(WARM_LOCAL, 1000 + rank))
    rss_start, maxrss_start = rss(), peak_rss(hwm=False)
    local = run.length // run.cp
    qkv, grad = inputs(local, rank)
    for _ in range(run.warmup):
        step(qkv, grad)
    steps = []
    for _ in range(run.repeats):
        fwd, bwd = step(qkv, grad)
        steps.append({"fwd": fwd, "bwd": bwd, **RingTraffic.take()})
    maxrss_end = peak_rss(hwm=False)
    transfer = _isolated_transfer(state, qkv) if state is not None else None
    profiled = None
    if run.profile_memory:  # + what is live when the step starts: inputs, output grad, grads
        held = sum(t.numel() * t.element_size()
                   for t in [*qkv, grad, *(x.grad for x in qkv if x.grad is not None)])
        peak = _profiled_peak(lambda: step(qkv, grad))
        profiled = None if peak is None else peak + held
    if state is not None:
        dist.barrier(group=state.cp_group)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"steps": steps, "rss_start": rss_start, "maxrss_start": maxrss_start,
            "maxrss_end": maxrss_end, "profiled_peak": profiled, "transfer": transfer,
            "cpu_s": usage.ru_utime + usage.ru_stime}


# --------------------------------------------------------------------------- spawning


def _rank(rank: int, world: int, run: Run) -> dict:
    try:
        return rank_main(rank, run)
    finally:
        if run.cp > 1:
            from memtron.parallel.launch import shutdown_distributed
            from memtron.parallel.mesh import destroy_mesh

            destroy_mesh()
            shutdown_distributed()


# --------------------------------------------------------------------------- driver


def summarise(run: Run, results: list[dict]) -> dict:
    n = run.repeats
    step = [max(r["steps"][i]["fwd"] + r["steps"][i]["bwd"] for r in results) for i in range(n)]
    fwd = [max(r["steps"][i]["fwd"] for r in results) for i in range(n)]
    bwd = [max(r["steps"][i]["bwd"] for r in results) for i in range(n)]

    def comm(r: dict, phase: str | None) -> float:
        phases = ("fwd", "bwd") if phase is None else (phase,)
        return sum(st["post"][p] + st["wait"][p] for st in r["steps"] for p in phases)

    own = [sum(st["fwd"] + st["bwd"] for st in r["steps"]) for r in results]
    frac = [comm(r, None) / t for r, t in zip(results, own)]
    peaks = [r["maxrss_end"] - r["rss_start"] for r in results]
    return {
        "step_s": statistics.median(step), "steps_s": step,
        "fwd_s": statistics.median(fwd), "bwd_s": statistics.median(bwd),
        "tokens_per_s": run.length / statistics.median(step),
        "peak_bytes": max(peaks), "peak_upper_bound": any(
            r["maxrss_end"] <= r["maxrss_start"] for r in results),
        "rss_start_bytes": max(r["rss_start"] for r in results),
        "maxrss_bytes": max(r["maxrss_end"] for r in results),
        "profiled_peak_bytes": max((r["profiled_peak"] or 0) for r in results) or None,
        "comm_frac": statistics.fmean(frac), "comm_frac_ranks": frac,
        "comm_fwd_s": statistics.fmean(comm(r, "fwd") / n for r in results),
        "comm_bwd_s": statistics.fmean(comm(r, "bwd") / n for r in results),
        "wait_fwd_s": statistics.fmean(
            sum(st["wait"]["fwd"] for st in r["steps"]) / n for r in results),
        "bytes_per_step": results[0]["steps"][0]["bytes"]["fwd"]
        + results[0]["steps"][0]["bytes"]["bwd"],
        "cpu_s": [r["cpu_s"] for r in results],
        # Isolated transfer per step: cp-1 forward hops, cp-1 backward hops and the last one.
        "transfer_fwd_s": None if results[0]["transfer"] is None else (run.cp - 1) * max(
            r["transfer"]["fwd"] for r in results),
        "transfer_bwd_s": None if results[0]["transfer"] is None else max(
            (run.cp - 1) * r["transfer"]["bwd"] + r["transfer"]["last"] for r in results),
    }


def plan(args: argparse.Namespace) -> list[Run]:
    shape = Shape(args.batch, args.heads, args.kv_heads, args.head_dim, args.dtype)
    runs = []
    for length in args.lengths:
        warmup, repeats = DEFAULT_STEPS.get(length, LONG_STEPS)
        if args.warmup is not None:
            warmup = args.warmup
        if args.repeats is not None:
            repeats = args.repeats
        for cp in args.cps:
            kernels = [k for k in args.kernels if k != "ring"] if cp == 1 else ["ring"]
            for kernel in kernels:
                profile = args.profile_memory == "on" or (args.profile_memory == "auto"
                                                          and length <= 8192)
                runs.append(Run(length, cp, kernel, warmup, repeats, shape, profile))
    return runs


def fmt_mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2K only, cp 1 and 2 (< 60 s)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kernels", nargs="+", default=["sdpa", "blocked", "ring"],
                        choices=["sdpa", "blocked", "ring"], help="cp=1 rows: sdpa, blocked")
    parser.add_argument("--warmup", type=int, help="full-size warm-up steps (default per L)")
    parser.add_argument("--repeats", type=int, help="measured steps (default per L)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--profile-memory", choices=["auto", "on", "off"], default="auto",
                        help="cross-check the peak with torch.profiler(profile_memory=True) in "
                        "one extra step (auto: for L <= 8192 only)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per configuration, s")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.cps = [2048], [1, 2]
        if args.warmup is None:
            args.warmup = 1
        if args.repeats is None:
            args.repeats = 3

    shape = Shape(args.batch, args.heads, args.kv_heads, args.head_dim, args.dtype)
    flash = sdpa_uses_flash(shape)
    total = meminfo()["MemTotal"]
    print(f"memtron context parallel benchmark: B={shape.batch} heads={shape.heads} "
          f"kv_heads={shape.kv_heads} head_dim={shape.head_dim} {shape.dtype}, "
          f"1 thread/rank, {os.cpu_count()} cores, {total / GiB:.1f} GiB RAM, "
          f"torch {torch.__version__}")
    print(f"CPU SDPA backend for these shapes: {'flash (O(L) memory)' if flash else 'math'}; "
          f"loadavg at start: {Path('/proc/loadavg').read_text().split()[:3]}")

    rows = []
    t_begin = time.monotonic()
    bench = BenchRun("context_parallel", args).start()
    for run in plan(args):
        label = f"L={run.length:>6} cp={run.cp} {run.kernel:<7}"
        est = estimate_bytes(run, flash)
        need = run.cp * (est + RUNTIME_BYTES)
        row: dict[str, Any] = {"run": asdict(run), "estimate_bytes": est,
                               "work_per_rank": score_work(run.length, run.cp, run.kernel)}
        if run.length % (2 * run.cp):
            row["status"] = f"skipped: L not divisible by 2cp={2 * run.cp}"
        elif need > total - 2 * GiB:
            row["status"] = f"does not fit: est. {need / GiB:.1f} GiB for {run.cp} rank(s)"
        elif need + SAFETY_BYTES > mem_available():
            row["status"] = (f"skipped: est. {need / GiB:.1f} GiB > "
                             f"{mem_available() / GiB:.1f} GiB available now")
        else:
            with ForeignCpu() as foreign:
                ranks = spawn_ranks(_rank, run.cp, (run,), timeout=args.timeout)
            if not ranks.ok:
                err = "\n".join(ranks.errors)
                row["status"] = "failed: " + err.strip().splitlines()[-1][:120]
                print(f"{label} FAILED\n{err}", flush=True)
            else:
                row.update(summarise(run, ranks.results), status="ok", wall_s=ranks.wall_seconds,
                           foreign_cores=foreign.share * (os.cpu_count() or 1))
        rows.append(row)
        if row["status"] == "ok":
            print(f"{label} step {row['step_s'] * 1e3:10.1f} ms  comm {row['comm_frac']:5.1%}  "
                  f"peak {fmt_mib(row['peak_bytes'])} MiB/rank  (est. {fmt_mib(est)})  "
                  f"others {row['foreign_cores']:.2f} cores  [{row['wall_s']:.0f} s]", flush=True)
        else:
            print(f"{label} {row['status']}", flush=True)

    print(f"\nall configurations: {time.monotonic() - t_begin:.0f} s; loadavg at end: "
          f"{Path('/proc/loadavg').read_text().split()[:3]}\n")
    head = (f"{'L':>6} {'cp':>2} {'kernel':<7} {'step ms':>10} {'fwd ms':>9} {'bwd ms':>9} "
            f"{'tokens/s':>9} {'peak MiB/rank':>13} {'RSS MiB':>8} {'work/rank':>9} "
            f"{'comm':>6} {'others':>6}  status")
    print(head)
    print("-" * len(head))
    for row in rows:
        run = row["run"]
        if row["status"] != "ok":
            print(f"{run['length']:>6} {run['cp']:>2} {run['kernel']:<7} {'-':>10} {'-':>9} "
                  f"{'-':>9} {'-':>9} {'-':>13} {'-':>8} {row['work_per_rank']:>8.3f}L2 "
                  f"{'-':>6} {'-':>6}  {row['status']}")
            continue
        peak = ("<=" if row["peak_upper_bound"] else "") + fmt_mib(row["peak_bytes"])
        comm = f"{row['comm_frac']:.1%}" if run["cp"] > 1 else "-"
        reps = f"{run['repeats']} step{'s' if run['repeats'] > 1 else ''}"
        print(f"{run['length']:>6} {run['cp']:>2} {run['kernel']:<7} "
              f"{row['step_s'] * 1e3:>10.1f} {row['fwd_s'] * 1e3:>9.1f} {row['bwd_s'] * 1e3:>9.1f} "
              f"{row['tokens_per_s']:>9.0f} {peak:>13} {fmt_mib(row['maxrss_bytes']):>8} "
              f"{row['work_per_rank']:>8.3f}L2 {comm:>6} {row['foreign_cores']:>6.2f}  "
              f"ok ({reps}{', 2x oversubscribed' if run['cp'] > (os.cpu_count() or 1) else ''})")

    ring_rows = [r for r in rows if r["status"] == "ok" and r["run"]["cp"] > 1]
    if ring_rows:
        print("\nring communication per step and rank (mean over ranks). comm = time inside "
              "Ring.start + Ring.finish (memtron's RingTraffic); isolated = the same hops "
              "timed alone after a barrier (pure transfer); comm - isolated = waiting for a peer")
        print(f"{'L':>6} {'cp':>2} {'MiB sent':>9} {'fwd comm ms':>11} {'of fwd':>7} "
              f"{'isolated':>9} {'bwd comm ms':>11} {'of bwd':>7} {'isolated':>9}  "
              "comm share per rank")
        for row in ring_rows:
            run = row["run"]
            ranks = " ".join(f"{f:.0%}" for f in row["comm_frac_ranks"])
            print(f"{run['length']:>6} {run['cp']:>2} {row['bytes_per_step'] / MiB:>9.1f} "
                  f"{row['comm_fwd_s'] * 1e3:>11.1f} {row['comm_fwd_s'] / row['fwd_s']:>7.1%} "
                  f"{row['transfer_fwd_s'] * 1e3:>9.1f} {row['comm_bwd_s'] * 1e3:>11.1f} "
                  f"{row['comm_bwd_s'] / row['bwd_s']:>7.1%} {row['transfer_bwd_s'] * 1e3:>9.1f}"
                  f"  {ranks}")
    if any(r["status"] == "ok" and r["profiled_peak_bytes"] for r in rows):
        print("\npeak memory per rank, MiB: RSS (ru_maxrss delta, what the process took from the "
              "machine) vs live tensor bytes (torch.profiler replay of one more step)")
        for row in rows:
            if row["status"] == "ok" and row["profiled_peak_bytes"]:
                run = row["run"]
                print(f"{run['length']:>6} {run['cp']:>2} {run['kernel']:<7} "
                      f"{fmt_mib(row['peak_bytes']):>8} {fmt_mib(row['profiled_peak_bytes']):>8}")
    fits: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        if row["status"] == "ok":
            fits.setdefault((row["run"]["cp"], row["run"]["kernel"]), []).append(row)
    if fits:
        print(f"\nlongest length run here, and a projection to {total / GiB:.0f} GiB RAM "
              "(peak RSS linear in L through the two longest runs, + runtime per rank; step time "
              "quadratic from the longest run):")
        for (cp, kernel), group in sorted(fits.items()):
            group.sort(key=lambda r: r["run"]["length"])
            last = group[-1]
            length = last["run"]["length"]
            text = f"  cp={cp} {kernel:<7} ran {length:>6}"
            if len(group) > 1:
                prev = group[-2]
                slope = ((last["peak_bytes"] - prev["peak_bytes"])
                         / (length - prev["run"]["length"]))
                budget = (total - 2 * GiB) / cp - last["rss_start_bytes"]
                if slope > 0:
                    max_len = length + (budget - last["peak_bytes"]) / slope
                    hours = last["step_s"] * (max_len / length) ** 2 / 3600
                    text += (f"; fits up to ~{max_len / 1e3:,.0f}K tokens "
                             f"({slope * 1024 / MiB:.2f} MiB per 1K tokens per rank), "
                             f"where one step would take ~{hours:,.1f} h")
            print(text)
    bench.results = rows
    bench.baseline = {"kind": "cp=1 SDPA (torch's attention) on one process, same shapes",
                      "per_length": {str(r["run"]["length"]): {
                          "step_s": r["step_s"], "peak_bytes": r["peak_bytes"]}
                          for r in rows if r["status"] == "ok" and r["run"]["kernel"] == "sdpa"}}
    bench.finish()
    return 0 if all(r["status"] == "ok" or r["status"].startswith(("skipped", "does not"))
                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
