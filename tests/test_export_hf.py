"""Hugging Face export and import: a dense model is a native LlamaForCausalLM with memtron's
logits; memory models load as remote code (with memtron hidden) with memtron's logits and greedy
tokens; a 4M-slot table exports in bounded memory; import continues training exactly; bad
inputs name the file; lm-eval runs on a local task through the exported model."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from memtron.config import load_config
from memtron.data.synthetic import load_questions
from memtron.data.tokenizer import ByteTokenizer
from memtron.export.hf import HFError, export_hf, import_hf, parse_size
from memtron.infer.generate import SamplingConfig, generate
from memtron.infer.model import load_model
from memtron.model.transformer import build_model
from memtron.storage.checkpoint import CheckpointReader
from memtron.storage.manifest import CheckpointError
from memtron.train.checkpoint import save_checkpoint
from memtron.train.facts import fact_accuracy
from memtron.train.trainer import train
from tests.conftest import tiny_overrides
from tests.multiproc import run_ranks

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
EOS = ByteTokenizer.eos_id
PROMPT = [EOS, *b"Zabrin Lothe was born in"]
TOLERANCE = 1e-5
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No hub access, and remote code cached in a temporary directory."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path_factory.getbasetemp() / "hf_modules"))


def _random_checkpoint(root: Path, overrides: list[str], scale: float = 20.0) -> Path:
    """A checkpoint of a randomly initialised model; value rows and memory outputs scaled up so
    the memory layers move the logits."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.d_ff=96", "model.max_seq_len=48", "data.seq_len=48",
                             *overrides])
    model = build_model(cfg)
    with torch.no_grad():
        for table in model.value_tables.values():
            table.weight.mul_(scale)
        for layer in model.memory_layers():
            layer.out.weight.mul_(scale)
    return save_checkpoint(root, 1, {"model": model.state_dict()},
                           {"config": cfg.to_dict(), "data_state": None}, keep_last=1)


def _memtron_reference(ckpt: Path, tokens: torch.Tensor, new_tokens: int):
    """Logits and greedy tokens through memtron's own inference path (`memtron generate`)."""
    model = load_model(ckpt).model
    with torch.no_grad():
        logits = model(tokens)
    result = generate(model, [PROMPT], SamplingConfig(greedy=True, max_new_tokens=new_tokens),
                      EOS)
    return logits, result.tokens[0]


def _hf_greedy(model, new_tokens: int) -> list[int]:
    """Greedy tokens after PROMPT, cut at eos (memtron drops the eos it stops at)."""
    out = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=new_tokens)
    tokens = out[0, len(PROMPT):].tolist()
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def _tokens(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- dense = Llama


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_dense_model_is_native_llama_with_identical_logits(tmp_path, tied):
    ckpt = _random_checkpoint(tmp_path / "ckpts", ["model.n_layers=3",
                                                   f"model.tie_embeddings={str(tied).lower()}"])
    summary = export_hf(ckpt, tmp_path / "hf", max_shard_size="60KB")
    out = tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["tie_word_embeddings"] is tied
    assert not list(out.glob("*.py")) and summary["files"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    assert ("lm_head.weight" in index["weight_map"]) is not tied

    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = _tokens(40)
    expected, greedy = _memtron_reference(ckpt, tokens, 16)
    with torch.no_grad():
        error = (model(tokens).logits - expected).abs().max().item()
    print(f"dense ({'tied' if tied else 'untied'}) -> LlamaForCausalLM: max |logit error| "
          f"{error:.2e}")
    assert error <= TOLERANCE
    assert _hf_greedy(model, 16) == greedy

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Zabrin Lothe était né à 😀"
    assert tokenizer(text).input_ids == ByteTokenizer().encode(text)
    assert tokenizer.decode(ByteTokenizer().encode(text)) == text
    assert tokenizer.eos_token_id == EOS and tokenizer("</s>x").input_ids == [EOS, ord("x")]
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == EOS and generation.pad_token_id == EOS


def test_bf16_export_halves_the_weights(tmp_path):
    ckpt = _random_checkpoint(tmp_path / "ckpts", ["model.n_layers=2", "memory.layers=[1]",
                                                   "memory.n_sub_keys=16", "memory.topk=4"],
                              scale=1.0)
    fp32 = export_hf(ckpt, tmp_path / "fp32")
    bf16 = export_hf(ckpt, tmp_path / "bf16", dtype="bf16")
    with safe_open(str(next((tmp_path / "bf16").glob("model-*"))), framework="pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert bf16["bytes"] < 0.6 * fp32["bytes"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


# --------------------------------------------------------------------------- memory models

# Loads each exported model with memtron unimportable, returns logits and greedy tokens.
_HIDDEN_MEMTRON = """
import importlib.abc, json, sys
from pathlib import Path

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "memtron" or name.startswith("memtron."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, Hide())
sys.path = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != Path(sys.argv[3])]
try:
    import memtron  # noqa: F401
    raise SystemExit("memtron is importable")
except ModuleNotFoundError:
    pass
import torch
from transformers import AutoModelForCausalLM

cases = torch.load(sys.argv[1])
results = {}
for name, case in cases.items():
    placement = {}
    if case.get("offload"):  # part of the model on the CPU, the rest (tables too) on disk
        placement = {"device_map": "auto", "max_memory": {"cpu": "250KB"},
                     "offload_folder": case["offload"]}
    model = AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=True,
                                                 **placement).eval()
    with torch.no_grad():
        logits = model(case["tokens"]).logits
        out = model.generate(torch.tensor([case["prompt"]]), do_sample=False,
                             max_new_tokens=case["new_tokens"])
    results[name] = {"logits": logits, "generated": out[0, len(case["prompt"]):].tolist(),
                     "class": type(model).__name__,
                     "devices": sorted(set(getattr(model, "hf_device_map", {}).values())),
                     "table_params": sum(p.numel() for n, p in model.named_parameters()
                                         if "value_tables" in n)}
assert not [m for m in sys.modules if m == "memtron" or m.startswith("memtron.")]
torch.save(results, sys.argv[2])
"""


def _run_hidden(tmp_path: Path, cases: dict) -> dict:
    torch.save(cases, tmp_path / "cases.pt")
    done = subprocess.run([sys.executable, "-c", _HIDDEN_MEMTRON, str(tmp_path / "cases.pt"),
                           str(tmp_path / "results.pt"), str(REPO)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(tmp_path / "results.pt")


def _train_rank(rank: int, overrides: list[str]) -> dict:
    return train(load_config(None, overrides)).losses


def _trained_overrides(corpus: Path, run_dir: Path, **extra) -> list[str]:
    """Two memory layers sharing one table in place of the FFNs; tp=2-compatible heads."""
    values = {"model.n_heads": 4, "model.n_kv_heads": 2, "memory.layers": "[0,1]",
              "memory.shared_tables": "[[0,1]]", "memory.placement": "replace",
              "train.steps": 3, "optim.warmup_steps": 1, "checkpoint.resume": "none"}
    values.update(extra)
    return tiny_overrides(corpus, run_dir, **values)


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory) -> Path:
    """The checkpoint of a real 2-rank gloo run at tp=2, ep=2 (3 steps)."""
    run = tmp_path_factory.mktemp("tp2ep2")
    run_ranks(2, _train_rank, _trained_overrides(tiny_corpus, run, **{
        "parallel.tp": 2, "parallel.ep": 2}))
    ckpt = run / "checkpoints" / "step-00000003"
    assert CheckpointReader(ckpt).manifest["layout"]["tp"] == 2
    return ckpt


def test_memory_models_match_memtron_with_memtron_absent(tmp_path, trained):
    """Replace and beside (2 layers sharing one table), the tp=2/ep=2 checkpoint, tables
    memory-mapped from a bank, and a device_map that offloads layers and tables to disk:
    remote code loaded where memtron cannot be imported gives memtron's logits and greedy
    tokens."""
    shared = ["model.n_layers=3", "memory.layers=[0,2]", "memory.shared_tables=[[0,2]]",
              "memory.n_sub_keys=16", "memory.topk=4", "memory.n_heads=2", "memory.d_key=16"]
    ckpts = {p: _random_checkpoint(tmp_path / p, [*shared, f"memory.placement={p}"])
             for p in ("replace", "beside")}
    ckpts["tp2-ep2"] = trained
    for name, ckpt in ckpts.items():
        export_hf(ckpt, tmp_path / f"hf-{name}", max_shard_size="40KB")
    export_hf(ckpts["beside"], tmp_path / "hf-bank", values="bank")
    ckpts["bank"] = ckpts["beside"]
    config = json.loads((tmp_path / "hf-replace" / "config.json").read_text())
    assert config["model_type"] == "memtron" and config["memory_tables"] == [[0, 2]]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_memtron.MemtronForCausalLM"
    blocks = json.loads((tmp_path / "hf-replace" / "model.safetensors.index.json").read_text())
    assert len([k for k in blocks["weight_map"] if ".value_tables.table0.block_" in k]) > 1
    assert json.loads((tmp_path / "hf-bank" / "config.json").read_text())["memory_bank"] \
        == "values"

    cases, expected = {}, {}
    for name, ckpt in ckpts.items():
        tokens = _tokens(30)
        new_tokens = 16 if name != "tp2-ep2" else 6  # the trained model's context is 32
        cases[name] = {"dir": str(tmp_path / f"hf-{name}"), "tokens": tokens,
                       "prompt": PROMPT, "new_tokens": new_tokens}
        expected[name] = _memtron_reference(ckpt, tokens, new_tokens)
    if importlib.util.find_spec("accelerate") is not None:  # device_map needs accelerate
        cases["offloaded"] = {**cases["beside"], "offload": str(tmp_path / "offload")}
        expected["offloaded"] = expected["beside"]
    results = _run_hidden(tmp_path, cases)
    for name, result in results.items():
        logits, greedy = expected[name]
        error = (result["logits"] - logits).abs().max().item()
        print(f"{name}: max |logit error| {error:.2e} (logits up to "
              f"{logits.abs().max().item():.2f}), greedy tokens {greedy}")
        assert result["class"] == "MemtronForCausalLM"
        assert error <= TOLERANCE, name
        generated = result["generated"]
        assert (generated[:generated.index(EOS)] if EOS in generated else generated) == greedy
    assert results["bank"]["table_params"] == 0 < results["beside"]["table_params"]
    if "offloaded" in results:
        assert results["offloaded"]["devices"] == ["cpu", "disk"]
    # the memory layers matter to these logits, so the equality covers them
    without = load_model(ckpts["beside"]).model
    for layer in without.memory_layers():
        torch.nn.init.zeros_(layer.out.weight)
    with torch.no_grad():
        assert (without(cases["beside"]["tokens"]) - expected["beside"][0]).abs().max() > 1e-2


# --------------------------------------------------------------------------- a 4M-slot table

BIG = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
       "model.d_ff=64", "model.max_seq_len=32", "data.seq_len=32", "memory.layers=[0]",
       "memory.n_sub_keys=2048", "memory.value_dim=16", "memory.topk=4", "memory.n_heads=2",
       "memory.d_key=16"]  # 2048^2 = 4,194,304 slots x 16 fp32 = 256 MiB

_EXPORT_AND_LOAD = """
import json, sys
from pathlib import Path

def status(field):  # bytes, from the kernel's accounting of this process
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024

def reset_peak():  # VmHWM restarts from the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")

big, small, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
import torch
from memtron.export.hf import export_hf
from transformers import AutoModelForCausalLM

def run(ckpt, where, tokens):
    result = {}
    for values in ("weights", "bank"):
        base = reset_peak()
        summary = export_hf(ckpt, where / values, max_shard_size="100MB", values=values)
        result[values] = {"grown": status("VmHWM") - base, **summary}
    base, anon = reset_peak(), status("RssAnon")
    model = AutoModelForCausalLM.from_pretrained(where / "bank", trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    # Bank pages the forward touched are file-backed page cache (RssFile), like the library
    # code it ran; a copy of the table would be anonymous memory.
    result["load"] = {"grown": status("VmHWM") - base, "anon": status("RssAnon") - anon}
    return result, logits

tokens = torch.load(out / "tokens.pt")
run(small, out / "warmup", tokens)  # code loaded on first use is not what is measured
result, logits = run(big, out, tokens)
torch.save(logits, out / "logits.pt")
print(json.dumps(result))
"""


def test_4m_slot_table_exports_and_loads_in_bounded_memory(tmp_path):
    """A 256 MiB table exports (row blocks, or a bank) and loads memory-mapped from the bank
    with a peak RSS far below its size, every row intact and memtron's logits."""
    small = _random_checkpoint(tmp_path / "small", ["model.n_layers=1", "memory.layers=[0]",
                                                    "memory.n_sub_keys=16", "memory.topk=4"])
    cfg = load_config(None, BIG)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    table = model.value_tables["table0"].weight
    table_bytes = table.numel() * table.element_size()
    assert table.shape[0] >= 4_000_000
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, {"model": model.state_dict()},
                           {"config": cfg.to_dict(), "data_state": None}, keep_last=1)
    tokens = _tokens(24)
    torch.save(tokens, tmp_path / "tokens.pt")
    done = subprocess.run([sys.executable, "-c", _EXPORT_AND_LOAD, str(ckpt), str(small),
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for mode in ("weights", "bank"):
        stats = result[mode]
        print(f"export ({mode}) of a {table_bytes / 2**20:.0f} MiB table: peak RSS grew "
              f"{stats['grown'] / 2**20:.1f} MiB; {stats['bytes'] / 2**30:.3f} GiB in "
              f"{stats['seconds']:.2f} s = {stats['bytes'] / stats['seconds'] / 1e9:.2f} GB/s "
              f"(checksum verification of the checkpoint included)")
        # a read block and a stored chunk (4 MiB each) and the allocator's slack: measured
        # +10 MiB (weights) and +8 MiB (bank)
        assert stats["grown"] < 20 << 20
    load = result["load"]
    print(f"load + forward, table memory-mapped from the bank: anonymous memory grew "
          f"{load['anon'] / 2**20:.1f} MiB (peak RSS, with file-backed pages, "
          f"{load['grown'] / 2**20:.1f} MiB)")
    assert load["anon"] < table_bytes / 16

    # every row arrives intact, in row blocks no bigger than a shard
    out = tmp_path / "weights"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = [k for k in index["weight_map"] if k.startswith("model.value_tables.table0.")]
    assert len(names) >= 3
    row = 0
    for j in range(len(names)):
        name = f"model.value_tables.table0.block_{j}"
        with safe_open(str(out / index["weight_map"][name]), framework="pt") as f:
            block = f.get_tensor(name)
        assert block.numel() * 4 <= parse_size("100MB")
        assert torch.equal(block, table[row:row + block.shape[0]]), name
        row += block.shape[0]
    assert row == table.shape[0]
    with torch.no_grad():
        expected = model(tokens)
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() <= TOLERANCE


# --------------------------------------------------------------------------- import


def test_import_continues_training_exactly(tiny_corpus, tmp_path, trained):
    """Export -> import -> 5 more steps gives the losses of 5 more steps from the original
    checkpoint (optimizer moments carried with optimizer_from); without them the weights come
    back bit for bit with zero moments, at the exported step and data position."""
    def resume(ckpt: Path, run: str) -> dict[int, float]:
        return train(load_config(None, _trained_overrides(
            tiny_corpus, tmp_path / run, **{"train.steps": 8,
                                            "checkpoint.resume": ckpt}))).losses

    reference = resume(trained, "original")
    assert sorted(reference) == [4, 5, 6, 7, 8]
    export_hf(trained, tmp_path / "hf")
    carried = import_hf(tmp_path / "hf", tmp_path / "carried", optimizer_from=trained)
    assert resume(carried, "carried") == reference

    fresh = import_hf(tmp_path / "hf", tmp_path / "fresh")
    with CheckpointReader(trained) as original, CheckpointReader(fresh) as imported:
        assert imported.step == original.step == 3
        assert imported.manifest["data_state"] == original.manifest["data_state"]
        assert set(imported.keys()) == set(original.keys())
        for key in original.keys("model."):
            assert torch.equal(imported.read(key), original.read(key)), key
        for key in imported.keys("optim.") + imported.keys("memory_optim."):
            if not key.endswith(".step"):
                assert not imported.read(key).any(), key
    losses = resume(fresh, "fresh")
    assert sorted(losses) == [4, 5, 6, 7, 8] and all(v == v for v in losses.values())


def test_plain_llama_imports_and_trains(tiny_corpus, tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(config).eval()
    llama.save_pretrained(tmp_path / "llama")
    overrides = tiny_overrides(tiny_corpus, tmp_path / "run", **{
        "memory.layers": "[]", "train.steps": 2, "checkpoint.resume": "none"})
    data = [o for o in overrides if not o.startswith(("model.", "memory."))]
    ckpt = import_hf(tmp_path / "llama", tmp_path / "ckpt", overrides=data)
    loaded = load_model(ckpt)
    assert loaded.config.model.rope_theta == 500000.0 and not loaded.config.model.tie_embeddings
    tokens = _tokens(30)
    with torch.no_grad():
        error = (loaded.model(tokens) - llama(tokens).logits).abs().max().item()
    print(f"plain Llama -> memtron: max |logit error| {error:.2e}")
    assert error <= TOLERANCE
    cfg = loaded.config  # the import's config: the Llama's shape, the data overrides
    cfg.checkpoint.resume = str(ckpt)
    assert sorted(train(cfg).losses) == [1, 2]

    config.attention_bias = True
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "biased")
    with pytest.raises(HFError, match="attention_bias"):
        import_hf(tmp_path / "biased", tmp_path / "nope", overrides=data)
    with pytest.raises(HFError, match="model.d_model"):
        import_hf(tmp_path / "llama", tmp_path / "nope", overrides=[*data, "model.d_model=64"])


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_file(tmp_path):
    ckpt = _random_checkpoint(tmp_path / "ckpts", ["model.n_layers=1"])
    export_hf(ckpt, tmp_path / "out")
    with pytest.raises(HFError, match=f"{tmp_path / 'out'}: not empty"):
        export_hf(ckpt, tmp_path / "out")
    stale = tmp_path / "out" / "stale.txt"
    stale.write_text("from before")
    export_hf(ckpt, tmp_path / "out", overwrite=True)
    assert not stale.exists()
    (tmp_path / "empty").mkdir()
    export_hf(ckpt, tmp_path / "empty")  # an empty directory is fine

    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    shard = sorted(corrupt.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard}: checksum mismatch"):
        export_hf(corrupt, tmp_path / "x")
    missing = tmp_path / "missing"
    shutil.copytree(ckpt, missing)
    (shard := sorted(missing.glob("*.distcp"))[0]).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}: missing"):
        export_hf(missing, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-*"))

    with pytest.raises(HFError, match="not empty"):
        import_hf(tmp_path / "out", tmp_path / "out")
    (file := next((tmp_path / "out").glob("model-*.safetensors"))).unlink()
    with pytest.raises(HFError, match=str(file)):
        import_hf(tmp_path / "out", tmp_path / "imported")
    with pytest.raises(HFError, match="max_shard_size"):
        export_hf(ckpt, tmp_path / "y", max_shard_size="lots")


# --------------------------------------------------------------------------- lm-eval


@pytest.mark.slow
def test_lm_eval_runs_the_local_task(tiny_corpus, tmp_path, trained):
    """lm_eval's hf model on the exported tp=2/ep=2 checkpoint, over the fact questions of a
    local jsonl: the accuracy it reports is memtron's own fact accuracy."""
    pytest.importorskip("lm_eval")
    export_hf(trained, tmp_path / "hf")
    data = tmp_path / "runs" / "data" / "tiny"
    data.mkdir(parents=True)
    shutil.copy(tiny_corpus / "questions.jsonl", data / "questions.jsonl")
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
         "--include_path", str(REPO / "tests" / "data" / "lm_eval"), "--tasks",
         "memtron_facts", "--device", "cpu", "--batch_size", "16", "--output_path",
         str(tmp_path / "results")], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    accuracy = json.loads(results_file.read_text())["results"]["memtron_facts"]["acc,none"]
    loaded = load_model(trained)
    questions = load_questions(tiny_corpus / "questions.jsonl")
    expected = fact_accuracy(lambda t: loaded.model(t), ByteTokenizer(), questions,
                             max_len=loaded.config.model.max_seq_len)
    print(f"lm-eval memtron_facts acc {accuracy:.4f} over {len(questions)} questions; memtron "
          f"fact accuracy {expected['all']:.4f} (chance {expected['chance']:.4f})")
    assert accuracy == pytest.approx(expected["all"])
