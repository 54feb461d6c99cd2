"""SLURM jobs: render and submit sbatch scripts, follow and cancel them, requeue on pre-emption.

``memtron submit`` validates the config (with overrides) and the job layout first, checks the
partition and node count against the cluster, then writes ``<run_dir>/config.yaml`` (resolved)
and ``<run_dir>/job.sbatch`` (rendered from a template in ``slurm/``), submits it with
``sbatch`` and records the job in ``<run_dir>/slurm.json`` for ``memtron status`` and
``memtron cancel``. The job runs ``memtron train --config <run_dir>/config.yaml --resume auto``
on every rank, so a requeued job continues from its latest checkpoint.

Templates (``string.Template``; ``$$`` is a literal ``$``): ``slurm/srun.sbatch`` (one srun task
per GPU, the default) and ``slurm/torchrun.sbatch`` (one srun task per node running torchrun).
Placeholders: ``job_name``, ``run_dir``, ``directives`` (the ``#SBATCH`` lines), ``exports``,
``tasks_per_node``, ``srun_options``, ``train_command``, ``port_base``, ``port_span``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memtron.config import Config, ConfigError, check_world, load_config

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "slurm"
LAUNCHERS = ("srun", "torchrun")
JOB_FILE = "slurm.json"
SCRIPT_FILE = "job.sbatch"
CONFIG_FILE = "config.yaml"
# Must match memtron.parallel.launch.SLURM_PORT_BASE / SLURM_PORT_SPAN (not imported: that
# module imports torch, and `memtron submit` should not need it).
PORT_BASE, PORT_SPAN = 10000, 50000
SLURM_TIMEOUT_S = 60.0
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                 "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                 "RESV_DEL_HOLD", "SPECIAL_EXIT"}


class SlurmError(RuntimeError):
    """A SLURM command failed or the request cannot run on this cluster; the message says why."""


# --------------------------------------------------------------------------- requeue (trainer)


def requeue_current_job() -> str:
    """Put the running job back in the queue (after the pre-emption checkpoint); it restarts
    with ``--resume auto`` from that checkpoint. Returns a line saying what happened."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return "not a SLURM job: nothing to requeue"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"SLURM job {job_id}: scontrol not found, cannot requeue"
    done = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True)
    if done.returncode != 0:
        return f"SLURM job {job_id}: scontrol requeue failed: {done.stderr.strip()}"
    return f"SLURM job {job_id} requeued; it resumes from the latest checkpoint"


# --------------------------------------------------------------------------- job request


@dataclass
class JobSpec:
    """What ``memtron submit`` asks SLURM for (the command line options)."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU cluster, gloo; tasks per node from the config
    tasks_per_node: int = 0  # CPU only; 0 = from the config's parallel layout
    cpus_per_task: int = 0  # 0 = not requested
    partition: str = ""
    account: str = ""
    time: str = ""
    qos: str = ""
    constraint: str = ""
    exclusive: bool = False
    container_image: str = ""
    container_mounts: str = ""
    env: list[str] = field(default_factory=list)  # KEY=VAL
    sbatch_options: list[str] = field(default_factory=list)  # extra "#SBATCH <option>" lines
    signal_seconds: int = 120
    launcher: str = "srun"  # srun (one task per GPU) | torchrun (one torchrun per node)
    template: str = ""  # a template path; default slurm/<launcher>.sbatch
    job_name: str = ""
    python: str = ""  # interpreter on the nodes; default this one (or `python` in a container)


@dataclass
class Rendered:
    script: str
    run_dir: Path
    config: Config
    tasks_per_node: int
    world_size: int


def _layout(cfg: Config, spec: JobSpec) -> tuple[int, int]:
    """(tasks per node, world size) for the request, checked against ``parallel.*``."""
    if spec.nodes < 1:
        raise SlurmError(f"--nodes must be >= 1, got {spec.nodes}")
    if spec.gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node must be >= 0, got {spec.gpus_per_node}")
    if spec.gpus_per_node:
        if spec.tasks_per_node and spec.tasks_per_node != spec.gpus_per_node:
            raise SlurmError(f"--tasks-per-node {spec.tasks_per_node} with --gpus-per-node "
                             f"{spec.gpus_per_node}: GPU jobs run one task per GPU")
        per_node = spec.gpus_per_node
    elif spec.tasks_per_node:
        per_node = spec.tasks_per_node
    else:  # CPU cluster: the config's world (tp x cp x dp) spread over the nodes
        p = cfg.parallel
        if p.dp:
            world = p.tp * p.cp * p.dp
            if world % spec.nodes:
                raise ConfigError(f"parallel.dp: world tp={p.tp} x cp={p.cp} x dp={p.dp} = "
                                  f"{world} ranks do not split evenly over --nodes "
                                  f"{spec.nodes}; change parallel.dp or give --tasks-per-node")
            per_node = world // spec.nodes
        else:  # one model-parallel group per node, data parallel across nodes
            per_node = p.tp * p.cp
    if per_node < 1:
        raise SlurmError(f"--tasks-per-node must be >= 1, got {per_node}")
    world = spec.nodes * per_node
    check_world(cfg, world)  # a layout that does not divide fails here, naming the key
    return per_node, world


def _directives(spec: JobSpec, run_dir: Path, per_node: int, workdir: Path) -> list[str]:
    torchrun = spec.launcher == "torchrun"
    lines = [f"--job-name={spec.job_name or run_dir.name}", f"--nodes={spec.nodes}",
             f"--ntasks-per-node={1 if torchrun else per_node}"]
    if spec.gpus_per_node:
        lines.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        # torchrun: one task holds all of a node's processes
        lines.append(f"--cpus-per-task={spec.cpus_per_task * (per_node if torchrun else 1)}")
    for name in ("partition", "account", "qos", "time", "constraint"):
        value = getattr(spec, name)
        if value:
            lines.append(f"--{name}={value}")
    if spec.exclusive:
        lines.append("--exclusive")
    if spec.signal_seconds < 0:
        raise SlurmError(f"--signal-seconds must be >= 0, got {spec.signal_seconds}")
    # No "B:": the signal goes to the job steps (the training tasks), not only the batch shell.
    lines += ["--requeue", f"--signal=USR1@{spec.signal_seconds}", "--open-mode=append",
              f"--output={run_dir / 'slurm-%j.out'}", f"--chdir={workdir}"]
    for extra in spec.sbatch_options:
        extra = extra.strip()
        if not extra.startswith("-"):
            raise SlurmError(f"--sbatch {extra!r}: expected an sbatch option such as --mem=0")
        lines.append(extra)
    return [f"#SBATCH {line}" for line in lines]


def _exports(spec: JobSpec) -> list[str]:
    lines = []
    if spec.gpus_per_node:  # NCCL: fail a hung collective instead of waiting forever
        lines += ["export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                  "export NCCL_ASYNC_ERROR_HANDLING=1  # torch < 2.2 spelling"]
    for item in spec.env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SlurmError(f"--env {item!r}: expected KEY=VALUE with a shell variable name")
        lines.append(f"export {key}={shlex.quote(value)}")
    return lines or ["# (no extra variables: pass --env KEY=VALUE)"]


def template_path(spec: JobSpec) -> Path:
    if spec.template:
        return Path(spec.template)
    if spec.launcher not in LAUNCHERS:
        raise SlurmError(f"--launcher {spec.launcher!r}: expected one of {list(LAUNCHERS)}")
    return TEMPLATE_DIR / f"{spec.launcher}.sbatch"


def render(config: str | Path | None, overrides: list[str], spec: JobSpec,
           workdir: Path | None = None) -> Rendered:
    """Load and validate the config, work out the layout and render the sbatch script.
    Pure: writes nothing and runs no SLURM command."""
    cfg = load_config(config, overrides)
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / cfg.train.run_dir).resolve()
    cfg.train.run_dir = str(run_dir)
    per_node, world = _layout(cfg, spec)
    path = template_path(spec)
    try:
        template = string.Template(path.read_text())
    except OSError as e:
        raise SlurmError(f"cannot read sbatch template {path}: {e}") from e
    python = spec.python or ("python" if spec.container_image else sys.executable)
    train = [python, "-m", "memtron.cli", "train", "--config", str(run_dir / CONFIG_FILE),
             "--resume", "auto"]
    srun_options = ""
    if spec.container_image:  # pyxis/enroot
        srun_options += f" --container-image={shlex.quote(spec.container_image)}"
        srun_options += f" --container-workdir={shlex.quote(str(workdir))}"
        mounts = spec.container_mounts or f"{run_dir}:{run_dir}"
        srun_options += f" --container-mounts={shlex.quote(mounts)}"
    values = {
        "job_name": spec.job_name or run_dir.name,
        "run_dir": str(run_dir),
        "directives": "\n".join(_directives(spec, run_dir, per_node, workdir)),
        "exports": "\n".join(_exports(spec)),
        "tasks_per_node": str(per_node),
        "srun_options": srun_options,
        "train_command": shlex.join(train),
        "port_base": str(PORT_BASE),
        "port_span": str(PORT_SPAN),
    }
    try:
        script = template.substitute(values)
    except (KeyError, ValueError) as e:
        raise SlurmError(f"sbatch template {path}: bad placeholder {e} (known: "
                         f"{', '.join(sorted(values))}; write $$ for a literal $)") from e
    return Rendered(script, run_dir, cfg, per_node, world)


# --------------------------------------------------------------------------- SLURM commands


def _run(cmd: list[str], what: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise SlurmError(f"`{cmd[0]}` not found on PATH: run this on a SLURM login node (or "
                         "install the SLURM client tools)")
    try:
        return subprocess.run([exe, *cmd[1:]], capture_output=True, text=True,
                              timeout=SLURM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"`{shlex.join(cmd)}` did not answer in {SLURM_TIMEOUT_S:.0f}s"
                         + (f" ({what})" if what else "")) from e


def _fields(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value2`` (``scontrol -o``) -> dict; values may not contain spaces."""
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))


def partitions() -> dict[str, dict[str, str]]:
    """Partitions this cluster has (hidden ones included): name -> scontrol fields."""
    done = _run(["scontrol", "--all", "--oneliner", "show", "partition"])
    if done.returncode != 0:
        raise SlurmError(f"`scontrol show partition` failed: "
                         f"{done.stderr.strip() or done.stdout.strip()}")
    found = {}
    for line in done.stdout.splitlines():
        f = _fields(line)
        if "PartitionName" in f:
            found[f["PartitionName"]] = f
    return found


def check_cluster(spec: JobSpec) -> str:
    """Fail with a clear message if the partition is unknown or has fewer nodes than asked for.
    Returns the partition the job goes to ("" if the cluster has no default)."""
    parts = partitions()
    if spec.partition:
        if spec.partition not in parts:
            known = ", ".join(sorted(parts)) or "none"
            raise SlurmError(f"partition {spec.partition!r} does not exist on this cluster "
                             f"(partitions: {known})")
        name = spec.partition
    else:
        name = next((n for n, f in parts.items() if f.get("Default") == "YES"), "")
        if not name:
            return ""
    info = parts[name]
    total = info.get("TotalNodes", "")
    if total.isdigit() and spec.nodes > int(total):
        raise SlurmError(f"--nodes {spec.nodes} but partition {name!r} has {total} node(s) "
                         f"({info.get('Nodes', '?')})")
    max_nodes = info.get("MaxNodes", "UNLIMITED")
    if max_nodes.isdigit() and spec.nodes > int(max_nodes):
        raise SlurmError(f"--nodes {spec.nodes} exceeds MaxNodes={max_nodes} of partition "
                         f"{name!r}")
    return name


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` fields, or {} once slurmctld has forgotten the job."""
    done = _run(["scontrol", "--oneliner", "show", "job", job_id])
    if done.returncode != 0:
        return {}
    return _fields(done.stdout.splitlines()[0]) if done.stdout.strip() else {}


def job_state(job_id: str) -> dict[str, str]:
    """State of a job: scontrol while slurmctld knows it, else sacct if accounting is on."""
    info = job_info(job_id)
    if info:
        return info
    if shutil.which("sacct"):
        done = _run(["sacct", "-X", "-n", "-P", "-j", job_id,
                     "-o", "JobID,State,ExitCode,Elapsed,NodeList,Restarts"])
        for line in done.stdout.splitlines() if done.returncode == 0 else []:
            parts = line.split("|")
            if len(parts) >= 6 and parts[0] == job_id:
                return {"JobId": job_id, "JobState": parts[1].split()[0], "ExitCode": parts[2],
                        "RunTime": parts[3], "NodeList": parts[4], "Restarts": parts[5]}
    return {}


def _read_job(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / JOB_FILE
    if not path.is_file():
        raise SlurmError(f"{path} not found: no SLURM job was submitted for run dir {run_dir} "
                         "(use `memtron submit`)")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- submit


@dataclass
class Submitted:
    job_id: str
    run_dir: Path
    script: Path
    log: Path
    partition: str


def submit(config: str | Path | None, overrides: list[str], spec: JobSpec) -> Submitted:
    """Validate, check the cluster, write config + script into the run dir, ``sbatch`` it."""
    rendered = render(config, overrides, spec)
    run_dir = rendered.run_dir
    partition = check_cluster(spec)
    if (run_dir / JOB_FILE).is_file():
        old = _read_job(run_dir).get("job_id", "")
        state = job_state(old).get("JobState", "") if old else ""
        if state in ACTIVE_STATES:
            raise SlurmError(f"run dir {run_dir} already has job {old} ({state}); "
                             f"`memtron cancel --ckpt {run_dir}` first or choose another "
                             "train.run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(
        yaml.safe_dump(rendered.config.to_dict(), sort_keys=False))
    script = run_dir / SCRIPT_FILE
    script.write_text(rendered.script)
    script.chmod(0o755)
    done = _run(["sbatch", "--parsable", str(script)], "submitting the job")
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).replace("sbatch: error: ", "")
        raise SlurmError(f"sbatch rejected the job: {message}")
    job_id = done.stdout.strip().splitlines()[-1].split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {done.stdout.strip()!r}")
    history = []
    if (run_dir / JOB_FILE).is_file():
        prev = _read_job(run_dir)
        history = [*prev.get("history", []), prev.get("job_id")]
    log = run_dir / f"slurm-{job_id}.out"
    record = {"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "script": str(script), "log": str(log), "partition": partition,
              "nodes": spec.nodes, "gpus_per_node": spec.gpus_per_node,
              "tasks_per_node": rendered.tasks_per_node, "world_size": rendered.world_size,
              "launcher": spec.launcher, "history": [h for h in history if h]}
    (run_dir / JOB_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return Submitted(job_id, run_dir, script, log, partition)


# --------------------------------------------------------------------------- status / cancel


def _last_train_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if record.get("kind") == "train":
            last = record
    return last


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest of memtron.train.checkpoint.list_checkpoints (complete = has manifest.json),
    without importing torch."""
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "manifest.json").is_file()) \
        if root.is_dir() else []
    return done[-1] if done else None


def status(run_dir: str | Path) -> dict[str, Any]:
    """Job state, restarts, last step and loss, latest checkpoint of a submitted run."""
    run_dir = Path(run_dir).resolve()
    job = _read_job(run_dir)
    job_id = str(job["job_id"])
    try:
        info, unknown_why = job_state(job_id), "no longer known to slurmctld"
    except SlurmError as e:  # e.g. looking at a run dir from a machine without SLURM
        info, unknown_why = {}, str(e)
    steps = None
    if (run_dir / CONFIG_FILE).is_file():
        with_steps = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
        steps = (with_steps.get("train") or {}).get("steps")
    last = _last_train_record(run_dir)
    ckpt = _latest_checkpoint(run_dir)
    return {
        "job_id": job_id,
        "state": info.get("JobState", "UNKNOWN"),
        "reason": info.get("Reason", ""),
        "restarts": int(info.get("Restarts", "0") or 0),
        "exit_code": info.get("ExitCode", ""),
        "run_time": info.get("RunTime", ""),
        "nodes": info.get("NodeList", ""),
        "known_to_slurm": bool(info),
        "unknown_why": "" if info else unknown_why,
        "step": last["step"] if last else None,
        "steps": steps,
        "loss": last["loss"] if last else None,
        "checkpoint": str(ckpt) if ckpt else None,
        "log": job.get("log", ""),
        "run_dir": str(run_dir),
    }


def format_status(s: dict[str, Any]) -> str:
    state = s["state"] if s["known_to_slurm"] else f"UNKNOWN ({s['unknown_why']})"
    extra = []
    if s["reason"] and s["reason"] != "None":
        extra.append(f"reason {s['reason']}")
    if s["restarts"]:
        extra.append(f"requeued {s['restarts']}x")
    if s["exit_code"] and s["state"] not in ("PENDING", "RUNNING"):
        extra.append(f"exit {s['exit_code']}")
    if s["run_time"]:
        extra.append(f"run time {s['run_time']}")
    if s["nodes"] and s["nodes"] != "(null)":
        extra.append(f"nodes {s['nodes']}")
    lines = [f"job {s['job_id']}: {state}" + (f" ({', '.join(extra)})" if extra else "")]
    if s["step"] is None:
        lines.append("step: none yet")
    else:
        total = f"/{s['steps']}" if s["steps"] else ""
        lines.append(f"step {s['step']}{total}  loss {s['loss']:.4f}")
    lines.append(f"checkpoint {s['checkpoint'] or 'none yet'}")
    lines.append(f"log {s['log']}")
    return "\n".join(lines)


def cancel(run_dir: str | Path) -> str:
    """``scancel`` the run's job if it is still queued or running."""
    run_dir = Path(run_dir).resolve()
    job_id = str(_read_job(run_dir)["job_id"])
    state = job_state(job_id).get("JobState", "")
    if state and state not in ACTIVE_STATES:
        return f"job {job_id} is already {state}; nothing to cancel"
    done = _run(["scancel", job_id])
    if done.returncode != 0:
        raise SlurmError(f"scancel {job_id} failed: {done.stderr.strip() or done.stdout.strip()}")
    return f"cancelled job {job_id} ({state or 'state unknown'})"
