"""Shared fixtures: a small generated corpus and a tiny model config that trains in seconds."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from memtron.config import load_config
from memtron.data.prepare import prepare
from memtron.data.synthetic import generate_corpus

TINY_SEQ_LEN = 32


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, n_entities=60, n_train_docs=300, n_valid_docs=40, seed=1,
                    questions_per_bucket=5)
    prepare([root / "raw" / "train.jsonl"], root / "train", seq_len=TINY_SEQ_LEN,
            samples_per_shard=200)
    prepare([root / "raw" / "valid.jsonl"], root / "valid", seq_len=TINY_SEQ_LEN)
    return root


def tiny_overrides(corpus: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,
        "model.d_ff": 64, "model.max_seq_len": TINY_SEQ_LEN,
        "memory.layers": "[1]", "memory.placement": "beside", "memory.n_heads": 2,
        "memory.topk": 4, "memory.d_key": 16, "memory.n_sub_keys": 16, "memory.value_dim": 32,
        "data.train": corpus / "train", "data.valid": corpus / "valid",
        "data.questions": corpus / "questions.jsonl", "data.seq_len": TINY_SEQ_LEN,
        "data.micro_batch_size": 4, "optim.warmup_steps": 2, "train.steps": 12,
        "train.eval_every": 0, "train.eval_batches": 2, "train.threads": 1,
        "train.run_dir": run_dir, "checkpoint.every": 0, "logging.tensorboard": "false",
        "logging.progress": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny_config(tiny_corpus, tmp_path):
    def make(run_name: str = "run", **extra):
        return load_config(None, tiny_overrides(tiny_corpus, tmp_path / run_name, **extra))

    return make


def save_word_level_tokenizer(path: Path, specials: list[str]) -> Path:
    """A tiny local Hugging Face tokenizer.json (no download) for tests."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", *specials])
    tok.train_from_iterator(["hello world", "memory layers remember facts", "hello memory"],
                            trainer)
    tok.save(str(path))
    return path
