"""`memtron submit / status / cancel` on a real two-node SLURM cluster on this machine
(slurm/testing/start.sh: Debian's slurmctld + two slurmd + munge), and the rendered sbatch
scripts. The cluster tests skip only when SLURM can be neither found nor installed (not root or
no apt-get); CI installs it through start.sh itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from memtron import slurm
from memtron.cli import main
from memtron.config import ConfigError, load_config
from memtron.train.trainer import train
from tests.conftest import tiny_overrides
from tests.test_launch import child_env

REPO = Path(__file__).resolve().parents[1]
TESTING = REPO / "slurm" / "testing"
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
START_TIMEOUT_S = 900  # includes apt-get install on a clean machine
JOB_TIMEOUT_S = 180
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


# --------------------------------------------------------------------------- rendering (no cluster)


def _render(tmp_path, monkeypatch, capsys, *args: str) -> str:
    monkeypatch.chdir(tmp_path)
    code = main(["submit", "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
                 "train.run_dir=/scratch/memtron/runs/big", *args, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert not Path("/scratch/memtron/runs/big").exists()  # a dry run writes nothing
    return out.replace(str(tmp_path), "<CWD>")


def test_dry_run_4x8_gpu_snapshot(tmp_path, monkeypatch, capsys):
    script = _render(tmp_path, monkeypatch, capsys, "--nodes", "4", "--gpus-per-node", "8",
                     "--partition", "gpu", "--account", "proj", "--time", "24:00:00",
                     "--qos", "high", "--constraint", "h100", "--exclusive",
                     "--cpus-per-task", "12", "--env", "NCCL_DEBUG=WARN",
                     "--env", "WANDB_MODE=offline run", "--python", "/opt/venv/bin/python")
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --time=24:00:00", "#SBATCH --qos=high", "#SBATCH --constraint=h100",
                 "#SBATCH --exclusive", "#SBATCH --requeue", "#SBATCH --signal=USR1@120",
                 "#SBATCH --output=/scratch/memtron/runs/big/slurm-%j.out",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "export NCCL_DEBUG=WARN",
                 "export WANDB_MODE='offline run'",
                 "/opt/venv/bin/python -m memtron.cli train --config "
                 "/scratch/memtron/runs/big/config.yaml --resume auto"]:
        assert line in script, line
    snapshot = SNAPSHOTS / "submit_4x8_gpu.sbatch"
    if os.environ.get("MEMTRON_UPDATE_SNAPSHOTS"):
        snapshot.parent.mkdir(exist_ok=True)
        snapshot.write_text(script)
    assert script == snapshot.read_text(), (
        "rendered script differs from tests/snapshots/submit_4x8_gpu.sbatch; if intended, rerun "
        "with MEMTRON_UPDATE_SNAPSHOTS=1")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid sh


def test_dry_run_torchrun_per_node(tmp_path, monkeypatch, capsys):
    script = _render(tmp_path, monkeypatch, capsys, "--nodes", "2", "--gpus-per-node", "4",
                     "--launcher", "torchrun", "--container-image", "nvcr.io/nvidia/pytorch:24.05",
                     "--signal-seconds", "300")
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --gpus-per-node=4" in script
    assert "--nproc-per-node 4" in script and "torch.distributed.run" in script
    assert "#SBATCH --signal=USR1@300" in script
    assert "--container-image=nvcr.io/nvidia/pytorch:24.05" in script
    assert "\n    python -m memtron.cli train" in script  # the container's python
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_layout_errors_name_the_problem(tiny_corpus, tmp_path):
    overrides = tiny_overrides(tiny_corpus, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"parallel\.dp"):  # 3 ranks over 2 nodes
        slurm.render(None, [*overrides, "parallel.dp=3"], slurm.JobSpec(nodes=2))
    with pytest.raises(ConfigError, match=r"parallel\.tp"):  # tp=2 does not divide 3 GPUs
        slurm.render(None, [*overrides, "parallel.tp=2"], slurm.JobSpec(gpus_per_node=3))
    with pytest.raises(slurm.SlurmError, match="one task per GPU"):
        slurm.render(None, overrides, slurm.JobSpec(gpus_per_node=2, tasks_per_node=4))
    with pytest.raises(slurm.SlurmError, match="KEY=VALUE"):
        slurm.render(None, overrides, slurm.JobSpec(env=["1BAD=x"]))
    # CPU nodes: tasks per node from the config's world (tp x cp x dp) or --tasks-per-node
    assert slurm.render(None, [*overrides, "parallel.dp=4"],
                        slurm.JobSpec(nodes=2)).tasks_per_node == 2
    assert slurm.render(None, overrides, slurm.JobSpec(nodes=2, tasks_per_node=3)).world_size == 6


# --------------------------------------------------------------------------- the test cluster


def _daemon_logs(state: Path) -> str:
    parts = []
    for log in sorted((state / "log").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-30:]
        parts.append(f"----- {log}\n" + "\n".join(lines))
    return "\n".join(parts)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Two nodes (n1, n2, one CPU each) on this machine; SLURM_CONF points the clients at it."""
    have_slurm = all(shutil.which(t) or Path("/usr/sbin", t).exists()
                     for t in ("slurmctld", "slurmd", "sbatch", "munged"))
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster runs its daemons as root; not root")
    if not have_slurm and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is unavailable to install it")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    done = subprocess.run([str(TESTING / "start.sh"), str(state)], capture_output=True,
                          text=True, timeout=START_TIMEOUT_S, env=env)
    if done.returncode == 3:
        pytest.skip(f"cannot set up the SLURM test cluster: {done.stderr.strip()}")
    if done.returncode != 0:
        subprocess.run([str(TESTING / "stop.sh"), str(state)], capture_output=True, env=env)
        pytest.fail(f"slurm/testing/start.sh failed ({done.returncode}):\n{done.stdout}\n"
                    f"{done.stderr}\n{_daemon_logs(state)}")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    os.environ["PATH"] = env["PATH"]
    try:
        yield state
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run([str(TESTING / "stop.sh"), str(state)], capture_output=True, env=env,
                       timeout=120)


def _env(state: Path) -> dict[str, str]:
    """A clean child environment (no SLURM_* of the caller) that reaches the test cluster."""
    return child_env(SLURM_CONF=str(state / "slurm.conf"), PATH=os.environ["PATH"])


def _write_config(tmp_path: Path, corpus: Path, **extra) -> Path:
    cfg = load_config(None, tiny_overrides(corpus, tmp_path / "unused", **extra))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def _submit(state: Path, cwd: Path, *args: str) -> tuple[str, Path]:
    cmd = [sys.executable, "-m", "memtron.cli", "submit", *args]
    done = subprocess.run(cmd, cwd=cwd, env=_env(state), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    job_id = re.search(r"submitted job (\d+)", done.stdout).group(1)
    log = Path(re.search(r"^log (\S+)", done.stdout, re.M).group(1))
    assert log.name == f"slurm-{job_id}.out"
    return job_id, log


def _fail(state: Path, job_id: str, log: Path, why: str):
    subprocess.run(["scancel", job_id], capture_output=True)
    text = log.read_text(errors="replace") if log.exists() else "(no job log)"
    pytest.fail(f"{why}\n----- {log}\n{text}\n{_daemon_logs(state)}")


def _wait(state: Path, job_id: str, log: Path, until=None, timeout: float = JOB_TIMEOUT_S):
    """Poll until ``until(info)`` holds (default: the job is finished); returns the last info."""
    deadline = time.monotonic() + timeout
    while True:
        info = slurm.job_info(job_id)
        if (until or (lambda i: i.get("JobState") in DONE_STATES))(info):
            return info
        if time.monotonic() > deadline:
            _fail(state, job_id, log, f"job {job_id} not there after {timeout}s: {info}")
        time.sleep(0.5)


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def _queued() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True,
                          check=True).stdout.split("\n")[:-1]


SHORT_STEPS = 8


@pytest.fixture(scope="module")
def single_losses(tiny_corpus, tmp_path_factory) -> dict[int, float]:
    """One process, micro-batch 4: what 2 ranks x micro-batch 2 must reproduce."""
    run = tmp_path_factory.mktemp("single")
    return train(load_config(None, tiny_overrides(tiny_corpus, run,
                                                  **{"train.steps": SHORT_STEPS}))).losses


def _run_short_job(state: Path, corpus: Path, tmp_path: Path, *options: str) -> tuple[Path, str]:
    config = _write_config(tmp_path, corpus, **{"train.steps": SHORT_STEPS})
    run_dir = tmp_path / "job"
    job_id, log = _submit(state, tmp_path, "--config", str(config), f"train.run_dir={run_dir}",
                          "data.micro_batch_size=2", "--nodes", "2", *options)
    info = _wait(state, job_id, log)
    if info["JobState"] != "COMPLETED":
        _fail(state, job_id, log, f"job {job_id} ended {info['JobState']}")
    return run_dir, job_id


@pytest.mark.slow
def test_two_nodes_train_like_one_process(slurm_cluster, tiny_corpus, tmp_path, single_losses):
    steps = SHORT_STEPS
    run_dir, job_id = _run_short_job(slurm_cluster, tiny_corpus, tmp_path)
    text = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "0: memtron: task 0 of 2 on node n1" in text
    assert "1: memtron: task 1 of 2 on node n2" in text
    assert "source=slurm world_size=2 backend=gloo master=127.0.0.1:" in text  # NodeAddr
    assert "world 2 = tp 1 x cp 1 x dp 2" in text
    assert _losses(run_dir) == pytest.approx(single_losses, rel=1e-5)
    # what was submitted is kept in the run dir
    assert (run_dir / "job.sbatch").read_text().startswith("#!/bin/bash")
    assert load_config(run_dir / "config.yaml").train.run_dir == str(run_dir)
    assert json.loads((run_dir / "slurm.json").read_text())["job_id"] == job_id
    state = slurm.status(run_dir)
    assert (state["state"], state["step"], state["steps"]) == ("COMPLETED", steps, steps)
    assert state["checkpoint"].endswith(f"step-{steps:08d}")


@pytest.mark.slow
def test_torchrun_per_node_template(slurm_cluster, tiny_corpus, tmp_path, single_losses):
    run_dir, job_id = _run_short_job(slurm_cluster, tiny_corpus, tmp_path, "--launcher",
                                     "torchrun")
    text = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "0: memtron: node 0 of 2 (n1): torchrun, 1 process(es)" in text
    assert "1: memtron: node 1 of 2 (n2): torchrun, 1 process(es)" in text
    assert "source=torchrun world_size=2 backend=gloo master=127.0.0.1:" in text
    assert _losses(run_dir) == pytest.approx(single_losses, rel=1e-5)


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_exactly(slurm_cluster, tiny_corpus, tmp_path):
    """USR1 to the batch shell (as at pre-emption): the tasks checkpoint at an agreed step, rank 0
    requeues the job, the restart resumes from that checkpoint, and every step's loss equals an
    uninterrupted job's."""
    steps = 200
    config = _write_config(tmp_path, tiny_corpus, **{"train.steps": steps,
                                                     "data.micro_batch_size": 2})
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "preempted"
    ref_id, ref_log = _submit(slurm_cluster, tmp_path, "-c", str(config), "--out", str(ref_dir),
                              "--nodes", "2")
    if _wait(slurm_cluster, ref_id, ref_log)["JobState"] != "COMPLETED":
        _fail(slurm_cluster, ref_id, ref_log, "the uninterrupted job failed")

    job_id, log = _submit(slurm_cluster, tmp_path, "-c", str(config), "--out", str(run_dir),
                          "--nodes", "2")
    metrics = run_dir / "metrics.jsonl"
    _wait(slurm_cluster, job_id, log, lambda i: i.get("JobState") in DONE_STATES or (
        metrics.exists() and metrics.read_text().count('"train"') >= 30))
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    info = _wait(slurm_cluster, job_id, log)
    text = log.read_text()
    if info["JobState"] != "COMPLETED":
        _fail(slurm_cluster, job_id, log, f"job {job_id} ended {info['JobState']}")
    stopped = re.search(r"stopped by signal 10 at step (\d+); checkpoint (\S+)", text)
    assert stopped, text
    at, ckpt = int(stopped.group(1)), Path(stopped.group(2))
    assert 30 <= at < steps
    assert ckpt == run_dir / "checkpoints" / f"step-{at:08d}" and (ckpt / "manifest.json").is_file()
    assert f"SLURM job {job_id} requeued" in text
    assert f"resumed from {ckpt} at step {at}" in text
    assert int(info["Restarts"]) == 1
    assert "(restart 1)" in text
    losses, reference = _losses(run_dir), _losses(ref_dir)
    assert sorted(losses) == list(range(1, steps + 1))
    assert losses == pytest.approx(reference, rel=1e-5)
    state = slurm.status(run_dir)
    assert (state["state"], state["restarts"], state["step"]) == ("COMPLETED", 1, steps)


@pytest.mark.slow
def test_status_and_cancel(slurm_cluster, tiny_corpus, tmp_path, capsys):
    config = _write_config(tmp_path, tiny_corpus)
    run_dir = tmp_path / "held"
    # held back an hour by --begin: stays PENDING and costs no CPU
    job_id, log = _submit(slurm_cluster, tmp_path, "-c", str(config), "--out", str(run_dir),
                          "--nodes", "2", "--sbatch=--begin=now+3600")
    assert main(["status", "--ckpt", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"job {job_id}: PENDING" in out and "step: none yet" in out, out
    # a second job for the same run dir is refused while this one is queued
    assert main(["submit", "-c", str(config), "--out", str(run_dir), "--nodes", "1"]) == 2
    assert "already has job" in capsys.readouterr().err
    assert main(["cancel", "--ckpt", str(run_dir)]) == 0
    assert f"cancelled job {job_id}" in capsys.readouterr().out
    _wait(slurm_cluster, job_id, log)
    assert not [q for q in _queued() if q.split()[0] == job_id]
    assert main(["status", "--ckpt", str(run_dir)]) == 0
    assert f"job {job_id}: CANCELLED" in capsys.readouterr().out
    assert main(["cancel", "--ckpt", str(run_dir)]) == 0
    assert "nothing to cancel" in capsys.readouterr().out


@pytest.mark.slow
def test_bad_requests_fail_clearly_and_queue_nothing(slurm_cluster, tiny_corpus, tmp_path,
                                                     capsys):
    config = _write_config(tmp_path, tiny_corpus)
    before = _queued()
    cases = [
        (["--partition", "nosuch"], "partition 'nosuch' does not exist on this cluster "
                                    "(partitions: debug)"),
        (["--nodes", "3"], "--nodes 3 but partition 'debug' has 2 node(s)"),
        (["--nodes", "2", "--constraint", "nosuchfeature"], "sbatch rejected the job"),
        (["--nodes", "2", "model.n_heads=3"], "model.n_heads"),
    ]
    for i, (args, message) in enumerate(cases):
        run_dir = tmp_path / f"bad{i}"
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        options = [a for a in args if a not in overrides]
        code = main(["submit", "-c", str(config), "--out", str(run_dir), *overrides, *options])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert err.startswith("memtron: error: ")
        assert not (run_dir / "slurm.json").exists()
    assert _queued() == before
