"""The shared text embedder: hashed n-gram TF-IDF (default) and a local sentence model."""

import numpy as np
import pytest

from memtron.data.embed import (
    HashedNgramEmbedder,
    load_embedder,
    make_embedder,
    ngram_hashes,
    save_embedder,
)

DOCS = ["the river nile flows north through egypt",
        "the nile river flows through egypt to the sea",
        "quantum chromodynamics describes quarks and gluons",
        "gluons bind quarks in quantum chromodynamics"]


def _reference_hash(gram: bytes) -> int:
    m = (1 << 64) - 1
    h = len(gram)
    for b in gram:
        h = (h * 0x100000001B3 + b) & m
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & m
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & m
    return h ^ (h >> 31)


def test_ngram_hashes_match_a_python_reference():
    text = "AbcDé"
    data = text.lower().encode("utf-8")
    want = [_reference_hash(data[i:i + n]) for n in (2, 3) for i in range(len(data) - n + 1)]
    assert ngram_hashes(text, (2, 3)).tolist() == want
    assert ngram_hashes("xabx", (2, 2))[0] != ngram_hashes("xabx", (2, 2))[1]
    assert ngram_hashes("abab", (2, 2))[0] == ngram_hashes("abab", (2, 2))[2]
    assert len(ngram_hashes("a", (2, 3))) == 0


def test_similar_documents_are_nearer_and_rows_are_unit():
    emb = HashedNgramEmbedder(dim=128).fit(DOCS)
    x = emb.embed(DOCS)
    assert x.shape == (4, 128) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[2, 3] > sim[1, 3] + 0.2
    assert not emb.embed([""]).any()


def test_idf_downweights_ngrams_present_everywhere():
    docs = [f"common words {w}" for w in ("alpha", "bravo", "charlie", "delta")]
    fitted = HashedNgramEmbedder(dim=64).fit(docs).embed(docs)
    plain = HashedNgramEmbedder(dim=64).embed(docs)
    off = ~np.eye(4, dtype=bool)
    assert (fitted @ fitted.T)[off].mean() < (plain @ plain.T)[off].mean()


def test_same_seed_same_function_and_save_load_round_trip(tmp_path):
    a = HashedNgramEmbedder(dim=32, n_buckets=4096).fit(DOCS)
    b = HashedNgramEmbedder(dim=32, n_buckets=4096).fit(DOCS)
    np.testing.assert_array_equal(a.embed(DOCS), b.embed(DOCS))
    save_embedder(a, tmp_path / "emb")
    c = load_embedder(tmp_path / "emb")
    np.testing.assert_array_equal(a.embed(DOCS), c.embed(DOCS))
    assert c.n_docs == 4


def test_corrupt_embedder_files_are_named(tmp_path):
    save_embedder(HashedNgramEmbedder(dim=8, n_buckets=64), tmp_path / "emb")
    np.save(tmp_path / "emb.npy", np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="emb.npy"):
        load_embedder(tmp_path / "emb")
    (tmp_path / "emb.json").write_text("{not json")
    with pytest.raises(ValueError, match="emb.json"):
        load_embedder(tmp_path / "emb")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_embedder(str(tmp_path / "nowhere"))


def test_sentence_model_is_the_mean_pooled_encoder(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(" ".join(DOCS).split()))
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    emb = make_embedder(str(tmp_path / "m"))
    got = emb.embed(DOCS[:3])
    with torch.no_grad():
        for i, doc in enumerate(DOCS[:3]):
            h = model(**tok(doc, return_tensors="pt")).last_hidden_state[0].mean(0)
            np.testing.assert_allclose(got[i], (h / h.norm()).numpy(), atol=1e-5)
    save_embedder(emb, tmp_path / "e")
    np.testing.assert_allclose(load_embedder(tmp_path / "e").embed(DOCS[:1]), got[:1], atol=1e-6)
