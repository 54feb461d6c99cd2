"""Launcher: pure parsing of each launcher's variables, then real 2-process launches on gloo
(torchrun, mpirun, hand-set SLURM variables) and the fail-fast behaviour when one rank dies."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from memtron.parallel import launch
from memtron.parallel.launch import (
    DistEnv,
    LaunchError,
    detect_env,
    fail_fast,
    init_distributed,
    parse_tasks_per_node,
    shutdown_distributed,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist_scripts" / "launch_allreduce.py"
LAUNCH_TIMEOUT_S = 90

# What a launcher sets; stripped from children so the test's own environment cannot leak in.
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_RANK", "MPI_LOCAL",
                      "TORCHELASTIC_")
_LAUNCHER_NAMES = {*launch.EXPORTED, "GROUP_RANK", "LOCAL_SIZE"}


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in _LAUNCHER_NAMES and not k.startswith(_LAUNCHER_PREFIXES)}


def child_env(**extra: str) -> dict[str, str]:
    env = _clean_environ()
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a whole launch; on a hang kill its process group so no rank outlives the test."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"launch hung for {LAUNCH_TIMEOUT_S}s: {cmd}\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


_OK_KEYS = {"source", "rank", "world", "local_rank", "local_world", "sum", "master", "waited"}


def ok_lines(stdout: str) -> list[dict[str, str]]:
    rows = []
    for chunk in stdout.split("LAUNCH_OK ")[1:]:  # robust to ranks' lines interleaving
        fields = (kv.split("=", 1) for kv in chunk.split() if "=" in kv)
        rows.append({k: v for k, v in fields if k in _OK_KEYS})
    return sorted(rows, key=lambda r: int(r["rank"]))


def check_two_ranks(result: subprocess.CompletedProcess, source: str) -> list[dict[str, str]]:
    assert result.returncode == 0, result.stdout + result.stderr
    rows = ok_lines(result.stdout)
    assert [r["rank"] for r in rows] == ["0", "1"], result.stdout + result.stderr
    for r in rows:
        assert (r["source"], r["world"], r["sum"]) == (source, "2", "1"), r
        assert r["local_world"] == "2" and r["local_rank"] == r["rank"], r
    assert f"source={source} world_size=2 backend=gloo" in result.stderr
    return rows


# --------------------------------------------------------------------------- parsing


TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc"}


def test_torchrun_env():
    assert detect_env(TORCHRUN) == DistEnv(1, 4, 1, 2, "10.0.0.1", 29500, "torchrun")


def test_torchrun_wins_over_slurm_and_mpi():
    env = {**TORCHRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "OMPI_COMM_WORLD_RANK": "0",
           "OMPI_COMM_WORLD_SIZE": "1"}
    assert detect_env(env).source == "torchrun"


def test_env_launcher_without_local_rank_is_one_process_per_node():
    env = {k: v for k, v in TORCHRUN.items() if not k.startswith(("LOCAL", "TORCHELASTIC"))}
    got = detect_env(env)
    assert (got.local_rank, got.local_world_size, got.source) == (0, 1, "torchrun")


@pytest.mark.parametrize("env, names", [
    ({**TORCHRUN, "RANK": "4"}, ["RANK=4", "WORLD_SIZE=4"]),
    ({**TORCHRUN, "WORLD_SIZE": "two"}, ["WORLD_SIZE", "'two'"]),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"]),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, ["MASTER_PORT"]),
    ({k: v for k, v in TORCHRUN.items() if k != "WORLD_SIZE"}, ["WORLD_SIZE"]),
    ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}, ["LOCAL_WORLD_SIZE"]),
])
def test_torchrun_errors_name_the_variable(env, names):
    with pytest.raises(LaunchError) as e:
        detect_env(env)
    for name in names:
        assert name in str(e.value)


SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "123456",
         "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "10.0.0.7"}


def test_slurm_env_with_master_addr():
    got = detect_env(SLURM)
    assert got == DistEnv(3, 4, 1, 2, "10.0.0.7", 10000 + 123456 % 50000, "slurm")
    assert detect_env({**SLURM, "MASTER_PORT": "4242"}).master_port == 4242


@pytest.mark.parametrize("text, counts", [
    ("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("3,1(x2),8", [3, 1, 1, 8]),
])
def test_parse_tasks_per_node(text, counts):
    assert parse_tasks_per_node(text) == counts


def test_parse_tasks_per_node_rejects_garbage():
    with pytest.raises(LaunchError, match="2x3"):
        parse_tasks_per_node("2x3")


def test_slurm_uneven_tasks_per_node_uses_node_id():
    env = {**SLURM, "SLURM_NTASKS": "7", "SLURM_PROCID": "6", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "3", "SLURM_TASKS_PER_NODE": "2(x3),1"}
    assert detect_env(env).local_world_size == 1
    # The step's layout wins over the allocation's; SLURM_NTASKS_PER_NODE is the last resort.
    env = {**SLURM, "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "8(x2)"}
    assert detect_env(env).local_world_size == 2
    env = {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
    assert detect_env({**env, "SLURM_NTASKS_PER_NODE": "2"}).local_world_size == 2
    with pytest.raises(LaunchError, match="SLURM_TASKS_PER_NODE"):
        detect_env(env)


def test_slurm_errors_name_the_variable():
    with pytest.raises(LaunchError, match="SLURM_PROCID=4 is out of range for SLURM_NTASKS=4"):
        detect_env({**SLURM, "SLURM_PROCID": "4"})
    with pytest.raises(LaunchError, match="SLURM_LOCALID"):
        detect_env({**SLURM, "SLURM_LOCALID": "x"})


def test_slurm_without_scontrol_or_master_addr(tmp_path):
    env = {k: v for k, v in SLURM.items() if k != "MASTER_ADDR"}
    with pytest.raises(LaunchError, match="SLURM_NTASKS set but scontrol not found"):
        detect_env({**env, "PATH": str(tmp_path)})


FAKE_SCONTROL = """#!/bin/sh
# Stand-in for SLURM's scontrol, printing what the real one prints for these two queries.
if [ "$1 $2" = "show hostnames" ]; then
    [ "$3" = "n[1-2]" ] || { echo "unexpected nodelist $3" >&2; exit 3; }
    echo n1
    echo n2
elif [ "$1 $2" = "show node" ]; then
    [ "$3" = "n1" ] || { echo "Node $3 not found" >&2; exit 1; }
    echo "NodeName=$3 Arch=x86_64 CoresPerSocket=8"
    echo "   CPUAlloc=0 CPUEfctv=16 CPUTot=16 CPULoad=0.01"
    echo "   NodeAddr=10.1.2.3 NodeHostName=$3 Version=23.02.7"
else
    exit 2
fi
"""


def test_slurm_master_addr_from_scontrol(tmp_path):
    # A parsing test only: a fake scontrol prints real output formats. A real SLURM cluster
    # (slurmctld + slurmd) is exercised separately.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(FAKE_SCONTROL)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in SLURM.items() if k != "MASTER_ADDR"}
    env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    got = detect_env(env)
    assert (got.master_addr, got.master_port) == ("10.1.2.3", 10000 + 123456 % 50000)
    # The step's node list is preferred; scontrol's complaint reaches the error message.
    with pytest.raises(LaunchError, match="unexpected nodelist n9"):
        detect_env({**env, "SLURM_STEP_NODELIST": "n9"})


OPENMPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
MPICH = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}


def test_mpi_envs_parse_without_calling_mpi(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # any import of mpi4py would now fail
    assert detect_env(OPENMPI) == DistEnv(2, 4, 0, 2, "", 0, "mpi")
    assert detect_env(MPICH) == DistEnv(1, 2, 1, 2, "", 0, "mpi")
    # Local fields the MPI did not export are left for the rendezvous to fill in.
    got = detect_env({"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "7"})
    assert (got.local_rank, got.local_world_size, got.master_addr, got.master_port) == (
        -1, -1, "h", 7)
    with pytest.raises(LaunchError, match="OMPI_COMM_WORLD_RANK=4"):
        detect_env({**OPENMPI, "OMPI_COMM_WORLD_RANK": "4"})
    with pytest.raises(LaunchError, match="PMI_SIZE"):
        detect_env({**MPICH, "PMI_SIZE": ""})


def test_mpi_without_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(LaunchError, match=r"pip install memtron\[mpi\]"):
        launch._mpi_rendezvous(detect_env(OPENMPI))


def test_single_process(monkeypatch):
    assert detect_env({}) == DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")
    for name in set(os.environ) - set(_clean_environ()):
        monkeypatch.delenv(name)
    env = init_distributed()
    try:
        assert env.source == "single" and env.world_size == 1
        assert not dist.is_initialized()  # no process group for a plain single process
        assert init_distributed() is env
    finally:
        shutdown_distributed()


def test_nccl_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
    assert launch._resolve_backend("auto") == "gloo"
    with pytest.raises(LaunchError, match="nccl"):
        launch._resolve_backend("nccl")


# --------------------------------------------------------------------------- fail_fast


class _Exited(Exception):
    pass


def test_fail_fast_prefixes_traceback_and_exits(monkeypatch, capsys):
    codes = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise _Exited

    monkeypatch.setattr(launch.os, "_exit", fake_exit)
    with pytest.raises(_Exited), fail_fast(DistEnv(3, 4, 1, 2, "h", 1, "torchrun")):
        raise ValueError("boom")
    err = capsys.readouterr().err
    assert codes == [1]
    assert "[rank 3] Traceback" in err and "[rank 3] ValueError: boom" in err


def test_fail_fast_passes_interrupts_and_single_process_errors(monkeypatch):
    monkeypatch.setattr(launch.os, "_exit", lambda code: pytest.fail("must not exit"))
    multi = DistEnv(1, 2, 1, 2, "h", 1, "torchrun")
    with pytest.raises(KeyboardInterrupt), fail_fast(multi):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit), fail_fast(multi):
        sys.exit(3)
    with pytest.raises(ValueError, match="solo"), fail_fast(DistEnv(0, 1, 0, 1, "", 0, "single")):
        raise ValueError("solo")


# --------------------------------------------------------------------------- real launches


def test_torchrun_launch():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(SCRIPT)]
    check_two_ranks(run_launcher(cmd, child_env()), "torchrun")


def mpirun_two_ranks() -> list[str]:
    """``mpirun`` starting 2 local ranks (skips the test when MPI is not installed)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not on PATH (install OpenMPI or MPICH to test MPI launches)")
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install memtron[mpi])")
    cmd = [mpirun, "-n", "2", "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


def test_mpirun_launch():
    cmd = [*mpirun_two_ranks(), sys.executable, str(SCRIPT)]
    rows = check_two_ranks(run_launcher(cmd, child_env()), "mpi")
    assert rows[0]["master"] == rows[1]["master"]  # both got rank 0's broadcast
    assert rows[0]["master"].startswith("127.0.0.1:")  # all ranks on one host


def _slurm_job_id_for_free_port() -> int:
    for _ in range(50):
        port = free_port()
        if launch.SLURM_PORT_BASE <= port < launch.SLURM_PORT_BASE + launch.SLURM_PORT_SPAN:
            return port - launch.SLURM_PORT_BASE
    pytest.skip("no free port in the SLURM-derived range")


def spawn_ranks(env_for_rank, args: list[str]) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env_for_rank(rank),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
            for rank in range(2)]


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) per rank; kills everything left at the deadline."""
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"ranks still running after {timeout_s}s")
    return results


def test_slurm_variables_by_hand():
    job_id = _slurm_job_id_for_free_port()

    def env_for(rank: int) -> dict[str, str]:
        return child_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                         SLURM_NODEID="0", SLURM_TASKS_PER_NODE="2", SLURM_JOB_ID=str(job_id),
                         MASTER_ADDR="127.0.0.1")

    results = wait_all(spawn_ranks(env_for, []), LAUNCH_TIMEOUT_S)
    out = "".join(r[1] for r in results)
    err = "".join(r[2] for r in results)
    check_two_ranks(subprocess.CompletedProcess([], max(r[0] for r in results), out, err),
                    "slurm")
    assert f"master=127.0.0.1:{launch.SLURM_PORT_BASE + job_id}" in out


def _torchrun_env_for(port: int):
    def env_for(rank: int) -> dict[str, str]:
        return child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                         LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env_for


def test_failing_rank_exits_and_blocked_peer_fails():
    """Rank 1 raises before the collective; rank 0, blocked in all_reduce, must not hang."""
    procs = spawn_ranks(_torchrun_env_for(free_port()), ["fail", "5"])
    # wait_all fails the test if a rank is still running at LAUNCH_TIMEOUT_S (the hang guard)
    (rc0, out0, err0), (rc1, _, err1) = wait_all(procs, LAUNCH_TIMEOUT_S)
    assert rc1 != 0 and rc0 != 0, (rc0, rc1, err0, err1)
    assert "[rank 1] ValueError: rank 1 fails on purpose" in err1
    assert "[rank 0] RuntimeError" in err0 and "LAUNCH_OK" not in out0


def test_stalled_peer_fails_blocked_rank_by_collective_timeout():
    """Rank 1 stays alive but never joins: gloo raises on rank 0 after timeout_s."""
    procs = spawn_ranks(_torchrun_env_for(free_port()), ["hang", "5"])
    try:
        rc0, out0, err0 = wait_all(procs[:1], 60)[0]
    finally:
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].communicate()
    assert rc0 == 1 and "LAUNCH_OK" not in out0
    assert "[rank 0]" in err0 and "Timed out" in err0, err0
    m = [line for line in err0.splitlines() if "Timed out waiting" in line]
    assert m and "5000ms" in m[0]
