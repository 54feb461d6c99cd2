"""`memtron train` launched by torchrun, mpirun and srun-style SLURM variables trains exactly
like one process (dp=2 with half the micro-batch each)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memtron.config import load_config
from memtron.train.trainer import train
from tests.conftest import tiny_overrides
from tests.test_launch import (
    LAUNCH_TIMEOUT_S,
    _slurm_job_id_for_free_port,
    child_env,
    mpirun_two_ranks,
    run_launcher,
    wait_all,
)

STEPS = 4
TRAIN = ["-m", "memtron.cli", "train", "--resume", "none"]


def _overrides(corpus: Path, run_dir: Path, dp: int) -> list[str]:
    return tiny_overrides(corpus, run_dir, **{"train.steps": STEPS,
                                              "data.micro_batch_size": 4 // dp})


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def single_losses(tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("single")
    return train(load_config(None, _overrides(tiny_corpus, run, dp=1))).losses


def _check(run_dir: Path, result: subprocess.CompletedProcess, source: str, single: dict):
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"source={source} world_size=2" in result.stderr
    assert "world 2 = tp 1 x cp 1 x dp 2" in result.stderr
    losses = _losses(run_dir)
    assert losses == pytest.approx(single, rel=1e-5)


def test_train_under_torchrun(tiny_corpus, tmp_path, single_losses):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *TRAIN, *_overrides(tiny_corpus, tmp_path, dp=2)]
    _check(tmp_path, run_launcher(cmd, child_env()), "torchrun", single_losses)


def test_train_under_mpirun(tiny_corpus, tmp_path, single_losses):
    cmd = [*mpirun_two_ranks(), sys.executable, *TRAIN, *_overrides(tiny_corpus, tmp_path, dp=2)]
    _check(tmp_path, run_launcher(cmd, child_env()), "mpi", single_losses)


def test_train_with_srun_variables(tiny_corpus, tmp_path, single_losses):
    job_id = _slurm_job_id_for_free_port()
    procs = [subprocess.Popen(
        [sys.executable, *TRAIN, *_overrides(tiny_corpus, tmp_path, dp=2)],
        env=child_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                      SLURM_NODEID="0", SLURM_TASKS_PER_NODE="2", SLURM_JOB_ID=str(job_id),
                      MASTER_ADDR="127.0.0.1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank in range(2)]
    results = wait_all(procs, LAUNCH_TIMEOUT_S)
    merged = subprocess.CompletedProcess([], max(r[0] for r in results),
                                         "".join(r[1] for r in results),
                                         "".join(r[2] for r in results))
    _check(tmp_path, merged, "slurm", single_losses)


def test_failing_rank_fails_the_job(tiny_corpus, tmp_path):
    """A rank that cannot start (its data is corrupt) makes the whole torchrun job exit
    non-zero instead of leaving its peer waiting."""
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    shard = sorted((corpus / "train").glob("*.tar"))[-1]
    shard.write_bytes(shard.read_bytes()[:-3000])  # truncated: rank 1 reads it first
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *TRAIN, *_overrides(corpus, tmp_path / "run", dp=2), "parallel.timeout_s=20"]
    result = run_launcher(cmd, child_env())
    assert result.returncode != 0
    assert shard.name in result.stdout + result.stderr
