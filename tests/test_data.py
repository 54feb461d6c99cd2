"""Data pipeline: tokenizers, synthetic corpus, shard preparation and the resumable loader."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import re
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from memtron.data.loader import DataError, ShardLoader, eval_batches
from memtron.data.prepare import prepare
from memtron.data.synthetic import generate_corpus, load_questions
from memtron.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from tests.conftest import save_word_level_tokenizer

# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_multibyte():
    tok = ByteTokenizer()
    text = "Grüße, 東京 🎉 naïve"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([*ids[:3], tok.eos_id, 258, *ids[3:]]) == text  # specials are skipped
    assert (tok.vocab_size, tok.eos_id, tok.spec) == (260, 256, "byte")
    cut = tok.encode("東京")[:-1]  # a multi-byte character cut short is replaced
    assert tok.decode(cut) == "東\ufffd"


def test_hf_tokenizer_from_local_file(tmp_path):
    path = save_word_level_tokenizer(tmp_path / "tokenizer.json", ["</s>"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("hello memory layers")
    assert len(ids) == 3 and tok.decode(ids) == "hello memory layers"
    assert tok.eos_id == 1 and tok.vocab_size == 8
    assert tok.spec == str(path.resolve())
    assert load_tokenizer(str(tmp_path)).spec == tok.spec  # a directory holding tokenizer.json


def test_tokenizer_errors_name_the_spec(tmp_path):
    with pytest.raises(ValueError, match="no-such-tokenizer"):
        load_tokenizer("no-such-tokenizer")
    path = save_word_level_tokenizer(tmp_path / "noeos.json", [])
    with pytest.raises(ValueError, match="noeos.json"):
        HFTokenizer(path)


# ----------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    start = time.perf_counter()
    summary = generate_corpus(out)
    seconds = time.perf_counter() - start
    return out, summary, seconds


def test_synth_default_is_fast_and_sized_for_the_demo(corpus):
    out, summary, seconds = corpus
    assert seconds < 10
    for name in ("raw/train.jsonl", "raw/valid.jsonl", "questions.jsonl", "synth.json"):
        assert (out / name).is_file()
    assert json.loads((out / "synth.json").read_text()) == summary
    assert 0.5e6 < summary["counts"]["train_chars"] < 1.5e6
    assert 200 <= summary["counts"]["questions"] <= 600


def test_synth_deterministic_per_seed(corpus, tmp_path):
    out, _, _ = corpus
    small = {"n_entities": 50, "n_train_docs": 300, "n_valid_docs": 20, "questions_per_bucket": 5}
    generate_corpus(tmp_path / "a", seed=3, **small)
    generate_corpus(tmp_path / "b", seed=3, **small)
    generate_corpus(tmp_path / "c", seed=4, **small)
    for name in ("raw/train.jsonl", "raw/valid.jsonl", "questions.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_synth_zipf_long_tail(corpus):
    out, summary, _ = corpus
    text = (out / "raw/train.jsonl").read_text()
    questions = load_questions(out / "questions.jsonl")
    counts: dict[str, list[int]] = {"head": [], "torso": [], "tail": []}
    for entity, bucket in {(q["entity"], q["bucket"]) for q in questions}:
        counts[bucket].append(len(re.findall(re.escape(entity) + r"\b", text)))
    assert min(counts["head"]) > max(counts["tail"])
    assert np.median(counts["head"]) > 30 * np.median(counts["tail"])
    # the head facts are repeated many tens of times; tail ones a few
    head_repeats = [q["train_count"] for q in questions if q["bucket"] == "head"]
    assert np.mean(head_repeats) > 50
    buckets = summary["buckets"]
    assert buckets["head"]["min_mentions"] >= buckets["torso"]["max_mentions"]
    assert buckets["torso"]["min_mentions"] >= buckets["tail"]["max_mentions"]


def test_synth_questions_match_training_facts(corpus):
    out, summary, _ = corpus
    lines = (out / "raw/train.jsonl").read_text().splitlines()
    text = "\n".join(json.loads(line)["text"] for line in lines)
    questions = load_questions(out / "questions.jsonl")
    per_bucket = {b: sum(q["bucket"] == b for q in questions) for b in ("head", "torso", "tail")}
    assert per_bucket == {b: summary["buckets"][b]["n_questions"] for b in per_bucket}
    assert all(n == 100 for n in per_bucket.values())
    for q in questions:
        assert q["answer"] in q["choices"] and len(set(q["choices"])) == len(q["choices"])
        assert 10 <= len(q["choices"]) <= 30
        assert q["prompt"].count(q["entity"]) == 1
        # the prompt occurs in training, and is always continued by the answer
        continuations = re.findall(re.escape(q["prompt"]) + r"( \w+)\b", text)
        assert continuations and set(continuations) == {q["answer"]}


# ----------------------------------------------------------------------------- prepare


DOCS = ["first document, with ünïcödé", "second one\nhas two lines", "3", "the fourth and last"]


def _expected_stream(docs: list[str]) -> list[int]:
    tok = ByteTokenizer()
    return [i for d in docs for i in [*tok.encode(d), tok.eos_id]]


def _read_shards(out: Path) -> list[np.ndarray]:
    """Samples in shard order, read with tarfile/numpy only (independent of the loader)."""
    index = json.loads((out / "index.json").read_text())
    samples = []
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar:
                samples.append(np.load(io.BytesIO(tar.extractfile(member).read())))
    return samples


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet"])
def test_prepare_packs_the_token_stream(tmp_path, kind):
    source = tmp_path / f"docs.{kind}"
    if kind == "jsonl":
        source.write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                  for i, d in enumerate(DOCS)))
    elif kind == "txt":  # paragraphs separated by blank lines (any number, spaces allowed)
        source.write_text("\n\n".join(DOCS[:2]) + "\n\n  \n\n" + "\n\n".join(DOCS[2:]) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": DOCS}), source)
    seq_len = 7
    index = prepare([source], tmp_path / "out", seq_len=seq_len, samples_per_shard=3)
    out = tmp_path / "out"
    stream = _expected_stream(DOCS)
    n_samples = len(stream) // (seq_len + 1)
    assert index == json.loads((out / "index.json").read_text())
    assert index["n_samples"] == n_samples and index["n_tokens"] == n_samples * (seq_len + 1)
    assert index["dropped_tokens"] == len(stream) - index["n_tokens"]
    assert (index["seq_len"], index["dtype"], index["eos_id"]) == (seq_len, "uint16", 256)
    assert [s["n_samples"] for s in index["shards"]] == [3] * (n_samples // 3) + (
        [n_samples % 3] if n_samples % 3 else [])
    for shard in index["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data)
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    samples = _read_shards(out)
    assert all(s.dtype == np.uint16 and s.shape == (seq_len + 1,) for s in samples)
    packed = np.concatenate(samples).tolist()
    assert packed == stream[: len(packed)]
    # decoding between eos ids gives the documents back
    decoded = "".join(ByteTokenizer().decode(s.tolist()) for s in samples)
    assert decoded == "".join(DOCS)[: len(decoded)]
    assert {p.name for p in tmp_path.iterdir()} == {source.name, "out"}  # no temp dir left


# webdataset 1.0.2 leaves the shard file open for the garbage collector
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_prepare_is_readable_by_webdataset(tmp_path):
    import webdataset as wds

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    prepare([source], tmp_path / "out", seq_len=7, samples_per_shard=100)
    shard = str(tmp_path / "out" / "shard-00000.tar")
    rows = [s["npy"] for s in wds.WebDataset(shard, shardshuffle=False).decode()]
    gc.collect()  # let the leaked file be reported (and ignored) inside this test
    assert [r.tolist() for r in rows] == [s.tolist() for s in _read_shards(tmp_path / "out")]


def test_prepare_with_hf_tokenizer_and_replace(tmp_path):
    tok_path = save_word_level_tokenizer(tmp_path / "tokenizer.json", ["</s>"])
    source = tmp_path / "docs.jsonl"
    docs = ["hello world", "memory layers remember facts", "hello memory"] * 3
    source.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    index = prepare([source], out, tokenizer=str(tok_path), seq_len=3, text_key="body")
    tok = HFTokenizer(tok_path)
    stream = [i for d in docs for i in [*tok.encode(d), tok.eos_id]]
    assert np.concatenate(_read_shards(out)).tolist() == stream[: index["n_tokens"]]
    assert index["tokenizer"] == str(tok_path.resolve())
    assert not (out / "stale.txt").exists()


def test_prepare_errors_name_the_file(tmp_path):
    bad_ext = tmp_path / "docs.csv"
    bad_ext.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="docs.csv"):
        prepare([bad_ext], tmp_path / "out")
    no_key = tmp_path / "nokey.jsonl"
    no_key.write_text(json.dumps({"text": "a" * 50}) + "\n" + json.dumps({"body": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"nokey.jsonl:2.*'text'"):
        prepare([no_key], tmp_path / "out", seq_len=4)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        prepare([empty], tmp_path / "out")
    import pyarrow as pa
    import pyarrow.parquet as pq

    no_column = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), no_column)
    with pytest.raises(ValueError, match="nocol.parquet"):
        prepare([no_column], tmp_path / "out")
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError, match="missing.jsonl"):
        prepare([missing], tmp_path / "out")
    # nothing half-written survives a failed run
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------- loader

SEQ = 7  # samples of 8 tokens


def _random_docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    return ["".join(rng.choice(letters, size=int(rng.integers(5, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """~100 distinct samples in shards of 16 (the last one partial)."""
    root = tmp_path_factory.mktemp("shards")
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _random_docs(40, 0)))
    index = prepare([source], root / "data", seq_len=SEQ, samples_per_shard=16)
    assert len(index["shards"]) > 3 and index["n_samples"] % 16
    return root / "data", index


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_shard")
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _random_docs(12, 1)))
    index = prepare([source], root / "data", seq_len=SEQ, samples_per_shard=1000)
    assert len(index["shards"]) == 1
    return root / "data", index


def _rows(batches) -> list[tuple[int, ...]]:
    return [tuple(row) for batch in batches for row in batch.tolist()]


def _take(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_one_epoch_covers_every_sample_once(shards):
    path, index = shards
    all_samples = _rows([torch.from_numpy(np.stack(_read_shards(path)).astype(np.int64))])
    assert len(set(all_samples)) == index["n_samples"]  # samples are distinguishable
    loader = ShardLoader(path, micro_batch_size=4, seq_len=SEQ, seed=5)
    bpe = loader.batches_per_epoch
    assert bpe == index["n_samples"] // 4
    batches = _take(loader, 2 * bpe)
    assert all(b.dtype == torch.long and b.shape == (4, SEQ + 1) for b in batches)
    epoch0, epoch1 = _rows(batches[:bpe]), _rows(batches[bpe:])
    assert len(set(epoch0)) == len(epoch0) == bpe * 4 and set(epoch0) <= set(all_samples)
    assert epoch0 != epoch1 and len(set(epoch1)) == len(epoch1)  # reshuffled every epoch
    assert epoch0 != all_samples[: len(epoch0)]  # shuffled at all
    unshuffled = ShardLoader(path, micro_batch_size=4, seq_len=SEQ, shuffle=False)
    assert _rows(_take(unshuffled, bpe)) == all_samples[: bpe * 4]


@pytest.mark.parametrize("dataset", ["shards", "one_shard"])
def test_loader_dp_and_worker_split_disjoint_and_covering(dataset, request):
    path, index = request.getfixturevalue(dataset)
    n = index["n_samples"]
    batch, dp_size = 2, 2
    seen: list[tuple[int, ...]] = []
    for rank in range(dp_size):
        single = ShardLoader(path, batch, SEQ, dp_rank=rank, dp_size=dp_size, seed=1)
        workers = ShardLoader(path, batch, SEQ, dp_rank=rank, dp_size=dp_size, seed=1,
                              num_workers=2)
        bpe = single.batches_per_epoch
        assert bpe == n // (dp_size * batch)
        # through a torch DataLoader with two workers: the same batches in the same order
        epoch = _take(workers, bpe)
        assert torch.equal(torch.stack(epoch), torch.stack(_take(single, bpe)))
        seen += _rows(epoch)
    assert len(seen) == len(set(seen))  # disjoint across ranks and workers
    assert n - len(seen) < dp_size * batch  # covering, up to the dropped remainder


def test_dp_batches_together_are_the_single_process_batch(shards):
    path, _ = shards
    ranks = [_take(ShardLoader(path, 2, SEQ, dp_rank=r, dp_size=3, seed=4), 5) for r in range(3)]
    single = _take(ShardLoader(path, 6, SEQ, seed=4), 5)
    for t in range(5):
        assert torch.equal(torch.cat([ranks[r][t] for r in range(3)]), single[t])


def test_eval_batches_deterministic_and_split(shards):
    path, index = shards
    first = list(eval_batches(path, 4, SEQ, n_batches=3))
    assert len(first) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, eval_batches(path, 4, SEQ, 3)))
    assert _rows(first) == _rows([torch.from_numpy(np.stack(_read_shards(path)[:12]))])
    r0 = _rows(eval_batches(path, 4, SEQ, 100, dp_rank=0, dp_size=2))
    r1 = _rows(eval_batches(path, 4, SEQ, 100, dp_rank=1, dp_size=2))
    assert len(r0) == len(r1) == index["n_samples"] // 8 * 4
    assert not set(r0) & set(r1)


@pytest.mark.parametrize(("workers_before", "workers_after"), [(0, 0), (2, 2), (2, 0)])
def test_loader_exact_resume(shards, workers_before, workers_after):
    path, _ = shards
    args = {"micro_batch_size": 3, "seq_len": SEQ, "dp_rank": 1, "dp_size": 2, "seed": 7}
    reference = ShardLoader(path, **args)
    bpe = reference.batches_per_epoch
    consumed, more = bpe - 2, 5  # resume shortly before an epoch boundary and cross it
    expected = _take(reference, consumed + more)

    before = ShardLoader(path, num_workers=workers_before, **args)
    it = iter(before)
    got = [next(it) for _ in range(consumed)]  # workers have prefetched beyond this
    state = json.loads(json.dumps(before.state_dict()))
    assert state["samples_consumed"] == consumed * 6 and state["epoch"] == 0
    del it

    after = ShardLoader(path, num_workers=workers_after, **args)
    after.load_state_dict(state)
    got += _take(after, more)
    assert after.state_dict()["epoch"] == 1
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_loader_state_mismatch_is_refused(shards):
    path, _ = shards
    state = ShardLoader(path, 2, SEQ, dp_size=2).state_dict()
    with pytest.raises(DataError, match="global_batch_size"):
        ShardLoader(path, 2, SEQ, dp_size=1).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        ShardLoader(path, 2, SEQ, dp_size=2, seed=9).load_state_dict(state)


def test_loader_state_moves_between_dp_layouts(shards):
    """Saved at dp=2 x 2, resumed as one process x 4: the same global batches continue."""
    path, _ = shards
    ranks = [ShardLoader(path, 2, SEQ, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for loader in ranks:
        _take(loader, 3)
    single = ShardLoader(path, 4, SEQ, seed=5)
    single.load_state_dict(ranks[0].state_dict())
    reference = _take(ShardLoader(path, 4, SEQ, seed=5), 6)[3:]
    assert all(torch.equal(a, b) for a, b in zip(_take(single, 3), reference, strict=True))


@pytest.fixture
def shard_copy(shards, tmp_path):
    path, _ = shards
    copy = tmp_path / "data"
    shutil.copytree(path, copy)
    return copy


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shard_raises_naming_it(shard_copy, num_workers):
    target = shard_copy / "shard-00001.tar"
    data = bytearray(target.read_bytes())
    data[700:704] = bytes(b ^ 0xFF for b in data[700:704])  # same size, different bytes
    target.write_bytes(bytes(data))
    loader = ShardLoader(shard_copy, 4, SEQ, shuffle=False, num_workers=num_workers)
    with pytest.raises(DataError, match=r"shard-00001\.tar.*sha256"):
        _take(loader, loader.batches_per_epoch)


def test_truncated_or_missing_shard_raises_naming_it(shard_copy):
    target = shard_copy / "shard-00002.tar"
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"shard-00002\.tar.*truncated"):
        ShardLoader(shard_copy, 4, SEQ)
    target.unlink()
    with pytest.raises(DataError, match=r"shard-00002\.tar.*missing"):
        ShardLoader(shard_copy, 4, SEQ)


def test_index_problems_raise_data_error(shards, tmp_path):
    path, _ = shards
    with pytest.raises(DataError, match=r"index\.json.*seq_len"):
        ShardLoader(path, 4, SEQ + 1)
    with pytest.raises(DataError, match="index.json"):
        ShardLoader(tmp_path, 4, SEQ)
    with pytest.raises(DataError, match="one global batch"):
        ShardLoader(path, 1000, SEQ)
