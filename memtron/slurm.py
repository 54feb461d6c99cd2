"""SLURM jobs: render and submit sbatch scripts, follow and cancel them, requeue on pre-emption."""

from __future__ import annotations

import os
import shutil
import subprocess


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
