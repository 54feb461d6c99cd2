"""Explicit (Memory^3) memories in attention: the chunk-masked memory attention equals full
attention over the explicitly concatenated [memories; context] keys, forward and backward; ring
attention with memories (cp=2) equals one process; generation with memories equals the
training-time forward; two-stage training switches exactly at ``memory.explicit.start_step``."""

from __future__ import annotations

import math

import pytest
import torch

from memtron.infer.server import running_server
from memtron.model.attention import apply_rope, rope_tables, sdpa_attention
from memtron.model.forward import ExplicitKV, MemoryKV
from memtron.model.memory.explicit_kv import explicit_kv
from memtron.parallel.context import ring_attention, zigzag_indices
from memtron.parallel.launch import init_distributed, shutdown_distributed
from memtron.parallel.mesh import build_mesh, destroy_mesh
from tests.multiproc import run_ranks
from tests.tolerance import order_atol


def _inputs(b=2, h=4, kv=2, length=40, d=8, n_chunks=3, slots=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return (rand(b, h, length, d), rand(b, kv, length, d), rand(b, kv, length, d),
            rand(b, kv, n_chunks * slots, d), rand(b, kv, n_chunks * slots, d))


def _brute_force(q, k, v, mk, mv, query_chunk, slots, context_mask=None):
    """Query by query: keys = [the slots of its chunk; the context keys it may see], one
    softmax over them (the explicitly concatenated sequence), in float64."""
    b, h, n_q, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kvh = hi // group
            for i in range(n_q):
                c = int(query_chunk[bi, i] if query_chunk.dim() == 2 else query_chunk[i])
                seen = (context_mask[bi if context_mask.shape[0] > 1 else 0, 0, i]
                        if context_mask is not None else torch.arange(k.shape[2]) <= i)
                keys = torch.cat([mk[bi, kvh, c * slots:(c + 1) * slots], k[bi, kvh][seen]])
                values = torch.cat([mv[bi, kvh, c * slots:(c + 1) * slots], v[bi, kvh][seen]])
                p = torch.softmax(keys @ q[bi, hi, i] / math.sqrt(d), dim=0)
                out[bi, hi, i] = p @ values
    return out


@pytest.mark.parametrize("kv", [2, 4])
def test_memory_attention_equals_concatenated_full_attention(kv):
    chunk, slots, length = 16, 6, 40  # 3 chunks, the last one partial
    q, k, v, mk, mv = (t.requires_grad_(True) for t in _inputs(kv=kv, length=length,
                                                                 slots=slots))
    query_chunk = torch.arange(length) // chunk
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=q.dtype)
    ours = sdpa_attention(q, k, v, None, memory=MemoryKV(mk, mv, slots, query_chunk))
    ours.backward(grad)
    got = [t.grad.clone() for t in (q, k, v, mk, mv)]
    for t in (q, k, v, mk, mv):
        t.grad = None
    ref = _brute_force(q, k, v, mk, mv, query_chunk, slots)
    ref.backward(grad)
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-9)
    for name, g, t in zip(["q", "k", "v", "mk", "mv"], got, (q, k, v, mk, mv)):
        torch.testing.assert_close(g, t.grad, rtol=1e-7, atol=1e-9, msg=f"d{name}")
    # the memories matter, and only a query's own chunk's: perturbing chunk 2's memories
    # leaves chunks 0 and 1 alone
    with torch.no_grad():
        mk2 = mk.clone()
        mk2[:, :, 2 * slots:] += 1.0
        moved = sdpa_attention(q, k, v, None, memory=MemoryKV(mk2, mv, slots, query_chunk))
    assert torch.equal(moved[:, :, :2 * chunk], ours.detach()[:, :, :2 * chunk])
    assert (moved[:, :, 2 * chunk:] - ours.detach()[:, :, 2 * chunk:]).abs().max() > 1e-3


def test_memory_attention_with_cache_mask_and_row_positions():
    """Generation's case: queries after cached keys, per-row positions (left padding) and a
    padding mask; still the concatenated attention, query by query."""
    slots, chunk = 4, 8
    q, k, v, mk, mv = _inputs(length=20, n_chunks=3, slots=slots)
    q = q[:, :, -5:]  # 5 new queries at cache positions 15..19
    pads = torch.tensor([0, 3])
    columns = torch.arange(20)
    valid = columns[None, :] >= pads[:, None]
    positions = (columns[None, :] - pads[:, None]).clamp_min(0)[:, -5:]
    causal = columns[None, :] <= torch.arange(15, 20)[:, None]
    mask = (causal[None] & valid[:, None, :])[:, None]
    query_chunk = positions // chunk
    ours = sdpa_attention(q, k, v, mask, memory=MemoryKV(mk, mv, slots, query_chunk))
    torch.testing.assert_close(ours, _brute_force(q, k, v, mk, mv, query_chunk, slots, mask))


def test_memory_keys_share_one_interval_before_the_context():
    """Re-rotating a memory key (rotated at its reference position t) by -ref_len scores like
    the context rotated at p + ref_len: memories sit at [-ref_len, 0) for every query."""
    d, theta, ref_len = 16, 10000.0, 128
    g = torch.Generator().manual_seed(0)
    raw_q, raw_k = torch.randn(5, d, generator=g), torch.randn(3, d, generator=g)
    cos_t, sin_t = rope_tables(torch.tensor([0, 37, 127]), d, theta)
    k_mem = apply_rope(raw_k, cos_t, sin_t)  # post-RoPE at the reference's own positions
    memories = explicit_kv(k_mem.view(1, 1, 3, 1, 1, 1, d), k_mem.view(1, 1, 3, 1, 1, 1, d),
                           [0], chunk=64, ref_len=ref_len, theta=theta)
    assert isinstance(memories, ExplicitKV) and memories.keys.shape == (1, 1, 1, 1, 3, d)
    p = torch.tensor([0, 1, 63, 100, 250])
    cos_p, sin_p = rope_tables(p, d, theta)
    cos_s, sin_s = rope_tables(p + ref_len, d, theta)
    q_at_p = apply_rope(raw_q, cos_p, sin_p)
    q_after = apply_rope(raw_q, cos_s, sin_s)
    rerotated = memories.keys[0, 0, 0, 0]
    torch.testing.assert_close(q_at_p @ rerotated.T, q_after @ k_mem.T, rtol=1e-4, atol=1e-4)


def _ring_rank(rank: int, cp: int, length: int, chunk: int, slots: int) -> dict:
    init_distributed(timeout_s=60)
    try:
        from memtron.config import load_config

        cfg = load_config(None, [f"parallel.cp={cp}", f"data.seq_len={length}",
                                 "parallel.ep=1"])
        state = build_mesh(cfg)
        q, k, v, mk, mv = (t.float() for t in _inputs(length=length,
                                                      n_chunks=-(-length // chunk),
                                                      slots=slots))
        idx = zigzag_indices(length, cp, state.cp_rank)
        ql, kl, vl = (t[:, :, idx].clone().requires_grad_(True) for t in (q, k, v))
        # this rank holds the memories of its own positions' chunks only
        n_chunks = mk.shape[2] // slots
        held = (idx // chunk).unique()
        mk_held, mv_held = (t.unflatten(2, (n_chunks, slots))[None, :, :, held]
                            .clone().requires_grad_(True) for t in (mk, mv))
        memories = ExplicitKV(mk_held, mv_held, (0,), chunk, held)
        memories.check(idx)
        out = ring_attention(ql, kl, vl, state.cp_group, cp, state.cp_rank,
                             memories.layer(0, memories.query_chunks(idx)))
        grad = torch.randn(2, 4, length, 8, generator=torch.Generator().manual_seed(5))
        out.backward(grad[:, :, idx])
        full = [torch.zeros(2, 2, n_chunks, slots, 8) for _ in range(2)]
        for f, t in zip(full, (mk_held, mv_held)):
            f[:, :, held] = t.grad[0]
        return {"idx": idx, "out": out.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad,
                "dmk": full[0].flatten(2, 3), "dmv": full[1].flatten(2, 3),
                "held": held.tolist()}
    finally:
        destroy_mesh()
        shutdown_distributed()


@pytest.mark.parametrize("chunk", [8, 20])  # runs shorter than, and across, zigzag chunks
def test_ring_attention_with_memories_equals_one_process(chunk):
    cp, length, slots = 2, 48, 5
    q, k, v, mk, mv = (t.float().requires_grad_(True)
                       for t in _inputs(length=length, n_chunks=-(-length // chunk),
                                        slots=slots))
    ref = sdpa_attention(q, k, v, None, memory=MemoryKV(mk, mv, slots,
                                                        torch.arange(length) // chunk))
    ref.backward(torch.randn(2, 4, length, 8, generator=torch.Generator().manual_seed(5)))
    results = run_ranks(cp, _ring_rank, cp, length, chunk, slots)
    for r in results:
        idx = r["idx"]
        torch.testing.assert_close(r["out"], ref.detach()[:, :, idx], rtol=1e-5, atol=1e-5)
        for name, full in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            torch.testing.assert_close(r[name], full[:, :, idx], rtol=1e-5, atol=1e-5)
    assert sorted(set(results[0]["held"]) | set(results[1]["held"])) == list(
        range(-(-length // chunk)))
    for r in results:  # a rank holds only its own positions' chunks
        assert r["held"] == sorted(set((r["idx"] // chunk).tolist()))
        assert len(r["held"]) < -(-length // chunk) or chunk > length // 4
    # memory gradients stay on their rank: the ranks' parts add up to the whole
    for name, full in (("dmk", mk.grad), ("dmv", mv.grad)):
        torch.testing.assert_close(sum(r[name] for r in results), full, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- model level


CHUNK, R, M, REF_LEN, LAYERS = 8, 2, 3, 16, [0, 1]
MODEL = ["model.n_layers=3", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=64", "model.max_seq_len=48", "data.seq_len=48", "model.init_std=0.3",
         f"memory.explicit.chunk={CHUNK}", f"memory.explicit.r={R}",
         "memory.explicit.layers=[0,1]"]
WORDS = ["amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo",
         "jasper", "kelp", "lumen"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """A model with large random weights (its greedy continuations vary, and memories move
    them), its checkpoint, and an explicit-memory store built from it over a small reference
    corpus."""
    import json

    from memtron.config import load_config
    from memtron.export.explicit import build_explicit_store
    from memtron.model.transformer import build_model
    from memtron.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("explicit")
    cfg = load_config(None, MODEL)
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = save_checkpoint(root / "run" / "checkpoints", 1, {"model": model.state_dict()},
                           {"config": cfg.to_dict(), "data_state": None}, keep_last=1)
    refs = root / "refs.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(refs, "w") as f:
        for i in range(12):
            words = torch.randint(0, len(WORDS), (int(torch.randint(3, 9, (), generator=g)),),
                                  generator=g)
            f.write(json.dumps({"id": i, "text": " ".join(f"{WORDS[w]}{i}" for w in words)})
                    + "\n")
    store = root / "store"
    build_explicit_store(ckpt, refs, store, m=M, ref_len=REF_LEN, layers=LAYERS,
                         dtype="bf16", batch_size=8, progress=False)
    return {"cfg": cfg, "model": model.eval(), "ckpt": ckpt, "store": store, "refs": refs}


def _memories(built: dict, cache_rows: int = 0):
    from memtron.model.memory.explicit_kv import ExplicitMemories
    from memtron.storage.explicit import ExplicitStore

    store = ExplicitStore.open(built["store"], cache_rows=cache_rows)
    store.check_model(built["cfg"].model)
    x = built["cfg"].memory.explicit
    return ExplicitMemories(store, x.resolved_layers(3), x.chunk, built["cfg"].model.rope_theta)


def test_cached_forward_with_memories_equals_training_forward(built):
    from memtron.model.forward import ForwardContext

    model, memories = built["model"], _memories(built)
    n_memories = len(memories.store)
    tokens = torch.randint(0, 256, (3, 30), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, n_memories, (3, 4, R), generator=torch.Generator().manual_seed(2))
    explicit = memories.kv(ids)
    with torch.no_grad():
        full = model(tokens, ForwardContext(explicit=explicit))
        cache = model.new_cache(3, 48)
        steps = [model(tokens[:, :11], ForwardContext(cache=cache, explicit=explicit))]
        for t in range(11, 30):
            steps.append(model(tokens[:, t:t + 1], ForwardContext(cache=cache,
                                                                 explicit=explicit)))
        plain = model(tokens)
    # the cache computes attention over other key lengths (another operation order)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=order_atol(full), rtol=0)
    assert (plain - full).abs().max() > 1e-2  # the memories matter to these logits
    # a memory id picks its own K/V: another memory in chunk 2 changes chunk 2 onwards only
    other = ids.clone()
    other[:, 2] = (other[:, 2] + 1) % n_memories
    with torch.no_grad():
        moved = model(tokens, ForwardContext(explicit=memories.kv(other)))
    torch.testing.assert_close(moved[:, :2 * CHUNK], full[:, :2 * CHUNK], atol=1e-6, rtol=0)
    assert (moved[:, 2 * CHUNK:] - full[:, 2 * CHUNK:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"cover 4 chunks .* need chunk\(s\) \[4\]"):
        model(torch.zeros(1, 33, dtype=torch.long), ForwardContext(explicit=memories.kv(ids)))


def _chunk_ids(retrieve, prompt: list[int], seq: list[int]) -> torch.Tensor:
    """The training-time memory ids of every chunk of ``seq`` (prompt + generated): a chunk
    the prompt reaches is retrieved with its prompt text, a later one with the chunk before."""
    windows = []
    for j in range(-(-len(seq) // CHUNK)):
        if j * CHUNK < len(prompt):
            windows.append(prompt[j * CHUNK:(j + 1) * CHUNK])
        else:
            windows.append(seq[(j - 1) * CHUNK:j * CHUNK])
    return retrieve(windows)[None]


def test_generation_with_memories_equals_training_forward(built):
    from memtron.data.retrieve import Retriever
    from memtron.infer.explicit import ExplicitGeneration
    from memtron.infer.generate import SamplingConfig, generate
    from memtron.model.forward import ForwardContext

    model, memories = built["model"], _memories(built, cache_rows=4)
    retriever = Retriever.load(built["store"], use_faiss=False)

    def retrieve(windows: list[list[int]]) -> torch.Tensor:
        return retriever.retrieve(windows, R)

    prompts = [[256, *b"Bo"], [256, *b"The birthplace of"], [256, *b"Cy works as"]]
    n_new = 22  # rows cross chunk boundaries at different steps (left padding)
    result = generate(model, prompts, SamplingConfig(max_new_tokens=n_new, greedy=True,
                                                     stop_at_eos=False), 256,
                      explicit=ExplicitGeneration(memories, retrieve, R))
    stats = memories.stats()  # the LRU (4 memories) misses and hits during generation
    assert stats["memories_fetched"] > 0 and 0 < stats["cache_hit_rate"] < 1
    assert stats["bytes_fetched"] == stats["memories_fetched"] * memories.store.rows.dim * 2
    memories = _memories(built)
    for prompt, generated in zip(prompts, result.tokens):
        seq = list(prompt)
        with torch.no_grad():  # greedy by one full training-time forward per token
            for _ in range(n_new):
                ctx = ForwardContext(explicit=memories.kv(_chunk_ids(retrieve, prompt, seq)))
                seq.append(int(model(torch.tensor([seq]), ctx)[0, -1].argmax()))
        assert generated == seq[len(prompt):]
    without = generate(model, prompts, SamplingConfig(max_new_tokens=n_new, greedy=True,
                                                      stop_at_eos=False), 256)
    assert without.tokens != result.tokens  # the memories changed what was generated


# --------------------------------------------------------------------------- two-stage training


@pytest.fixture(scope="module")
def staged(tiny_corpus, tmp_path_factory) -> dict:
    """Stage 1 (no memory, 8 steps), a store built from its step-4 checkpoint over the
    validation documents, and training shards carrying each chunk's memory ids."""
    import shutil

    from memtron.cli import main
    from memtron.config import load_config
    from memtron.train.trainer import train
    from tests.conftest import tiny_overrides

    root = tmp_path_factory.mktemp("staged")
    shards = root / "train"
    shutil.copytree(tiny_corpus / "train", shards)
    base = tiny_overrides(tiny_corpus, root / "plain", **{
        "data.train": shards, "train.steps": 8, "checkpoint.every": 4, "checkpoint.keep_last": 2,
        "data.questions": "''"})
    plain = train(load_config(None, base))
    store = root / "store"
    assert main(["memory", "build-explicit", "--ckpt", str(root / "plain" / "checkpoints"
                                                             / "step-00000004"),
                 "--references", str(tiny_corpus / "raw" / "valid.jsonl"), "--out", str(store),
                 "--m", "2", "--ref-len", "16", "--batch-size", "16", "--device", "cpu",
                 "--quiet"]) == 0
    assert main(["data", "retrieve", "--shards", str(shards), "--store", str(store), "--r", "2",
                 "--chunk", "8", "--index", "numpy", "--quiet"]) == 0
    explicit = [f"memory.explicit.store={store}", "memory.explicit.r=2",
                "memory.explicit.chunk=8", "memory.explicit.start_step=4",
                "checkpoint.every=3", "checkpoint.keep_last=3"]
    overrides = _with(base, *explicit, f"train.run_dir={root / 'two'}")
    two = train(load_config(None, overrides))  # both stages: memories from step 4
    return {"root": root, "plain": plain, "two": two, "overrides": overrides, "store": store}


def _with(overrides: list[str], *extra: str) -> list[str]:
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(extra)


def test_two_stage_training_switches_at_start_step_and_resumes_exactly(staged):
    from memtron.config import load_config
    from memtron.train.trainer import train

    root, plain, two, overrides = (staged[k] for k in ("root", "plain", "two", "overrides"))
    assert sorted(plain.losses) == sorted(two.losses) == list(range(1, 9))
    # stage 1 is the run without memory, bit for bit; the continual stage sees memories
    assert [two.losses[s] for s in range(1, 5)] == [plain.losses[s] for s in range(1, 5)]
    assert all(two.losses[s] != plain.losses[s] for s in range(5, 9))
    # resume before the switch (step 3) and after it (step 6): the same losses
    for step in (3, 6):
        ckpt = root / "two" / "checkpoints" / f"step-{step:08d}"
        resumed = train(load_config(None, _with(
            overrides, f"train.run_dir={root / f'resumed{step}'}", f"checkpoint.resume={ckpt}")))
        assert sorted(resumed.losses) == list(range(step + 1, 9))
        assert all(resumed.losses[s] == two.losses[s] for s in resumed.losses), step
    # stage 2 may resume the stage-1 run itself: `data retrieve` only added a field
    ckpt = root / "plain" / "checkpoints" / "step-00000004"
    resumed = train(load_config(None, _with(
        overrides, f"train.run_dir={root / 'from-stage1'}", f"checkpoint.resume={ckpt}")))
    assert sorted(resumed.losses) == list(range(5, 9))
    assert all(resumed.losses[s] == two.losses[s] for s in resumed.losses)


def test_generate_cli_with_explicit_memories_reports_fetches(staged, capsys):
    from memtron.cli import main

    store, run = str(staged["store"]), staged["two"].run_dir
    args = ["generate", "--ckpt", str(run), "--prompt", "Ada was born in", "--max-new-tokens",
            "15", "--greedy", "--device", "cpu"]
    assert main([*args, "--rows", store]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("explicit memories ("))
    # 16 prompt tokens (2 chunks of 8, retrieved at prefill), then up to 15 new ones in a
    # 32-token context: chunks 2 and 3 are retrieved when reached, unless eos came first.
    # Each memory is fetched once; re-reads (the forward's memories are rebuilt when a chunk
    # is reached) are cache hits.
    import re

    found = re.match(r"explicit memories \(.*\): (\d+) retrievals of 2, (\d+) memories "
                     r"fetched \(.* MiB\), cache hit rate (.*)%", line)
    assert found and 2 <= int(found[1]) <= 4 and 1 <= int(found[2]) <= 2 * int(found[1]), line
    assert float(found[3]) > 0, line
    assert main([*args, "--rows", "http://127.0.0.1:9"]) == 2  # nothing listens
    assert "--rows http://127.0.0.1:9" in capsys.readouterr().err
    with running_server(store) as url:  # a served store needs a local copy of its retriever
        assert main([*args, "--rows", url]) == 2
        assert "--retriever" in capsys.readouterr().err
        assert main([*args, "--explicit", url, "--retriever", store]) == 0  # the old spelling
    err = capsys.readouterr().err
    assert "warning: --explicit is deprecated; use --rows" in err
    assert "explicit memories (http://" in err


# --------------------------------------------------------------------------- tensor parallel


def _tp_forward(model, memories, tokens, ids, state=None):
    """Loss, full-vocab logits and q/k weight gradients of the two memory layers, with
    memories."""
    from memtron.model.forward import ForwardContext
    from memtron.parallel.tensor import parallel_lm_loss

    logits = model(tokens[:, :-1], ForwardContext(explicit=memories.kv(ids)))
    if state is None:
        from memtron.model.transformer import lm_loss

        loss = lm_loss(logits, tokens[:, 1:])
    else:
        parts = [torch.empty_like(logits) for _ in range(state.tp)]
        torch.distributed.all_gather(parts, logits.detach().contiguous(), group=state.tp_group)
        loss = parallel_lm_loss(logits, tokens[:, 1:], state)  # (overwrites the logits)
        logits = torch.cat(parts, dim=-1)  # vocab shards, in rank order
    loss.backward()
    return {"loss": loss.detach(), "logits": logits.detach(),
            "wq": model.blocks[0].attn.wq.weight.grad.clone(),
            "wk": model.blocks[1].attn.wk.weight.grad.clone()}


def _tp_rank(rank: int, store: str, tokens: torch.Tensor, ids: torch.Tensor) -> dict:
    from memtron.config import load_config
    from memtron.parallel.parallelize import build_parallel_model
    from memtron.train.explicit import open_training_memories

    init_distributed(timeout_s=60)
    try:
        cfg = load_config(None, [*MODEL, "parallel.tp=2", "train.seed=0",  # the fixture's model
                                 f"memory.explicit.store={store}"])
        state = build_mesh(cfg)
        model = build_parallel_model(cfg, state)  # split over tp
        memories = open_training_memories(cfg, state)  # this rank's KV head of 2
        return {"tp_rank": state.tp_rank, **_tp_forward(model, memories, tokens, ids, state)}
    finally:
        destroy_mesh()
        shutdown_distributed()


def test_tensor_parallel_memories_equal_one_process(built):
    tokens = torch.randint(0, 256, (2, 25), generator=torch.Generator().manual_seed(4))
    ids = torch.randint(0, 20, (2, 3, R), generator=torch.Generator().manual_seed(5))
    model = built["model"]
    model.zero_grad()
    ref = _tp_forward(model.train(), _memories(built), tokens, ids)
    model.eval().zero_grad()
    for r in run_ranks(2, _tp_rank, str(built["store"]), tokens, ids):
        torch.testing.assert_close(r["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["logits"], ref["logits"], rtol=1e-4, atol=1e-5)
        for name in ("wq", "wk"):  # column-parallel: rank i holds rows (heads) slice i
            torch.testing.assert_close(r[name], ref[name].chunk(2, 0)[r["tp_rank"]],
                                       rtol=1e-4, atol=1e-6)
