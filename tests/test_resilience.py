"""Training survives divergence, a full disk, a damaged checkpoint and a kill during an
asynchronous save, and never overwrites good work with bad."""

import json
import math
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from memtron.cli import EXIT_DIVERGED, main, silence_third_party_warnings
from memtron.config import load_config
from memtron.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    read_manifest,
    verify_checkpoint,
)
from memtron.train.trainer import Trainer, train
from tests.conftest import tiny_overrides
from tests.multiproc import run_ranks
from tests.test_train import _corrupt, _losses, _spawn_train


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _verified(root: Path) -> list[str]:
    """Names of the checkpoints under ``root``; every one of them verifies."""
    found = list_checkpoints(root)
    for path in found:
        verify_checkpoint(path, read_manifest(path))
    assert sorted(root.glob("step-*")) == found  # no step directory without a manifest
    return [p.name for p in found]


# --------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("cause", ["lr", "injected"])
def test_divergence_stops_without_checkpointing_the_bad_state(tiny_corpus, tmp_path, capsys,
                                                               monkeypatch, cause):
    """``lr``: the issue's recipe, whose NaN gradients come and go with the batches here;
    ``injected``: a NaN loss on every step from step 4 on."""
    if cause == "injected":
        loss = Trainer._loss
        monkeypatch.setattr(Trainer, "_loss", lambda self, *args: loss(self, *args) * (
            math.nan if self.step >= 3 else 1.0))
    run_dir = tmp_path / "nan"
    lr = {"optim.lr": 1e4, "optim.grad_clip": 0} if cause == "lr" else {}
    overrides = tiny_overrides(tiny_corpus, run_dir, **lr, **{
        "train.steps": 30, "checkpoint.every": 1, "checkpoint.keep_last": 2})
    assert main(["train", "--resume", "none", *overrides]) == EXIT_DIVERGED
    err = capsys.readouterr().err
    records = _train_records(run_dir)
    skipped = [r["step"] for r in records if r.get("skipped")]
    last = records[-1]["step"]
    streak = list(range(last - 4, last + 1))  # train.max_bad_steps defaults to 5
    assert skipped[-5:] == streak and not records[-6].get("skipped")
    if cause == "injected":
        assert skipped == [4, 5, 6, 7, 8]  # stopped within max_bad_steps + 1 steps
    assert f"training diverged: 5 steps in a row up to step {last}" in err
    assert ("non-finite loss (nan)" if cause == "injected" else "non-finite grad_norm (nan)") \
        in err and "non-finite gradients in" in err

    names = _verified(run_dir / "checkpoints")
    good = [r["step"] for r in records if not r.get("skipped")]
    assert names == [f"step-{s:08d}" for s in good[-2:]]  # no good one rotated out for a bad
    trainer = Trainer(load_config(None, tiny_overrides(tiny_corpus, tmp_path / "check")))
    trainer.load(run_dir / "checkpoints" / names[-1])
    state = [*trainer.model.parameters(), *(v for s in trainer.dense_opt.state.values()
                                            for v in s.values()),
             *(v for s in trainer.sparse_opt.state.values() for v in s.values())]
    assert all(bool(torch.isfinite(t).all()) for t in state)


def _nan_on_one_rank(rank: int, overrides: list[str], step: int) -> dict:
    """Rank 1 finds a NaN in one dense gradient at ``step``, after the dp all-reduce, so no
    other rank sees it unless the ranks agree on skipping."""
    from memtron.parallel.engine import DenseEngine
    from memtron.parallel.launch import init_distributed, shutdown_distributed
    from memtron.parallel.mesh import destroy_mesh

    share, calls = DenseEngine.grad_norm_share, []

    def poisoned(engine):
        calls.append(1)
        if rank == 1 and len(calls) == step:
            engine.params()[0].grad.view(-1)[0] = math.nan
        return share(engine)

    DenseEngine.grad_norm_share = poisoned
    cfg = load_config(None, overrides)
    init_distributed(cfg.parallel.timeout_s)
    try:
        trainer = Trainer(cfg)
        result = trainer.run()
        dense = {id(p) for p in trainer.dense_params}
        return {"skipped": result.skipped, "losses": result.losses,
                "dense": {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                          if id(p) in dense},
                "steps": {int(s["step"]) for s in [*trainer.dense_opt.state.values(),
                                                   *trainer.sparse_opt.state.values()]}}
    finally:
        destroy_mesh()
        shutdown_distributed()


def test_nan_on_one_rank_skips_the_step_on_every_rank(tiny_corpus, tmp_path):
    steps = 6
    overrides = tiny_overrides(tiny_corpus, tmp_path / "dp2", **{
        "train.steps": steps, "data.micro_batch_size": 2, "checkpoint.resume": "none"})
    ranks = run_ranks(2, _nan_on_one_rank, overrides, 3)
    for rank in ranks:
        assert rank["skipped"] == [3]
        assert sorted(rank["losses"]) == list(range(1, steps + 1))
        assert all(math.isfinite(v) for v in rank["losses"].values())
        assert rank["steps"] == {steps - 1}  # neither optimizer stepped at step 3
    zero, one = (r["dense"] for r in ranks)
    assert all(torch.equal(zero[name], one[name]) for name in zero)


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for one checkpoint of the tiny model (~0.7 MiB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_cleanly_and_resume_continues(tiny_corpus, tmp_path, small_disk,
                                                      capsys):
    run_dir = small_disk / "run"
    root = run_dir / "checkpoints"
    overrides = tiny_overrides(tiny_corpus, run_dir, **{"train.steps": 6,
                                                        "checkpoint.every": 3})
    assert main(["train", "--resume", "none", *overrides]) == 2
    err = capsys.readouterr().err
    assert "will probably fail" in err.split("memtron: error")[0]  # warned before writing
    assert f"checkpoint step 6 could not be written to {root}: [Errno 28] No space left on " \
        "device (ENOSPC); it needs about" in err
    assert "Traceback" not in err
    assert _verified(root) == ["step-00000003"]
    assert not list(root.glob(".tmp-*"))

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # freed
    assert main(["train", "--resume", "auto", *overrides]) == 0
    assert f"resumed from {root / 'step-00000003'} at step 3" in capsys.readouterr().err
    reference = train(load_config(None, tiny_overrides(tiny_corpus, tmp_path / "reference",
                                                       **{"train.steps": 6})))
    assert _losses(run_dir) == reference.losses


def test_failed_background_write_stops_the_run(tiny_config, monkeypatch):
    cfg = tiny_config(**{"checkpoint.async_save": "true", "checkpoint.every": 2})

    def fail(obj, path):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr("memtron.train.checkpoint._save_file", fail)
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 .*\(EIO\)"):
        train(cfg)
    root = Path(cfg.train.run_dir) / "checkpoints"
    assert not list(root.iterdir())


# --------------------------------------------------------------------------- damaged checkpoint


@pytest.fixture
def two_checkpoints(tiny_corpus, tmp_path) -> tuple[Path, list[str], list[dict]]:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_corpus, run_dir, **{
        "train.steps": 6, "checkpoint.every": 3, "train.loss_spike_window": 4})
    train(load_config(None, overrides))
    return run_dir, overrides, _train_records(run_dir)


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_resume_auto_falls_back_past_a_damaged_checkpoint(two_checkpoints, damage, capsys):
    run_dir, overrides, original = two_checkpoints
    root = run_dir / "checkpoints"
    newest = root / "step-00000006"
    shard = next(newest.glob("*.distcp"))
    if damage == "flip":
        _corrupt(shard)
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (newest / "manifest.json").unlink()
    reason = f"{newest / 'manifest.json'}: missing" if damage == "manifest" else \
        f"{shard}: checksum mismatch"

    assert main(["train", "--resume", str(newest), *overrides]) == 2  # an explicit path: no
    assert reason in capsys.readouterr().err                        # fallback, the file named

    leftover = root / ".tmp-step-00000009"  # and a crashed save's temporary directory
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(bytes(4096))
    assert main(["train", "--resume", "auto", *overrides]) == 0
    err = capsys.readouterr().err
    assert f"removed {leftover} (4.0 KiB) left by an interrupted checkpoint save" in err
    assert not leftover.exists()
    assert f"warning: skipped step-00000006: {reason}" in err
    assert f"resumed from {root / 'step-00000003'} at step 3" in err
    resumed = _train_records(run_dir)
    # exact: the losses, and the spike z-scores, whose window travels in the manifest
    assert [(r["step"], r["loss"], r.get("loss_z")) for r in resumed] == \
        [(r["step"], r["loss"], r.get("loss_z")) for r in original]
    assert "loss_z" in resumed[-1]
    assert _verified(root) == ["step-00000003", "step-00000006"]  # the damaged one replaced


# --------------------------------------------------------------------------- async save


def test_async_save_killed_mid_write_leaves_a_complete_checkpoint_or_none(tiny_corpus,
                                                                          tmp_path):
    extra = {"train.steps": 40, "checkpoint.every": 4, "checkpoint.async_save": "true",
             "memory.n_sub_keys": 128}  # a few MB per checkpoint: the write takes a while
    reference = train(load_config(None, tiny_overrides(tiny_corpus, tmp_path / "reference",
                                                       **extra)))
    run_dir = tmp_path / "killed"
    root = run_dir / "checkpoints"
    overrides = tiny_overrides(tiny_corpus, run_dir, **extra)
    proc = _spawn_train(overrides, resume="none")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:  # the second save is in flight
        if root.is_dir() and any(e.name == ".tmp-step-00000008" for e in os.scandir(root)):
            break
        time.sleep(0.001)
    proc.kill()
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-run: {output}"
    assert set(_verified(root)) <= {"step-00000004", "step-00000008"}
    leftover = list(root.glob(".tmp-*"))

    resumed = _spawn_train(overrides, resume="auto")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert ("left by an interrupted checkpoint save" in output) == bool(leftover)
    assert "resumed from" in output
    assert _losses(run_dir) == reference.losses  # bit-exact, every step
    # the CLI's filter: third-party noise is gone
    assert "Transformer Engine" not in output and "torch.distributed is disabled" not in output


def test_cli_filters_third_party_warnings_only():
    noise = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_third_party_warnings()
        warnings.warn_explicit(noise, UserWarning, "optimizer.py", 1,
                               module="megatron.core.optimizer")
        warnings.warn_explicit(noise, UserWarning, "trainer.py", 1, module="memtron.train")
        warnings.warn_explicit("a memtron warning", UserWarning, "trainer.py", 2,
                               module="memtron.train")
    assert [str(w.message) for w in caught] == [noise, "a memtron warning"]
