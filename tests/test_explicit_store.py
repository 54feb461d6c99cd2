"""Explicit memories (Memory^3): top-m selection, the on-disk store, the retriever."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from memtron.cli import main
from memtron.config import load_config
from memtron.data.quantize import train_pq
from memtron.data.retrieve import Retriever, faiss_available
from memtron.data.tokenizer import ByteTokenizer
from memtron.export.explicit import (
    build_explicit_store,
    chunk_bounds,
    read_references,
    size_per_reference,
)
from memtron.infer.model import load_model
from memtron.model.memory.explicit import encode_references, select_top_tokens
from memtron.model.transformer import build_model
from memtron.storage.explicit import (
    ExplicitStore,
    ExplicitStoreError,
    Int8Codec,
    Layout,
    PQCodec,
)
from memtron.storage.rowblock import BANK_MANIFEST
from memtron.train.checkpoint import save_checkpoint
from tests.tolerance import order_atol

M, REF_LEN, LAYERS = 4, 24, [0, 1]
MODEL = {"model.d_model": 32, "model.n_layers": 3, "model.n_heads": 4, "model.n_kv_heads": 2,
         "model.d_ff": 64, "model.max_seq_len": 64, "data.seq_len": 64}


def _config(**changes):
    return load_config(None, [f"{k}={v}" for k, v in {**MODEL, **changes}.items()])
WORDS = ("amber basalt cobalt delta ember fjord garnet harbor indigo jasper kelp lumen marble "
         "nickel onyx pewter quartz russet sienna topaz umber violet walnut xenon yarrow zinc")


def _brute_force_received(q: torch.Tensor, k: torch.Tensor, valid: list[int]) -> torch.Tensor:
    """Attention each key receives, by explicit loops: [B, KV, L]."""
    b_size, n_heads, length, dim = q.shape
    n_kv = k.shape[1]
    out = torch.zeros(b_size, n_kv, length, dtype=torch.float64)
    for b in range(b_size):
        n = valid[b]
        for h in range(n_heads):
            g = h // (n_heads // n_kv)
            for i in range(n):
                logits = [float(q[b, h, i] @ k[b, g, j]) / math.sqrt(dim) for j in range(n)]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                for j in range(n):
                    out[b, g, j] += weights[j] / total
    return out


def _top_sets(received: torch.Tensor, valid: list[int], m: int) -> list[list[set[int]]]:
    return [[set(sorted(range(valid[b]), key=lambda j: -float(received[b, g, j]))[:m])
             for g in range(received.shape[1])] for b in range(received.shape[0])]


def test_top_tokens_equal_brute_force_attention_received():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 12, 8, generator=gen) * 2
    k = torch.randn(3, 2, 12, 8, generator=gen) * 2
    lengths = [12, 9, 5]
    valid = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    received = _brute_force_received(q, k, lengths)
    for mask, lens in [(None, [12, 12, 12]), (valid, lengths)]:
        expected = _brute_force_received(q, k, lens) if mask is None else received
        picked = select_top_tokens(q, k, 4, mask)
        assert picked.shape == (3, 2, 4) and picked.dtype == torch.int64
        assert (picked.diff(dim=-1) > 0).all()  # ascending, no repeats
        got = [[set(picked[b, g].tolist()) for g in range(2)] for b in range(3)]
        assert got == _top_sets(expected, lens, 4)
    # fewer real tokens than m: every real token, the best ones repeated to fill the slots
    short = select_top_tokens(q, k, 7, valid)[2]
    for g in range(2):
        assert set(short[g].tolist()) == set(range(5))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("explicit-ckpt")
    cfg = _config()
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # sharper attention than at init, so the top tokens are distinct
        for block in model.blocks:
            block.attn.wq.weight.mul_(8)
            block.attn.wk.weight.mul_(8)
    return save_checkpoint(root / "run" / "checkpoints", 1, {"model": model.state_dict()},
                           {"config": cfg.to_dict(), "data_state": None}, keep_last=1)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    words = WORDS.split()
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("refs") / "refs.jsonl"
    with open(path, "w") as f:
        for i in range(14):
            n = int(rng.integers(3, 12))
            text = " ".join(f"{words[int(j)]}{i}" for j in rng.integers(0, len(words), n))
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def stores(checkpoint, references, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    out = {"bf16": root / "bf16"}
    run_dir = checkpoint.parent.parent  # a run directory: its latest checkpoint
    assert main(["memory", "build-explicit", "--ckpt", str(run_dir), "--references",
                 str(references), "--out", str(out["bf16"]), "--m", str(M), "--ref-len",
                 str(REF_LEN), "--layers", ",".join(map(str, LAYERS)), "--batch-size", "5",
                 "--device", "cpu", "--quiet"]) == 0
    for dtype in ("int8", "pq"):
        out[dtype] = root / dtype
        build_explicit_store(checkpoint, references, out[dtype], m=M, ref_len=REF_LEN,
                             layers=LAYERS, dtype=dtype, batch_size=5, block_bytes=2048,
                             progress=False)
    return out


def test_chunks_are_balanced_and_cover_the_document(references):
    assert chunk_bounds(130, 128) == [(0, 65), (65, 130)]
    assert chunk_bounds(5, 128) == [(0, 5)]
    tok = ByteTokenizer()
    chunks, docs = read_references(references, tok, REF_LEN)
    texts = [json.loads(line)["text"] for line in references.read_text().splitlines()]
    for doc in docs:
        mine = chunks[doc["first"]:doc["first"] + doc["n_chunks"]]
        assert all(len(c.tokens) <= REF_LEN for c in mine)
        assert "".join(c.text for c in mine) == texts[doc["doc"]]
        for c in mine:
            assert texts[doc["doc"]][c.char_start:c.char_end] == c.text
    assert docs[3]["id"] == "doc-3"


def test_encoded_memories_are_the_post_rope_kv_of_the_kept_tokens(checkpoint, references):
    model = load_model(checkpoint).model
    chunks, _ = read_references(references, ByteTokenizer(), REF_LEN)
    token_lists = [c.tokens for c in chunks[:6]]
    k, v, pos = encode_references(model, [token_lists[:3], token_lists[3:]], LAYERS, M)
    assert k.shape == (6, 2, 2, M, 8) and pos.shape == (6, 2, 2, M)
    for r, tokens in enumerate(token_lists):  # one at a time: no padding, plain forward
        x = model.embed(torch.as_tensor(tokens, dtype=torch.long)[None])
        rope = model.rope(torch.arange(len(tokens)))
        with torch.no_grad():
            for layer, block in enumerate(model.blocks[: max(LAYERS) + 1]):
                q_ref, k_ref, v_ref = block.attn.rotated_qkv(block.attn_norm(x), rope)
                if layer in LAYERS:
                    top = select_top_tokens(q_ref, k_ref, M)[0]
                    i = LAYERS.index(layer)
                    assert torch.equal(pos[r, i], top)
                    for g in range(2):
                        torch.testing.assert_close(k[r, i, g], k_ref[0, g, top[g]])
                        torch.testing.assert_close(v[r, i, g], v_ref[0, g, top[g]])
                x = block(x, rope, None, None)


def test_store_round_trip_bf16_exact_int8_pq_bounded(checkpoint, references, stores):
    model = load_model(checkpoint).model
    chunks, _ = read_references(references, ByteTokenizer(), REF_LEN)
    k, v, pos = encode_references(model, [[c.tokens] for c in chunks], LAYERS, M)
    ids = torch.arange(len(chunks))
    bf16 = ExplicitStore.open(stores["bf16"], verify=True)
    assert len(bf16) == len(chunks) and bf16.manifest["layers"] == LAYERS
    fk, fv = bf16.fetch(ids)
    assert fk.dtype == torch.float32 and fk.shape == k.shape
    assert torch.equal(fk, k.bfloat16().float()) and torch.equal(fv, v.bfloat16().float())
    assert torch.equal(bf16.positions(ids), pos.cpu())
    manifest = json.loads((stores["bf16"] / BANK_MANIFEST).read_text())
    size = size_per_reference(manifest, text_bytes=10.0, tokens=20.0)
    row = 2 * len(LAYERS) * 2 * M * 8 * 2  # K and V, layers, kv heads, m, head_dim, bf16
    assert row <= size["memory_bytes"] < row + 200  # + each block file's header, amortised
    assert size["dense_kv_bytes"] == 20 * len(LAYERS) * 2 * 2 * 8 * 2
    assert size["dense_kv_bytes_ref_len"] == REF_LEN / 20 * size["dense_kv_bytes"]
    # int8: every element within half a quantisation step of its vector's scale
    ik, iv = ExplicitStore.open(stores["int8"]).fetch(ids)
    for got, ref in ((ik, k), (iv, v)):
        step = ref.abs().amax(-1, keepdim=True) / 127
        assert ((got - ref).abs() <= step * 0.5 * (1 + 2**-10) + 1e-7).all()
    # pq: each sub-vector is the nearest centroid of its codebook (checked by brute force)
    pq = ExplicitStore.open(stores["pq"])
    pk, pv = pq.fetch(ids)
    books = pq.codec.codebooks  # [G, S, C, d]
    for got, ref, kind in ((pk, k, 0), (pv, v, 1)):
        for layer in range(2):
            for head in range(2):
                g = (kind * 2 + layer) * 2 + head
                sub_ref = ref[:, layer, head].reshape(-1, 2, 4)  # [n*m, S, d]
                sub_got = got[:, layer, head].reshape(-1, 2, 4)
                for s in range(2):
                    exact = "donot_use_mm_for_euclid_dist"
                    best = torch.cdist(sub_ref[:, s], books[g, s], compute_mode=exact)
                    best = best.min(-1).values
                    err = (sub_got[:, s] - sub_ref[:, s]).norm(dim=-1)
                    torch.testing.assert_close(err, best, atol=1e-5, rtol=1e-4)
    # the same memory ids, in any order and repeated, with the LRU cache on
    cached = ExplicitStore.open(stores["bf16"], cache_rows=5)
    pick = torch.tensor([3, 1, 3, 7, 1, 12])
    for _ in range(2):
        ck, cv = cached.fetch(pick)
        assert torch.equal(ck, fk[pick]) and torch.equal(cv, fv[pick])
    assert cached.stats["cache_hits"] > 0
    # threads sharing one store (a prefetcher and the main loop) get the right memories
    from concurrent.futures import ThreadPoolExecutor

    def fetch_many(seed: int) -> bool:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(20):
            pick = torch.randint(0, len(chunks), (7,), generator=gen)
            got_k, got_v = cached.fetch(pick)
            if not (torch.equal(got_k, fk[pick]) and torch.equal(got_v, fv[pick])):
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(fetch_many, range(4)))


def test_pq_and_int8_errors_on_gaussian_vectors():
    """The stated errors: int8 <= half a step per element; PQ (256 centroids, sub_dim 4: 2 bits
    per dimension) within 0.30 relative L2 error on i.i.d. unit Gaussian vectors, the hardest
    case (Shannon's bound at 2 bits/dim is 2^-2 = 0.25; real K/V are correlated and compress
    better), and exact when a sub-space has no more distinct sub-vectors than centroids."""
    layout = Layout(n_layers=1, n_kv_heads=1, m=8, head_dim=16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, layout.n_vectors, 16, generator=gen)
    codec = Int8Codec(layout)
    err = (codec.decode(codec.encode(x)) - x).abs()
    assert (err <= x.abs().amax(-1, keepdim=True) / 254 * (1 + 2**-10)).all()
    pq = PQCodec(layout, sub_dim=4)
    train_pq(pq, x)
    rel = (pq.decode(pq.encode(x)) - x).norm() / x.norm()
    assert 0.25 < rel < 0.30, rel
    small = x[:10]  # 10 memories x 8 tokens = 80 sub-vectors per (group, sub-space) < 256
    train_pq(pq, small)
    torch.testing.assert_close(pq.decode(pq.encode(small)), small)


def test_retrieving_a_references_own_text_returns_its_memory(stores, references, monkeypatch):
    chunks, _ = read_references(references, ByteTokenizer(), REF_LEN)
    retriever = Retriever.load(stores["bf16"])
    ids = retriever.retrieve([c.text for c in chunks], r=3)
    assert ids.shape == (len(chunks), 3) and ids.dtype == torch.int64
    assert torch.equal(ids[:, 0], torch.arange(len(chunks)))
    exact = Retriever.load(stores["bf16"], use_faiss=False)
    monkeypatch.setattr(Retriever, "SCORE_BLOCK", 50)  # one query per block
    assert torch.equal(exact.retrieve([c.text for c in chunks], r=3), ids)
    by_tokens = retriever.retrieve([c.tokens for c in chunks], r=1)  # decoded by the tokenizer
    assert torch.equal(by_tokens[:, 0], torch.arange(len(chunks)))
    spans = ExplicitStore.open(stores["bf16"]).spans(torch.arange(len(chunks)))
    assert spans[:, 0].tolist() == [c.doc for c in chunks]


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
def test_faiss_and_numpy_indexes_return_the_same_ids(stores):
    exact = Retriever.load(stores["bf16"], use_faiss=False)
    fast = Retriever.load(stores["bf16"], use_faiss=True)
    queries = ["amber basalt", "zinc walnut topaz", "harbor3 indigo", "kelp", "quartz7 onyx7"]
    assert torch.equal(exact.retrieve(queries, 4), fast.retrieve(queries, 4))
    # duplicated memories tie exactly: both indexes rank them by id, through the cut at r
    rows = np.repeat(exact.embeddings[:6], [1, 3, 1, 2, 1, 1], axis=0)
    queries = exact.embeddings[[1, 3]]
    ids = {flag: Retriever(exact.embedder, rows, use_faiss=flag).search(queries, 2)[1].tolist()
           for flag in (False, True)}
    assert ids[False] == ids[True] == [[1, 2], [5, 6]]


def test_store_refuses_corruption_and_other_models(stores, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(stores["bf16"], store)
    manifest = json.loads((store / BANK_MANIFEST).read_text())
    block = store / manifest["tables"]["memories"]["blocks"][0]["file"]
    data = bytearray(block.read_bytes())
    data[-3] ^= 0xFF
    block.write_bytes(bytes(data))
    ExplicitStore.open(store)  # sizes and headers still fit ...
    with pytest.raises(ExplicitStoreError, match=block.name + ".*checksum"):
        ExplicitStore.open(store, verify=True)  # ... the checksum does not
    block.write_bytes(bytes(data[:-5]))
    with pytest.raises(ExplicitStoreError, match=block.name):
        ExplicitStore.open(store)
    # a manifest whose description disagrees with its tables
    shutil.rmtree(store)
    shutil.copytree(stores["bf16"], store)
    manifest["source"]["explicit"]["m"] = 5
    (store / BANK_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExplicitStoreError, match=BANK_MANIFEST):
        ExplicitStore.open(store)
    # retriever files; the reference list
    embeddings = store / "retriever" / "embeddings.npy"
    raw = bytearray(embeddings.read_bytes())
    raw[-4] ^= 0x55
    embeddings.write_bytes(bytes(raw))
    with pytest.raises(ExplicitStoreError, match="embeddings.npy"):
        Retriever.load(store)
    shutil.rmtree(store)
    shutil.copytree(stores["bf16"], store)
    refs = store / "references.jsonl"
    refs.write_text(refs.read_text().replace("doc-1", "doc-X"))
    with pytest.raises(ExplicitStoreError, match="references.jsonl"):
        ExplicitStore.open(store, verify=True)
    # a retriever of another store
    shutil.rmtree(store / "retriever")
    shutil.copytree(stores["int8"].parent / "pq" / "retriever", store / "retriever")
    Retriever.load(store)  # same references: fits
    manifest = json.loads((store / BANK_MANIFEST).read_text())
    manifest["source"]["explicit"]["n_memories"] += 1
    (store / BANK_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExplicitStoreError, match="retriever.json.*mismatched"):
        Retriever.load(store)
    alone = tmp_path / "copy"  # a copy of retriever/ alone, for a store read from a server
    shutil.copytree(store / "retriever", alone / "retriever")
    ids = Retriever.load(alone).retrieve([[ord(c) for c in "amber0 basalt0"]], 2)
    assert ids.shape == (1, 2)
    # a different model
    good = ExplicitStore.open(stores["bf16"])
    same = _config()
    good.check_model(same.model)
    good.check_model(same)
    for key, value in [("n_kv_heads", 4), ("n_layers", 1), ("d_ff", 96)]:
        other = _config(**{f"model.{key}": value})
        named = key
        with pytest.raises(ExplicitStoreError, match=f"{stores['bf16']}.*{named}"):
            good.check_model(other.model)


def test_workers_and_server_give_the_same_memories(checkpoint, references, stores, tmp_path):
    from memtron.infer.server import running_server

    out = tmp_path / "two-workers"
    build_explicit_store(checkpoint, references, out, m=M, ref_len=REF_LEN, layers=LAYERS,
                         batch_size=4, workers=2, block_bytes=2048, progress=False)
    one, two = ExplicitStore.open(stores["bf16"]), ExplicitStore.open(out, verify=True)
    ids = torch.arange(len(one))
    # Each worker encodes its references in other batches with other thread counts, so the
    # fp32 K/V may differ by rounding (another GEMM blocking) and a stored bf16 value may then
    # round one ulp the other way: equal within one bf16 ulp, or fp32 reordering near zero.
    single, split = torch.cat(one.fetch(ids)), torch.cat(two.fetch(ids))
    torch.testing.assert_close(split, single, rtol=torch.finfo(torch.bfloat16).eps,
                               atol=order_atol(single.float(), torch.float32))
    assert torch.equal(one.positions(ids), two.positions(ids))
    with running_server(stores["pq"]) as url:
        remote = ExplicitStore.open(url)
        local = ExplicitStore.open(stores["pq"])
        assert remote.manifest == local.manifest
        assert torch.equal(torch.cat(remote.fetch(ids)), torch.cat(local.fetch(ids)))


def test_data_retrieve_adds_the_memory_ids_of_every_chunk(stores, references, tmp_path):
    from memtron.data.loader import ShardLoader
    from memtron.data.prepare import prepare
    from memtron.data.shards import field_specs, load_shard, read_index

    shards = tmp_path / "shards"
    prepare([references], shards, seq_len=40, samples_per_shard=3)
    assert main(["data", "retrieve", "--shards", str(shards), "--store", str(stores["bf16"]),
                 "--r", "2", "--chunk", "16", "--index", "numpy", "--quiet"]) == 0
    index, files = read_index(shards)
    specs = field_specs(index)
    assert specs["memory_ids"].shape == (3, 2) and specs["memory_ids"].dtype == np.int64
    retriever = Retriever.load(stores["bf16"], use_faiss=False)
    tok = ByteTokenizer()
    n = 0
    for shard in files:
        tokens, fields = load_shard(shard, 41, np.dtype(index["dtype"]), specs)
        for sample, ids in zip(tokens, fields["memory_ids"]):
            for j, (a, b) in enumerate([(0, 16), (16, 32), (32, 40)]):  # inputs only
                text = tok.decode(sample[a:b].tolist())
                assert ids[j].tolist() == retriever.retrieve([text], 2)[0].tolist()
            n += 1
    assert n == index["n_samples"] > 3
    batch = next(iter(ShardLoader(shards, micro_batch_size=2, seq_len=40, shuffle=False)))
    assert batch.fields["memory_ids"].shape == (2, 3, 2)
    assert batch.fields["memory_ids"].dtype == torch.int64
