"""Data pipeline: tokenizers, synthetic corpus, shard preparation and the resumable loader."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from memtron.cli import main
from memtron.data.loader import Batch, DataError, ShardLoader, eval_batches
from memtron.data.prepare import iter_documents, prepare
from memtron.data.shards import add_sample_field
from memtron.data.synthetic import generate_corpus, load_questions
from memtron.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe
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


def test_train_bpe_round_trips_and_merges_names(corpus, tmp_path):
    out, _ = corpus
    texts = list(iter_documents(out / "raw" / "train.jsonl", "text"))
    tok = train_bpe(texts, 4096, tmp_path / "bpe")
    assert load_tokenizer(str(tmp_path / "bpe")).spec == tok.spec
    assert tok.vocab_size <= 4096 and tok.eos_id == 0  # </s>, the first special token
    text = "Grüße, 東京 🎉 unseen Zyxwvut"  # byte-level: any text, seen or not, round-trips
    assert tok.decode(tok.encode(text)) == text
    # Frequent names become single tokens: the first name of the corpus's head entities.
    first = (out / "questions.jsonl").read_text().splitlines()[0]
    name = " " + json.loads(first)["entity"].split()[0]
    assert len(tok.encode(name)) == 1 < len(ByteTokenizer().encode(name))
    mean_bytes = sum(len(t.encode()) for t in texts[:200]) / sum(len(tok.encode(t))
                                                                  for t in texts[:200])
    assert mean_bytes > 3.0
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_bpe(texts, 100, tmp_path / "small")


def test_tokenizer_cli_trains_and_names_bad_vocab(corpus, tmp_path, capsys):
    out, _ = corpus
    assert main(["data", "tokenizer", str(out / "raw" / "valid.jsonl"), "--out",
                 str(tmp_path / "tok"), "--vocab-size", "512"]) == 0
    assert "model.vocab_size=" in capsys.readouterr().out
    assert load_tokenizer(str(tmp_path / "tok")).vocab_size <= 512
    assert main(["data", "tokenizer", str(out / "raw" / "valid.jsonl"), "--out",
                 str(tmp_path / "bad"), "--vocab-size", "10"]) == 2
    assert "--vocab-size" in capsys.readouterr().err


# ----------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, generate_corpus(out)


def test_synth_default_is_sized_for_the_demo(corpus):
    out, summary = corpus
    for name in ("raw/train.jsonl", "raw/valid.jsonl", "questions.jsonl", "synth.json"):
        assert (out / name).is_file()
    assert json.loads((out / "synth.json").read_text()) == summary
    assert 0.5e6 < summary["counts"]["train_chars"] < 1.5e6
    assert 200 <= summary["counts"]["questions"] <= 600


def test_synth_deterministic_per_seed(corpus, tmp_path):
    out, _ = corpus
    small = {"n_entities": 50, "n_train_docs": 300, "n_valid_docs": 20, "questions_per_bucket": 5}
    generate_corpus(tmp_path / "a", seed=3, **small)
    generate_corpus(tmp_path / "b", seed=3, **small)
    generate_corpus(tmp_path / "c", seed=4, **small)
    for name in ("raw/train.jsonl", "raw/valid.jsonl", "questions.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_synth_zipf_long_tail(corpus):
    out, summary = corpus
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
    out, summary = corpus
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


def _take_batches(loader, n: int) -> list[Batch]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _take(loader, n: int) -> list[torch.Tensor]:
    return [b.tokens for b in _take_batches(loader, n)]


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
    first = [b.tokens for b in eval_batches(path, 4, SEQ, n_batches=3)]
    assert len(first) == 3
    again = [b.tokens for b in eval_batches(path, 4, SEQ, 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert _rows(first) == _rows([torch.from_numpy(np.stack(_read_shards(path)[:12]))])
    r0 = _rows(b.tokens for b in eval_batches(path, 4, SEQ, 100, dp_rank=0, dp_size=2))
    r1 = _rows(b.tokens for b in eval_batches(path, 4, SEQ, 100, dp_rank=1, dp_size=2))
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
    got = [next(it).tokens for _ in range(consumed)]  # workers have prefetched beyond this
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


# ----------------------------------------------------------------------------- sample fields


@pytest.fixture
def field_shards(shard_copy):
    """The shards with field ``sample_id`` int64 [2] = (i, -i) for sample i, and an extra file
    in the directory that rewriting must keep."""
    (shard_copy / "tree").mkdir()
    (shard_copy / "tree" / "note.txt").write_text("kept")
    n = json.loads((shard_copy / "index.json").read_text())["n_samples"]
    add_sample_field(shard_copy, "sample_id", (np.array([i, -i]) for i in range(n)))
    return shard_copy


def _check_ids(batch: Batch, samples: list[np.ndarray]) -> list[int]:
    """The batch's sample ids, after checking each row's tokens are that sample's."""
    ids = batch.fields["sample_id"]
    assert ids.dtype == torch.int64 and ids.shape == (batch.tokens.shape[0], 2)
    assert torch.equal(ids[:, 1], -ids[:, 0])
    for row, i in zip(batch.tokens, ids[:, 0].tolist(), strict=True):
        assert row.tolist() == samples[i].tolist()
    return ids[:, 0].tolist()


def test_sample_field_round_trip(field_shards):
    samples = [s for s in _read_shards(field_shards) if s.shape == (SEQ + 1,)]
    index = json.loads((field_shards / "index.json").read_text())
    assert index["version"] == 2
    assert index["fields"] == {"sample_id": {"shape": [2], "dtype": "int64"}}
    assert (field_shards / "tree" / "note.txt").read_text() == "kept"
    assert not list(field_shards.parent.glob(".*tmp*"))  # no temp dir left
    unshuffled = ShardLoader(field_shards, 4, SEQ, shuffle=False)
    assert unshuffled.fields == {"sample_id": (2,)}
    ids = [i for b in _take_batches(unshuffled, unshuffled.batches_per_epoch)
           for i in _check_ids(b, samples)]
    assert ids == list(range(len(ids)))
    assert [i for b in eval_batches(field_shards, 4, SEQ, 3) for i in _check_ids(b, samples)] \
        == list(range(12))
    # replace it through a per-shard function; a second field sits beside it
    add_sample_field(field_shards, "sample_id",
                     lambda tokens, first: np.stack([np.arange(first, first + len(tokens)),
                                                     -np.arange(first, first + len(tokens))]).T)
    add_sample_field(field_shards, "bank_path",
                     lambda tokens, first: tokens[:, :3].astype(np.int64))
    shuffled = ShardLoader(field_shards, 4, SEQ, seed=3)
    for batch in _take_batches(shuffled, shuffled.batches_per_epoch):
        _check_ids(batch, samples)
        assert torch.equal(batch.fields["bank_path"], batch.tokens[:, :3])
    moved = batch.to("cpu")
    assert torch.equal(moved.fields["bank_path"], batch.fields["bank_path"])


def test_sample_fields_follow_dp_split_workers_and_resume(field_shards):
    samples = [s for s in _read_shards(field_shards) if s.shape == (SEQ + 1,)]
    single = _take_batches(ShardLoader(field_shards, 4, SEQ, seed=2), 6)
    for t, reference in enumerate(single):
        ranks = [_take_batches(ShardLoader(field_shards, 2, SEQ, dp_rank=r, dp_size=2,
                                           seed=2, num_workers=2), t + 1)[t] for r in range(2)]
        ids = [_check_ids(b, samples) for b in ranks]
        assert ids[0] + ids[1] == _check_ids(reference, samples)
    before = ShardLoader(field_shards, 2, SEQ, dp_rank=1, dp_size=2, seed=2, num_workers=2)
    _take_batches(before, 4)
    after = ShardLoader(field_shards, 2, SEQ, dp_rank=1, dp_size=2, seed=2)
    after.load_state_dict(before.state_dict())
    assert _check_ids(_take_batches(after, 1)[0], samples) == _check_ids(single[4], samples)[2:]


def test_adding_a_field_keeps_a_run_resumable_but_other_tokens_are_refused(shard_copy,
                                                                           tmp_path):
    """`data retrieve` between two training stages adds a field: the tokens are the same data
    set, so the stage-1 loader state loads; shards with other tokens are refused."""
    args = dict(micro_batch_size=2, seq_len=SEQ)
    before = ShardLoader(shard_copy, **args)
    _take(before, 3)
    state = before.state_dict()
    n = json.loads((shard_copy / "index.json").read_text())["n_samples"]
    add_sample_field(shard_copy, "sample_id", (np.array([i, -i]) for i in range(n)))
    after = ShardLoader(shard_copy, **args)
    after.load_state_dict(state)
    assert after.state_dict() == state
    other = tmp_path / "other"
    raw = tmp_path / "other.txt"
    raw.write_text("a different corpus " * 4000)
    prepare([raw], other, seq_len=SEQ)
    with pytest.raises(DataError, match="dataset"):
        ShardLoader(other, **args).load_state_dict(state)


def test_version_1_index_without_fields_still_reads(shard_copy):
    index_path = shard_copy / "index.json"
    index = json.loads(index_path.read_text())
    del index["fields"]
    index_path.write_text(json.dumps({**index, "version": 1}))
    batch = _take_batches(ShardLoader(shard_copy, 4, SEQ), 1)[0]
    assert batch.fields == {} and batch.tokens.shape == (4, SEQ + 1)


def _rewrite_member(directory: Path, shard: str, member_name: str, payload: bytes | None):
    """Replace (or, with None, drop) one tar member and re-checksum the shard in the index, so
    that only the content check can catch it."""
    path = directory / shard
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == member_name:
                if payload is None:
                    continue
                data = payload
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    index = json.loads((directory / "index.json").read_text())
    for entry in index["shards"]:
        if entry["name"] == shard:
            data = path.read_bytes()
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (directory / "index.json").write_text(json.dumps(index))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(("payload", "match"), [
    (_npy(np.array([1, 2, 3])), r"shard-00001\.tar: field 'sample_id' of sample 0000000017 "
                                r"has shape \(3,\)"),
    (_npy(np.array([1.0, 2.0])), r"shard-00001\.tar: field 'sample_id'.*float64"),
    (None, r"shard-00001\.tar: sample 0000000017 lacks 'sample_id'"),
])
def test_mismatched_field_raises_naming_the_shard(field_shards, payload, match):
    _rewrite_member(field_shards, "shard-00001.tar", "0000000017.sample_id.npy", payload)
    loader = ShardLoader(field_shards, 4, SEQ, shuffle=False)
    with pytest.raises(DataError, match=match):
        _take_batches(loader, loader.batches_per_epoch)


def test_field_not_in_index_and_corrupt_field_shard_are_named(field_shards):
    index_path = field_shards / "index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "fields": {}}))
    with pytest.raises(DataError, match=r"shard-00000\.tar: unexpected member "
                                        r"'0000000000\.sample_id\.npy'"):
        _take_batches(ShardLoader(field_shards, 4, SEQ, shuffle=False), 1)
    index_path.write_text(json.dumps(index))
    target = field_shards / "shard-00002.tar"
    data = bytearray(target.read_bytes())
    data[-2000] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00002\.tar.*sha256"):
        add_sample_field(field_shards, "other", (np.zeros(1) for _ in range(1000)))


def test_add_sample_field_bad_values_are_refused(shard_copy):
    before = {p.name: p.read_bytes() for p in shard_copy.iterdir()}
    with pytest.raises(ValueError, match="ran out at sample 5"):
        add_sample_field(shard_copy, "f", (np.zeros(2) for _ in range(5)))
    with pytest.raises(ValueError, match=r"shard-00000\.tar: field 'f'.*shape \(3,\)"):
        add_sample_field(shard_copy, "f", (np.zeros(2 + (i == 3)) for i in range(1000)))
    with pytest.raises(ValueError, match="more values"):
        add_sample_field(shard_copy, "f", (np.zeros(2) for _ in range(1000)))
    with pytest.raises(ValueError, match="bad sample field name"):
        add_sample_field(shard_copy, "a.b", [])
    assert {p.name: p.read_bytes() for p in shard_copy.iterdir()} == before  # untouched
    assert not list(shard_copy.parent.glob(".*tmp*"))
