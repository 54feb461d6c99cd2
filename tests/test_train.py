"""The training job: exact resume after SIGTERM and SIGKILL, checkpoint errors, the demo learns."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memtron.cli import main
from memtron.config import ConfigError, load_config
from memtron.data.loader import DataError
from memtron.data.prepare import iter_documents, prepare
from memtron.data.synthetic import generate_corpus, load_questions
from memtron.data.tokenizer import train_bpe
from memtron.eval.facts import eval_facts
from memtron.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    read_manifest,
    verify_checkpoint,
)
from memtron.train.trainer import Trainer, train
from tests.conftest import save_word_level_tokenizer, tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _spawn_train(overrides: list[str], resume: str = "auto") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "memtron.cli", "train", "--resume", resume, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and _losses(run_dir) and \
                max(_losses(run_dir)) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"training never reached step {step}: {proc.communicate()[0]}")


def test_train_runs_evaluates_and_logs(tiny_config):
    cfg = tiny_config(**{"train.eval_every": 6, "memory.usage_window": 4})
    run_dir = Path(cfg.train.run_dir)
    result = train(cfg)
    assert sorted(result.losses) == list(range(1, 13))
    assert set(result.evals) == {6, 12}
    assert "fact_acc/head" in result.evals[12] and "loss" in result.evals[12]
    assert result.checkpoint == run_dir / "checkpoints" / "step-00000012"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    usage = [r["step"] for r in records if "table0/slots_used" in r]
    assert usage == [4, 8, 12]
    assert all(r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_exactly(tiny_corpus, tmp_path, sig):
    steps = 300
    reference = train(load_config(None, tiny_overrides(
        tiny_corpus, tmp_path / "reference", **{"train.steps": steps})))

    run_dir = tmp_path / "killed"
    overrides = tiny_overrides(tiny_corpus, run_dir, **{"train.steps": steps,
                                                        "checkpoint.every": 7})
    proc = _spawn_train(overrides, resume="none")
    _wait_for_step(proc, run_dir, 10)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    stopped_at = max(_losses(run_dir))
    assert stopped_at < steps, "the run finished before the signal; nothing was tested"
    saved = [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir / "checkpoints")]
    if sig == signal.SIGTERM:  # graceful: checkpoint at the step it stopped, exit 128 + 15
        assert proc.returncode == 128 + signal.SIGTERM, output
        assert max(saved) == stopped_at
    else:  # no chance to save: the last periodic checkpoint is used
        assert proc.returncode == -signal.SIGKILL
        assert max(saved) % 7 == 0

    resumed = _spawn_train(overrides, resume="auto")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"resumed from {run_dir / 'checkpoints'}" in output
    assert _losses(run_dir) == reference.losses  # bit-exact, every step


@pytest.fixture
def saved_checkpoint(tiny_config) -> Path:
    cfg = tiny_config(**{"train.steps": 3})
    return train(cfg).checkpoint


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_checkpoint_is_named(tiny_config, saved_checkpoint, damage):
    shard = next(saved_checkpoint.glob("*.distcp"))
    if damage == "flip":
        _corrupt(shard)
        expected = shard.name
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
        expected = shard.name
    elif damage == "delete":
        shard.unlink()
        expected = shard.name
    else:
        (saved_checkpoint / "manifest.json").write_text("{not json")
        expected = "manifest.json"
    trainer = Trainer(tiny_config("other", **{"train.steps": 4}))
    with pytest.raises(CheckpointError) as err:
        trainer.load(saved_checkpoint)
    assert expected in str(err.value)


def test_cli_names_corrupt_checkpoint(tiny_corpus, tmp_path, saved_checkpoint, capsys):
    _corrupt(next(saved_checkpoint.glob("*.distcp")))
    overrides = tiny_overrides(tiny_corpus, tmp_path / "cli", **{"train.steps": 4})
    assert main(["train", "--resume", str(saved_checkpoint), *overrides]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and ".distcp" in err


def test_inputs_checked_before_work(tiny_config, tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="^data.train: no prepared shards"):
        Trainer(tiny_config(**{"data.train": tmp_path / "missing"}))
    with pytest.raises(ConfigError, match="^model.vocab_size"):
        Trainer(tiny_config(**{"model.vocab_size": 100}))
    tokenizer = save_word_level_tokenizer(tmp_path / "tokenizer.json", ["</s>"])
    with pytest.raises(ConfigError, match="^data.tokenizer: .* was tokenized with 'byte'"):
        Trainer(tiny_config(**{"data.tokenizer": tokenizer, "model.vocab_size": 4096}))
    with pytest.raises(DataError, match="seq_len"):
        Trainer(tiny_config(**{"data.seq_len": 16}))


def test_resume_refuses_other_architecture(tiny_config, saved_checkpoint):
    trainer = Trainer(tiny_config("other", **{"memory.topk": 8}))
    with pytest.raises(CheckpointError, match="memory.topk"):
        trainer.load(saved_checkpoint)


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES])
def test_failed_save_cleans_up_and_names_the_errno(tiny_config, monkeypatch, code):
    cfg = tiny_config(**{"train.steps": 2})
    trainer = Trainer(cfg)
    trainer.run()
    root = Path(cfg.train.run_dir) / "checkpoints"
    before = list_checkpoints(root)

    def fail(obj, path):
        raise OSError(code, os.strerror(code), str(path))

    # The per-rank files are written after the tensors, before the manifest and the rename.
    monkeypatch.setattr("memtron.train.checkpoint._save_file", fail)
    trainer.step = 5
    with pytest.raises(CheckpointError) as err:
        trainer.save()
    message = str(err.value)
    assert errno.errorcode[code] in message and str(root) in message and "needs about" in message
    assert not list(root.glob(".tmp-*"))  # the half-written step-5 is gone
    assert list_checkpoints(root) == before  # and the previous checkpoint untouched
    verify_checkpoint(before[-1], read_manifest(before[-1]))


def test_bf16_and_grad_accum_train(tiny_config):
    result = train(tiny_config(**{"train.dtype": "bf16", "train.grad_accum": 2,
                                  "train.steps": 4}))
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~4 min on 2 idle cores; a hang guard, not a speed assertion
def test_default_demo_learns_facts(tmp_path, monkeypatch, capsys):
    """The README's demo recipe, unchanged but for paths: loss falls, frequent facts are learned."""
    data = tmp_path / "data"
    generate_corpus(data)
    config = REPO / "configs" / "tiny-cpu.yaml"
    tokenizer = train_bpe(iter_documents(data / "raw" / "train.jsonl", "text"),  # as `make data`
                          load_config(config).model.vocab_size, data / "bpe")
    for split in ("train", "valid"):
        prepare([data / "raw" / f"{split}.jsonl"], data / split, tokenizer=tokenizer.spec,
                seq_len=128)
    cfg = load_config(config, [
        f"data.train={data / 'train'}", f"data.valid={data / 'valid'}",
        f"data.tokenizer={tokenizer.spec}",
        f"data.questions={data / 'questions.jsonl'}", f"train.run_dir={tmp_path / 'run'}",
        "logging.progress=false", "logging.tensorboard=false"])
    result = train(cfg)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert sum(losses[-20:]) / 20 < 0.3 * sum(losses[:20]) / 20
    # As `make demo` does: `memtron eval facts` on the last checkpoint (the config's in-training
    # eval is off, so the demo scores its questions once, after training).
    report = eval_facts(result.checkpoint)
    final = {name: b["accuracy"] for name, b in report["buckets"].items()}
    assert final["head"] > 4 * report["chance"], report["buckets"]
    assert final["head"] > final["tail"], report["buckets"]
    # The demo's last step: the trained model answers head-bucket questions by generation.
    head = [q for q in load_questions(data / "questions.jsonl") if q["bucket"] == "head"][:10]
    (tmp_path / "head.jsonl").write_text("".join(json.dumps(q) + "\n" for q in head))
    assert main(["generate", "--ckpt", str(tmp_path / "run"), "--prompts",
                     str(tmp_path / "head.jsonl"), "--greedy", "--max-new-tokens", "12",
                     "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    right = sum(a["completion"].startswith(a["answer"]) for a in answers)
    assert len(answers) == 10 and right >= 3, answers
