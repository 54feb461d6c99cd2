"""One harness for the bench/ scripts: spawning ranks, RAM and CPU-load probes, a byte meter on
torch.distributed, and the JSON result file every benchmark writes.

Benchmarks on a shared 2-core machine mean little without the load they ran under, and numbers
from different scripts compare only when they were probed the same way; so every script takes
these from here instead of carrying its own copy. The byte meter wraps ``torch.distributed``
(torch's functions, never memtron's) so that memtron is measured as shipped.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import resource
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30

# Byte-level tokens for benches that build their own corpus on configs/tiny-cpu.yaml (whose
# BPE tokenizer file exists only after `make data`): what they measure does not depend on the
# vocabulary, and their recorded results were taken with bytes.
BYTE_LEVEL = ("data.tokenizer=byte", "model.vocab_size=260")

# Variables through which a parent's launcher would leak into a spawned rank.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_RANK", "PMI_RANK")


# --------------------------------------------------------------------------- machine and RAM


def parse_count(text: str) -> int:
    """A count written '64K', '1M', '1.5G' (binary units) or '65536', for size options."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def fmt_count(n: int) -> str:
    """'64K' / '16M' where the count is a whole number of those units, else the number."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), so that a number is never read without it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, ...)."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


def mem_available() -> int:
    """Bytes the kernel could give a new allocation now without swapping."""
    return meminfo()["MemAvailable"]


def machine() -> dict[str, Any]:
    """What a result file names the machine by: host, CPU model, cores, RAM, software."""
    import torch

    info = meminfo()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count() or 1,
            "mem_total_gib": round(info["MemTotal"] / GiB, 1),
            "mem_available_gib": round(info["MemAvailable"] / GiB, 1),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__}


def machine_label(m: dict[str, Any]) -> str:
    """One line naming a machine, for tables and figure titles."""
    parts = [m.get("cpu", "?"), *([f"{m['cores']} cores"] if m.get("cores") else []),
             *([m["gpu"]] if m.get("gpu") else [])]
    return ", ".join(parts)


def vm_status(name: str) -> int:
    """VmRSS / VmHWM / ... of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {name} in /proc/self/status")


def rss() -> int:
    """This process's resident set now."""
    return vm_status("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0).

    Needed because a 'spawn' child's ``ru_maxrss`` starts at its parent's high-water mark (the
    forked mm's hiwater survives the exec), so after the parent held a big table every child
    would report at least that much."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss(hwm: bool = True) -> int:
    """The RSS high-water mark: VmHWM (resettable) or, where that was not reset, ru_maxrss."""
    if hwm:
        return vm_status("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --------------------------------------------------------------------------- CPU load


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine (all cores, steal included) from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(children: bool = True) -> float:
    """CPU seconds of this process (and of its children already waited for)."""
    t = os.times()
    own = t.user + t.system
    return own + (t.children_user + t.children_system if children else 0.0)


class ForeignCpu:
    """Share of the machine's cores that other processes (or the hypervisor, as steal) used
    while the block ran: /proc/stat busy time minus this process's own CPU time (and that of
    children reaped inside the block)."""

    share = 0.0

    def __enter__(self) -> ForeignCpu:
        self.t0 = time.perf_counter()
        self.busy0, self.own0 = machine_busy_seconds(), own_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        foreign = (machine_busy_seconds() - self.busy0) - (own_cpu_seconds() - self.own0)
        self.share = max(0.0, foreign / max(wall * (os.cpu_count() or 1), 1e-9))


class LoadProbe:
    """CPU load over a whole benchmark run: the load average before and after, and a background
    sampler of the machine's busy share (all processes) every ``interval`` seconds, plus the
    share other processes took (busy minus this process tree's CPU time over the run)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.before: tuple[float, float, float] | None = None
        self.after: tuple[float, float, float] | None = None
        self._foreign = ForeignCpu()

    def _sample(self) -> None:
        cores = os.cpu_count() or 1
        last_t, last_busy = time.perf_counter(), machine_busy_seconds()
        while not self._stop.wait(self.interval):
            t, busy = time.perf_counter(), machine_busy_seconds()
            self.samples.append(min(1.0, (busy - last_busy) / max((t - last_t) * cores, 1e-9)))
            last_t, last_busy = t, busy

    def start(self) -> LoadProbe:
        self.before = os.getloadavg()
        self._foreign.__enter__()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._foreign.__exit__()
        self.after = os.getloadavg()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """JSON-ready: loadavg before/after, mean/max busy share, other processes' share."""
        mean = sum(self.samples) / len(self.samples) if self.samples else None
        return {"loadavg_before": list(self.before or ()), "loadavg_after": list(self.after or ()),
                "busy_mean": mean, "busy_max": max(self.samples, default=None),
                "others_mean": self._foreign.share, "samples": len(self.samples),
                "cores": os.cpu_count() or 1}

    def __enter__(self) -> LoadProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_label(load: dict[str, Any]) -> str:
    """One line for a load summary, for tables and figure titles."""
    parts = []
    if load.get("busy_mean") is not None:
        parts.append(f"CPU busy {load['busy_mean']:.0%} (mean)")
    if load.get("others_mean") is not None:
        parts.append(f"other processes {load['others_mean']:.0%}")
    before, after = load.get("loadavg_before") or [None], load.get("loadavg_after") or [None]
    if before[0] is not None and after[0] is not None:
        parts.append(f"loadavg {before[0]:.2f} -> {after[0]:.2f}")
    return ", ".join(parts) or "load not measured"


def busy_others(threshold: float = 0.2, window: float = 0.5) -> list[str]:
    """Other processes using more than ``threshold`` of a core right now (sampled over
    ``window`` s): timings on a shared 2-core machine are meaningless while they run."""
    def ticks() -> dict[int, int]:
        out = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    out[int(pid)] = int(fields[11]) + int(fields[12])
                except (OSError, IndexError, ValueError):
                    pass
        return out

    before = ticks()
    time.sleep(window)
    after = ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, t in after.items():
        share = (t - before.get(pid, t)) / hz / window
        if share > threshold:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:80]
            except OSError:
                cmd = "?"
            busy.append(f"pid {pid} at {share:.0%} CPU: {cmd}")
    return busy


def warn_if_busy(when: str) -> None:
    """Print a warning per other busy process."""
    for line in busy_others():
        print(f"WARNING ({when}): another process shares the cores, timings unreliable: {line}",
              flush=True)


# --------------------------------------------------------------------------- spawning ranks


def free_port() -> int:
    """A free TCP port on the loopback for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankRun:
    """What ``spawn_ranks`` brings back: per-rank results (rank order) or errors, the lowest
    MemAvailable seen while the ranks ran, the children's CPU seconds and their wall time."""

    results: list[Any]
    errors: list[str] = field(default_factory=list)
    low_mem_available: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_errors(self, what: str) -> list[Any]:
        """The results, or a RuntimeError naming every rank that failed."""
        if self.errors:
            raise RuntimeError(f"{what}:\n" + "\n".join(self.errors))
        return self.results


def _rank_entry(target: Callable[..., Any], rank: int, world: int, port: int, args: tuple,
                out: str, threads: int, quiet: bool) -> None:
    for var in LAUNCH_VARS:
        os.environ.pop(var, None)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if world > 1:  # a single rank runs as a plain process (no process group)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    try:  # if a memory estimate is wrong, the OOM killer takes a benchmark rank first
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    if quiet:  # a trainer's banner lines would clutter the benchmark's table
        log = open(Path(out, f"rank{rank}.log"), "w")  # noqa: SIM115 - kept open until exit
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    import torch

    torch.set_num_threads(threads)
    try:
        result = target(rank, world, *args)
        torch.save({"ok": result}, Path(out, f"rank{rank}.pt"))
    except BaseException:  # reported by the parent; a peer's failure is only "connection closed"
        torch.save({"error": traceback.format_exc()}, Path(out, f"rank{rank}.pt"))
        sys.exit(1)


def spawn_ranks(target: Callable[..., Any], world: int, args: tuple = (), *,
                timeout: float = 900.0, threads: int = 1, quiet: bool = False) -> RankRun:
    """Run ``target(rank, world, *args)`` in ``world`` fresh 'spawn' processes with the torchrun
    variables of a one-node job set when ``world`` > 1 (the target initialises its process
    group; a single rank gets none, like a plain ``python`` run), and collect
    what each returns. A rank that dies stops the run instead of leaving its peers to wait out
    their collective timeout. ``target`` must be importable (a module-level function)."""
    import torch
    import torch.multiprocessing as mp

    start, cpu0 = time.perf_counter(), own_cpu_seconds()
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_rank_entry,
                             args=(target, r, world, port, args, out, threads, quiet))
                 for r in range(world)]
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited before a child imports torch
        try:
            for proc in procs:
                proc.start()
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = old
        deadline = time.monotonic() + timeout
        low = mem_available()
        while any(proc.is_alive() for proc in procs) and time.monotonic() < deadline:
            procs[0].join(0.25)
            if any(proc.exitcode not in (None, 0) for proc in procs):
                break
            low = min(low, mem_available())
        timed_out = time.monotonic() >= deadline
        for proc in procs:
            if proc.is_alive():
                proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results, errors = [], []
        for rank, proc in enumerate(procs):
            path = Path(out, f"rank{rank}.pt")
            log_path = Path(out, f"rank{rank}.log")
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            if not path.exists():
                code = proc.exitcode
                why = (f" (killed after the {timeout:.0f} s timeout)" if timed_out
                       else " (SIGKILL: OOM killer?)" if code == -9 else "")
                errors.append(f"rank {rank}: no result, exit {code}{why}\n{tail}".rstrip())
                continue
            record = torch.load(path, weights_only=False)
            if "error" in record:
                errors.append(f"rank {rank} failed:\n{record['error']}{tail}".rstrip())
            else:
                results.append(record["ok"])
    return RankRun(results, errors, low, own_cpu_seconds() - cpu0,
                   time.perf_counter() - start)


# --------------------------------------------------------------------------- byte meter


def _tensors(obj: Any) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    tensor = getattr(obj, "tensor", None)  # a P2POp
    return [tensor] if isinstance(tensor, torch.Tensor) else []


def payload_bytes(obj: Any) -> int:
    """Bytes of the tensors in a collective's argument (a tensor, a list of them, P2POps)."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


# torch.distributed function -> (position, keyword) of the payload this rank hands over.
API_PAYLOAD: dict[str, tuple[int | None, str | None]] = {
    "all_reduce": (0, "tensor"), "all_reduce_coalesced": (0, "tensors"),
    "broadcast": (0, "tensor"), "reduce": (0, "tensor"), "send": (0, "tensor"),
    "recv": (0, "tensor"), "isend": (0, "tensor"), "irecv": (0, "tensor"),
    "all_gather": (1, "tensor"), "all_gather_into_tensor": (1, "input_tensor"),
    "_all_gather_base": (1, "input_tensor"), "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input"), "_reduce_scatter_base": (1, "input"),
    "all_to_all_single": (1, "input"), "all_to_all": (1, "input_tensor_list"),
    "gather": (0, "tensor"), "scatter": (1, "scatter_list"),
    "batch_isend_irecv": (0, "p2p_op_list"), "barrier": (None, None),
}
# ProcessGroup method -> position of its input tensors (the check one level below); names of
# torch 2.13 (all_to_all_single, all_gather_single, ...) and of older releases.
PG_PAYLOAD: dict[str, int | None] = {
    "allreduce": 0, "allreduce_coalesced": 0, "broadcast": 0, "reduce": 0, "send": 0,
    "recv": 0, "recv_anysource": 0, "allgather": 1, "allgather_coalesced": 1,
    "all_gather_single": 1, "all_gather_single_coalesced": 1, "_allgather_base": 1,
    "allgather_into_tensor_coalesced": 1, "reduce_scatter": 1, "reduce_scatter_single": 1,
    "reduce_scatter_single_coalesced": 1, "_reduce_scatter_base": 1,
    "reduce_scatter_tensor_coalesced": 1, "all_to_all_single": 1, "alltoall_base": 1,
    "alltoall": 1, "gather": 1, "scatter": 1, "barrier": None, "monitored_barrier": None,
}


def wire_bytes(name: str, bound: dict[str, Any]) -> float:
    """Bytes this rank sends to other ranks in one call (ring all-reduce: 2(p-1)/p of the
    tensor; all-to-all: what leaves for other ranks; all-gather: (p-1) copies; p2p: all)."""
    import torch.distributed as dist

    group = bound.get("group")
    p = dist.get_world_size(group)
    me = dist.get_rank(group)
    if name == "all_to_all_single":
        x, splits = bound["input"], bound.get("input_split_sizes")
        if not splits:
            return x.nbytes * (p - 1) / p
        total = sum(splits)
        return x.nbytes * (total - splits[me]) / total if total else 0.0
    if name == "all_to_all":
        parts = bound["input_tensor_list"]
        return float(sum(t.nbytes for i, t in enumerate(parts) if i != me))
    if name in ("all_gather", "all_gather_into_tensor", "_all_gather_base"):
        x = bound["tensor"] if name == "all_gather" else bound["input_tensor"]
        return float((p - 1) * x.nbytes)
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return bound["input"].nbytes * (p - 1) / p
    if name == "reduce_scatter":
        return float(sum(t.nbytes for i, t in enumerate(bound["input_list"]) if i != me))
    if name in ("all_reduce", "all_reduce_coalesced"):
        return 2.0 * payload_bytes(bound.get("tensor", bound.get("tensors"))) * (p - 1) / p
    if name in ("send", "isend"):
        return float(bound["tensor"].nbytes)
    if name == "batch_isend_irecv":
        return float(sum(op.tensor.nbytes for op in bound["p2p_op_list"]
                         if getattr(op.op, "__name__", "") in ("isend", "send")))
    if name in ("broadcast", "scatter"):
        return float(payload_bytes(bound.get("tensor", bound.get("scatter_list"))) * (p - 1))
    return 0.0  # receives, reduce/gather to a root, barrier


def caller_origin(skip: int = 2) -> str:
    """The first memtron/megatron function up the stack (``module.qualname``), skipping
    megatron's mapping helpers (``_reduce`` ...) unless they are an autograd backward; the
    immediate caller where no such frame exists."""
    frame = sys._getframe(skip)
    first = ""
    fallback = frame.f_code.co_name if frame is not None else "?"
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith(("memtron.", "megatron.")) and not module.startswith(
                "memtron.bench."):
            name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
            label = f"{module.rsplit('.', 1)[-1]}.{name}"
            first = first or label
            if not module.endswith("tensor_parallel.mappings") or name.endswith(".backward"):
                return label
        frame = frame.f_back
    return first or fallback


@dataclass
class Call:
    """One counted call, as a listener sees it."""

    api: str
    origin: str
    bound: dict[str, Any]
    payload: int
    wire: float


class ByteMeter:
    """Counts the bytes of every ``torch.distributed`` collective and point-to-point call made
    while ``active``: per (function, first memtron/megatron caller, dtype) the calls, the
    payload this rank handed over, the bytes it sent to other ranks and the seconds spent;
    plus a check one level down (calls and payload bytes reaching ``ProcessGroup`` methods).
    Nested calls (a collective implemented through another) are counted once.

    ``install()`` replaces the functions of ``torch.distributed`` (and c10d's module, which
    shares them); run it before importing code that binds them by name."""

    installed: ByteMeter | None = None

    def __init__(self) -> None:
        self.active = False
        self.depth = 0
        self.rows: dict[str, dict[str, Any]] = {}
        self.seconds = 0.0
        self.pg_calls = 0
        self.pg_bytes = 0
        self.listeners: list[Callable[[Call, Any], None]] = []
        self._undo: list[tuple[Any, str, Any]] = []

    # -- installing ------------------------------------------------------------------------
    def install(self) -> ByteMeter:
        """Wrap torch.distributed's functions (once per process) so they report here."""
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        if ByteMeter.installed is not None:
            raise RuntimeError("a ByteMeter is already installed in this process")
        ByteMeter.installed = self
        for name in API_PAYLOAD:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            wrapped = self._wrap_api(name, fn)
            self._undo.append((dist, name, fn))
            setattr(dist, name, wrapped)
            if getattr(c10d, name, None) is fn:
                self._undo.append((c10d, name, fn))
                setattr(c10d, name, wrapped)
        pg_class = dist.ProcessGroup
        for name in PG_PAYLOAD:
            fn = getattr(pg_class, name, None)
            if fn is not None:
                self._undo.append((pg_class, name, fn))
                setattr(pg_class, name, self._wrap_pg(name, fn))
        return self

    def uninstall(self) -> None:
        """Put torch.distributed's own functions back."""
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)
        self._undo = []
        ByteMeter.installed = None

    @contextmanager
    def measuring(self) -> Iterator[ByteMeter]:
        """Count the calls made inside the block."""
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    # -- reading ---------------------------------------------------------------------------
    def take(self) -> dict[str, Any]:
        """The counts so far (and reset them): rows, totals and the ProcessGroup check."""
        rows = list(self.rows.values())
        taken = {"rows": rows, "payload": sum(r["bytes"] for r in rows),
                 "wire": sum(r["wire"] for r in rows), "calls": sum(r["calls"] for r in rows),
                 "seconds": self.seconds, "pg_calls": self.pg_calls, "pg_bytes": self.pg_bytes}
        self.rows, self.seconds, self.pg_calls, self.pg_bytes = {}, 0.0, 0, 0
        return taken

    # -- wrappers --------------------------------------------------------------------------
    def _wrap_api(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        position, keyword = API_PAYLOAD[name]
        try:
            signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            signature = None
        meter = self

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not (meter.active and meter.depth == 0):
                meter.depth += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    meter.depth -= 1
            payload = None
            if position is not None:
                payload = args[position] if len(args) > position else kwargs.get(keyword)
            tensors = _tensors(payload)
            dtype = str(tensors[0].dtype).removeprefix("torch.") if tensors else "-"
            bound = (signature.bind(*args, **kwargs).arguments if signature is not None
                     else dict(kwargs))
            call = Call(name, caller_origin(), bound, payload_bytes(payload),
                        wire_bytes(name, bound) if signature is not None else 0.0)
            row = meter.rows.setdefault(f"{name}|{call.origin}|{dtype}", {
                "api": name, "origin": call.origin, "dtype": dtype, "calls": 0, "bytes": 0,
                "wire": 0.0, "seconds": 0.0, "shapes": []})
            row["calls"] += 1
            row["bytes"] += call.payload
            row["wire"] += call.wire
            shape = "+".join(str(list(t.shape)) for t in tensors[:1])
            if shape not in row["shapes"] and len(row["shapes"]) < 4:
                row["shapes"].append(shape)
            meter.depth += 1
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                meter.depth -= 1
                spent = time.perf_counter() - start
                row["seconds"] += spent
                meter.seconds += spent
            for listener in meter.listeners:
                listener(call, result)
            return result

        wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapped

    def _wrap_pg(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        position = PG_PAYLOAD[name]
        meter = self

        def wrapped(pg: Any, *args: Any, **kwargs: Any) -> Any:
            if meter.active:
                meter.pg_calls += 1
                if position is not None and len(args) > position:
                    meter.pg_bytes += payload_bytes(args[position])
            return fn(pg, *args, **kwargs)

        return wrapped


# --------------------------------------------------------------------------- result files


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--out FILE`` (alias ``--json``): where the benchmark writes its JSON result."""
    parser.add_argument("--out", "--json", dest="out", type=Path, default=None,
                        help="write the results as JSON here (machine, load, baseline, rows)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class BenchRun:
    """One benchmark run: probes the load from ``start()`` to ``finish()`` and writes the result
    envelope every script shares: ``{bench, created, machine, load, baseline, results, notes,
    args, quick, wall_s}`` to ``args.out`` (when given).

        run = BenchRun("pkm_layer", args).start()
        ...
        run.baseline = {"kind": "memcpy", "memcpy_gbs": bw}
        run.results = rows
        run.finish()

    (or ``with BenchRun(...) as run:``, which finishes on a normal exit only)."""

    def __init__(self, bench: str, args: argparse.Namespace | None = None,
                 out: Path | None = None) -> None:
        self.bench = bench
        self.args = vars(args) if args is not None else {}
        self.out = out if out is not None else self.args.get("out")
        self.baseline: dict[str, Any] = {}
        self.results: Any = None
        self.notes: list[str] = []
        self.probe = LoadProbe()
        self.machine: dict[str, Any] = {}

    def start(self) -> BenchRun:
        """Name the machine and start the load probe."""
        self.machine = machine()
        self.t0 = time.perf_counter()
        self.probe.start()
        return self

    def finish(self) -> dict[str, Any]:
        """Stop the probe, print the context line and write the JSON; returns the document."""
        load = self.probe.stop()
        wall = time.perf_counter() - self.t0
        print(f"{self.bench}: {machine_label(self.machine)}; {load_label(load)}; "
              f"{wall:.0f} s", flush=True)
        doc = self.envelope(load, wall)
        if self.out:
            path = Path(self.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {path}", flush=True)
        return doc

    def __enter__(self) -> BenchRun:
        return self.start()

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.probe.stop()

    def envelope(self, load: dict[str, Any], wall: float) -> dict[str, Any]:
        """The JSON document of this run."""
        return _jsonable({
            "bench": self.bench, "created": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "machine": self.machine, "load": load,
            "baseline": self.baseline, "results": self.results, "notes": self.notes,
            "quick": bool(self.args.get("quick")), "args": self.args, "wall_s": wall})
