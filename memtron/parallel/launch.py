"""Process-group start-up for every way memtron is launched (DESIGN §8).

The launcher is read from the environment in a fixed order: torchrun (or any launcher that sets
the ``RANK``/``WORLD_SIZE`` env:// variables), SLURM ``srun``, MPI (``mpirun``/``mpiexec``), and
otherwise a single process. Parsing is pure (:func:`detect_env`) so it can be unit-tested; the
only step that talks to other processes, MPI's address broadcast, happens in
:func:`init_distributed`.

Failure policy: a rank whose work raises must not linger in atexit handlers or collectives, so
:func:`fail_fast` prints the traceback and ``os._exit(1)``; peers blocked in a collective fail by
the collective timeout, and the launcher (torchrun, mpirun, srun) tears down the rest.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from memtron.device import default_backend, resolve_device

SOURCES = ("torchrun", "slurm", "mpi", "single")
SLURM_PORT_BASE = 10000  # SLURM master port = base + job id % span: every task agrees offline
SLURM_PORT_SPAN = 50000
SCONTROL_TIMEOUT_S = 60.0

# Variables init_distributed exports for libraries that read env:// settings (DeepSpeed, HF).
EXPORTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """The launch environment is missing something or inconsistent; the message names it."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    For ``source == "mpi"`` straight from :func:`detect_env`, ``master_addr`` is ``""`` and
    ``master_port`` is ``0`` unless ``MASTER_ADDR``/``MASTER_PORT`` were set, and the local
    fields are ``-1`` if the MPI did not export them: rank 0 decides those over MPI inside
    :func:`init_distributed`, whose returned env is always complete.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "mpi" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: DistEnv | None = None  # set by init_distributed, cleared by shutdown_distributed


# --------------------------------------------------------------------------- parsing helpers


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise LaunchError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None


def _first_int(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        if environ.get(name, "").strip():
            return name, _int(environ, name)
    return None


def _check(rank: int, world: int, local_rank: int, local_world: int, names: tuple[str, ...],
           port: int | None = None, port_name: str = "MASTER_PORT") -> None:
    """Reject values no launcher would produce; ``names`` = (rank, world, lrank, lworld) vars."""
    rank_n, world_n, lrank_n, lworld_n = names
    if world < 1:
        raise LaunchError(f"{world_n}={world} must be >= 1")
    if not 0 <= rank < world:
        raise LaunchError(f"{rank_n}={rank} is out of range for {world_n}={world}")
    if local_world != -1:
        if not 1 <= local_world <= world:
            raise LaunchError(f"{lworld_n}={local_world} must be in [1, {world_n}={world}]")
        if not 0 <= local_rank < local_world:
            raise LaunchError(f"{lrank_n}={local_rank} is out of range for "
                              f"{lworld_n}={local_world}")
    if port is not None and not 0 < port < 65536:
        raise LaunchError(f"{port_name}={port} is not a TCP port")


def parse_tasks_per_node(text: str) -> list[int]:
    """SLURM's compressed task counts, e.g. ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise LaunchError(f"cannot parse SLURM tasks-per-node value {text!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# --------------------------------------------------------------------------- launchers


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    if "LOCAL_RANK" in environ:
        local_rank = _int(environ, "LOCAL_RANK")
        found = _first_int(environ, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))  # LOCAL_SIZE: DeepSpeed
        if found is None:
            raise LaunchError("LOCAL_RANK is set but LOCAL_WORLD_SIZE is not")
        local_world = found[1]
    else:  # one process per node (e.g. a Kubernetes PyTorchJob without torchrun)
        local_rank, local_world = 0, 1
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not environ.get(name, "").strip():
            raise LaunchError(f"RANK and WORLD_SIZE are set (torchrun-style launch) but {name} "
                              "is not")
    port = _int(environ, "MASTER_PORT")
    _check(rank, world, local_rank, local_world,
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"), port)
    return DistEnv(rank, world, local_rank, local_world, environ["MASTER_ADDR"].strip(), port,
                   "torchrun")


def _scontrol(scontrol: str, *args: str) -> str:
    try:
        out = subprocess.run([scontrol, *args], capture_output=True, text=True, check=False,
                             timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"`scontrol {' '.join(args)}` failed: {e}") from e
    if out.returncode != 0:
        raise LaunchError(f"`scontrol {' '.join(args)}` exited with {out.returncode}: "
                          f"{out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def slurm_master_addr(nodelist: str, scontrol: str) -> str:
    """First host of ``nodelist``, as its ``NodeAddr`` (node names need not resolve in DNS)."""
    hosts = _scontrol(scontrol, "show", "hostnames", nodelist).split()
    if not hosts:
        raise LaunchError(f"`scontrol show hostnames {nodelist}` printed no host")
    node = _scontrol(scontrol, "show", "node", hosts[0])
    m = re.search(r"\bNodeAddr=(\S+)", node)
    return m.group(1) if m else hosts[0]


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS")
    local_rank = _int(environ, "SLURM_LOCALID")

    # The step's own layout first: an srun inside a larger allocation may use fewer tasks.
    local_world = None
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        text = environ.get(name, "").strip()
        if not text:
            continue
        counts = parse_tasks_per_node(text)
        if len(counts) == 1 or len(set(counts)) == 1:
            local_world = counts[0]
        else:
            node = _int(environ, "SLURM_NODEID")
            if not 0 <= node < len(counts):
                raise LaunchError(f"SLURM_NODEID={node} is out of range for {name}={text!r}")
            local_world = counts[node]
        lworld_name = name
        break
    if local_world is None:
        if world != 1:
            raise LaunchError("SLURM_NTASKS is set but none of SLURM_STEP_TASKS_PER_NODE, "
                              "SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE is")
        local_world, lworld_name = 1, "SLURM_TASKS_PER_NODE"

    addr = environ.get("MASTER_ADDR", "").strip()
    if not addr:
        scontrol = shutil.which("scontrol", path=environ.get("PATH", os.defpath))
        if scontrol is None:
            raise LaunchError("SLURM_NTASKS set but scontrol not found on PATH, so the first "
                              "node's address is unknown; set MASTER_ADDR or run on a SLURM node")
        nodelist = next((environ[n].strip() for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                                      "SLURM_NODELIST") if environ.get(n)), "")
        if not nodelist:
            raise LaunchError("SLURM_NTASKS set but SLURM_JOB_NODELIST is not; set MASTER_ADDR")
        addr = slurm_master_addr(nodelist, scontrol)

    if environ.get("MASTER_PORT", "").strip():
        port, port_name = _int(environ, "MASTER_PORT"), "MASTER_PORT"
    else:
        if not environ.get("SLURM_JOB_ID", "").strip():
            raise LaunchError("SLURM_NTASKS set but neither MASTER_PORT nor SLURM_JOB_ID is, so "
                              "the master port cannot be derived")
        port = SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID") % SLURM_PORT_SPAN
        port_name = "SLURM_JOB_ID-derived port"
    _check(rank, world, local_rank, local_world,
           ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", lworld_name), port, port_name)
    return DistEnv(rank, world, local_rank, local_world, addr, port, "slurm")


_MPI_VARS = {  # (rank, size, local rank, local size)
    "OpenMPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "MPICH/Hydra": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


def _from_mpi(environ: Mapping[str, str], names: tuple[str, str, str, str]) -> DistEnv:
    rank_n, size_n, lrank_n, lsize_n = names
    rank, world = _int(environ, rank_n), _int(environ, size_n)
    if environ.get(lrank_n, "").strip() and environ.get(lsize_n, "").strip():
        local_rank, local_world = _int(environ, lrank_n), _int(environ, lsize_n)
    else:  # resolved over MPI in init_distributed
        local_rank = local_world = -1
    addr = environ.get("MASTER_ADDR", "").strip()
    port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT", "").strip() else 0
    _check(rank, world, local_rank, local_world, names, port or None)
    return DistEnv(rank, world, local_rank, local_world, addr, port, "mpi")


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Work out rank, world and rendezvous point from launcher variables, without any I/O to
    peers (SLURM may run ``scontrol``). ``environ`` defaults to ``os.environ``; with the default,
    after :func:`init_distributed` this returns the env it settled on."""
    if environ is None:
        if _ENV is not None:
            return _ENV
        environ = os.environ
    # (1) torchrun / env:// launchers.
    has_rank, has_world = "RANK" in environ, "WORLD_SIZE" in environ
    if has_rank or has_world or "TORCHELASTIC_RUN_ID" in environ:
        if not (has_rank and has_world):
            missing = "WORLD_SIZE" if has_rank else "RANK"
            raise LaunchError(f"torchrun-style launch variables are incomplete: {missing} is "
                              "not set")
        return _from_torchrun(environ)
    # (2) SLURM srun.
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return _from_slurm(environ)
    # (3) MPI.
    for names in _MPI_VARS.values():
        if names[0] in environ:
            return _from_mpi(environ, names)
    # (4) A plain `python ...`.
    return DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")


# --------------------------------------------------------------------------- MPI rendezvous


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _reachable_address() -> str:
    """This host's IPv4 address that other nodes can reach (not a loopback alias)."""
    host = socket.gethostname()
    candidates: list[str] = []
    for name in (socket.getfqdn(host), host):
        with suppress(OSError):
            candidates += [a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)]
    for addr in candidates:
        if not addr.startswith("127."):
            return addr
    try:  # the interface of the default route; UDP connect sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
        if not addr.startswith("127.") and addr != "0.0.0.0":
            return addr
    except OSError:
        pass
    raise LaunchError(f"hostname {host!r} resolves only to loopback addresses and there is no "
                      "default route; set MASTER_ADDR to rank 0's address")


def _mpi_rendezvous(env: DistEnv) -> DistEnv:
    """Fill in what MPI does not export: rank 0 picks address and port and broadcasts them."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError("launched under MPI but mpi4py is not installed: "
                          "pip install memtron[mpi]") from e
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (env.rank, env.world_size):
        raise LaunchError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()} but the "
                          f"environment says rank {env.rank} of {env.world_size}")
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local_rank, local_world = node.Get_rank(), node.Get_size()
    node.Free()
    payload: tuple[str, int, str] = ("", 0, "")
    if env.rank == 0:  # errors travel in the broadcast so no peer waits on a dead rank 0
        try:
            addr = env.master_addr or ("127.0.0.1" if local_world == env.world_size
                                       else _reachable_address())
            payload = (addr, env.master_port or _free_port(), "")
        except Exception as e:  # forwarded to every rank below, never swallowed
            payload = ("", 0, f"{type(e).__name__}: {e}")
    addr, port, err = comm.bcast(payload, root=0)
    if err:
        raise LaunchError(f"MPI rank 0 could not choose a master address/port: {err}")
    if env.local_rank == -1:
        env = replace(env, local_rank=local_rank, local_world_size=local_world)
    return replace(env, master_addr=addr, master_port=port)


# --------------------------------------------------------------------------- process group


def _resolve_backend(backend: str, device: torch.device | None = None) -> str:
    """``parallel.backend`` for ``device`` (default: the ``auto`` device): ``auto`` follows
    the device; nccl needs a CUDA device."""
    device = resolve_device("auto") if device is None else device
    if backend == "auto":
        return default_backend(device)
    if backend == "nccl" and device.type != "cuda":
        raise LaunchError(f"parallel.backend=nccl but the device is {device} (CUDA is not "
                          "available or train.device=cpu); use gloo or auto")
    return backend


def init_distributed(timeout_s: float = 600.0, backend: str = "auto",
                     device: str = "auto") -> DistEnv:
    """Join the job's default process group and return where this process sits; ``device``
    (``train.device``) is checked first, so a missing accelerator fails before any rendezvous,
    and an accelerator's current device becomes the local rank's.

    A plain single process gets no process group (``dist.is_initialized()`` stays False);
    a launcher with one process (``torchrun --nproc_per_node 1``) does get a world-1 group, so
    code launched that way runs exactly the multi-rank path. Calling it again is a no-op.
    """
    global _ENV
    if _ENV is not None:
        return _ENV
    where = resolve_device(device)
    if dist.is_available() and dist.is_initialized():  # someone (e.g. DeepSpeed) got here first
        env = detect_env()
        if env.source == "single" or (env.rank, env.world_size) != (dist.get_rank(),
                                                                    dist.get_world_size()):
            env = DistEnv(dist.get_rank(), dist.get_world_size(), max(env.local_rank, 0),
                          max(env.local_world_size, 1), env.master_addr, env.master_port,
                          env.source)
        _ENV = env
        return env

    env = detect_env()
    if env.source == "single":
        _ENV = env
        return env
    if not dist.is_available():
        raise LaunchError(f"launched by {env.source} with {env.world_size} processes but this "
                          "torch build has no torch.distributed")
    if env.source == "mpi":
        env = _mpi_rendezvous(env)
    backend = _resolve_backend(backend, where)
    if where.type != "cpu":
        n_gpu = torch.accelerator.device_count()
        if env.local_rank < n_gpu:
            torch.accelerator.set_device_index(env.local_rank)
        elif backend != "gloo":
            raise LaunchError(f"local rank {env.local_rank} has no {where.type} device: this "
                              f"node has {n_gpu}; run at most one task per device")

    values = (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr,
              env.master_port)
    os.environ.update({k: str(v) for k, v in zip(EXPORTED, values)})
    dist.init_process_group(backend, init_method="env://", rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
    _ENV = env
    if env.rank == 0:
        print(f"memtron: distributed source={env.source} world_size={env.world_size} "
              f"backend={backend} master={env.master_addr}:{env.master_port}",
              file=sys.stderr, flush=True)
    return env


def training_device(name: str = "auto") -> torch.device:
    """Where this process trains: ``train.device`` resolved by the one device policy
    (:func:`memtron.device.resolve_device`); an accelerator's device is the local rank's, set
    current by :func:`init_distributed`."""
    return resolve_device(name)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor handed to a collective of ``group`` must live: NCCL takes GPU tensors
    only, gloo CPU tensors."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_backend(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``x`` where collectives of ``group`` take it (a no-op when it is there already, e.g.
    CUDA tensors under NCCL; a staging copy for CUDA tensors under gloo)."""
    return x.to(collective_device(group))


def shutdown_distributed() -> None:
    """Leave the process group (if any); safe to call more than once."""
    global _ENV
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _ENV = None


@contextmanager
def fail_fast(env: DistEnv) -> Iterator[None]:
    """Turn an exception on one rank of a multi-rank job into a prompt ``os._exit(1)``.

    Unwinding normally would run atexit handlers and destructors that may block in collectives
    waiting for the peers this rank abandoned; exiting at once lets the launcher see the failure
    and lets peers fail by their collective timeout. KeyboardInterrupt and SystemExit pass.
    """
    try:
        yield
    except Exception:
        if env.world_size <= 1:
            raise
        lines = traceback.format_exc().rstrip("\n").splitlines()
        text = "".join(f"[rank {env.rank}] {line}\n" for line in lines)
        try:
            sys.stdout.flush()
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.write(text)
            sys.stderr.flush()
        finally:
            os._exit(1)
