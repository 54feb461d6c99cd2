"""Value tables fetched at inference (RAM store, memory-mapped bank, memory server) give the
in-RAM model's logits and tokens, with the LRU cache on and off; the CLI runs on each."""

import json

import pytest
import torch

from memtron.cli import main
from memtron.export.bank import export_bank
from memtron.infer.generate import SamplingConfig, generate
from memtron.infer.model import load_model
from memtron.infer.values import StoreValueTable
from memtron.model.forward import ForwardContext
from memtron.storage.manifest import CheckpointError
from memtron.storage.store import RamRowStore
from memtron.train.trainer import train
from tests.test_server import serving

PROMPTS = [[256, *b"Ada was born in"], [256, *b"The"], [256, *b"Bo works as a"]]
GREEDY = SamplingConfig(max_new_tokens=10, greedy=True, stop_at_eos=False)


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """A checkpoint of the tiny model with two memory layers sharing one table, and its bank."""
    from memtron.config import load_config
    from tests.conftest import tiny_overrides

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, tiny_overrides(tiny_corpus, run, **{
        "model.n_layers": 3, "memory.layers": "[0,2]", "memory.shared_tables": "[[0,2]]",
        "memory.placement": "replace", "train.steps": 6, "checkpoint.every": 3}))
    result = train(cfg)
    bank = tmp_path_factory.mktemp("bank") / "bank"
    export_bank(result.checkpoint, bank)
    return result.checkpoint, bank


def _logits(model) -> torch.Tensor:
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(3, 32)  # and through the KV cache, one token at a time
        steps = [model(tokens[:, :5], ForwardContext(cache=cache))]
        steps += [model(tokens[:, t:t + 1], ForwardContext(cache=cache)) for t in range(5, 20)]
    return torch.cat([full, torch.cat(steps, 1)])


@pytest.fixture(scope="module")
def reference(trained):
    loaded = load_model(trained[0])
    assert not loaded.store_tables
    return _logits(loaded.model), generate(loaded.model, PROMPTS, GREEDY, 256).tokens


def _check(loaded, reference) -> dict:
    logits, tokens = reference
    assert torch.equal(_logits(loaded.model), logits)
    assert generate(loaded.model, PROMPTS, GREEDY, 256).tokens == tokens
    return loaded.fetch_stats()


@pytest.mark.parametrize("cache_rows", [0, 64, 100_000])
def test_ram_store_equals_in_ram_model(trained, reference, cache_rows):
    ram = load_model(trained[0])
    table = ram.model.value_tables["table0"]
    stored = StoreValueTable(table.spec, RamRowStore(table.weight.detach()), cache_rows)
    for layer in ram.model.memory_layers():
        layer._values[0] = stored  # every layer reads the one shared table through the store
    logits, tokens = reference
    assert torch.equal(_logits(ram.model), logits)
    assert generate(ram.model, PROMPTS, GREEDY, 256).tokens == tokens
    stats = stored.fetch_stats()
    assert stats["rows_fetched"] > 0
    if cache_rows == 100_000:  # everything fits: each row is fetched once
        assert stats["rows_fetched"] <= table.n_rows and stats["cache_hit_rate"] > 0.5
    if cache_rows == 0:
        assert stats["cache_hits"] == 0


@pytest.mark.parametrize("cache_rows", [0, 64, 100_000])
def test_mmap_bank_equals_in_ram_model(trained, reference, cache_rows):
    stats = _check(load_model(trained[0], values=f"mmap:{trained[1]}", cache_rows=cache_rows),
                   reference)
    assert stats["rows_fetched"] > 0 and stats["bytes_fetched"] == stats["rows_fetched"] * 32 * 4


def test_server_equals_in_ram_model(trained, reference):
    with serving(trained[1], token="s3cret") as url:
        for cache_rows in (0, 64):
            _check(load_model(trained[0], values=url, cache_rows=cache_rows, token="s3cret"),
                   reference)


def test_bank_of_another_checkpoint_is_refused(trained):
    earlier = trained[0].parent / "step-00000003"
    with pytest.raises(CheckpointError, match="exported from step 6 .* is step 3"):
        load_model(earlier, values=f"mmap:{trained[1]}")


def test_cli_generate_with_each_value_source(trained, reference, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in ("Ada was born in", "The")))
    outputs = []
    with serving(trained[1]) as url:
        for rows in ("ram", str(trained[1]), url):
            assert main(["generate", "--ckpt", str(trained[0]), "--prompts", str(prompts),
                         "--greedy", "--max-new-tokens", "8", "--json", "--rows", rows]) == 0
            captured = capsys.readouterr()
            outputs.append([json.loads(line)["completion"] for line in captured.out.splitlines()])
            assert "tok/s" in captured.err
            if rows != "ram":
                assert "memory fetch" in captured.err and "cache hit rate" in captured.err
        # the old spelling still works for one release, and says what to use instead
        assert main(["generate", "--ckpt", str(trained[0]), "--prompts", str(prompts),
                     "--greedy", "--max-new-tokens", "8", "--json", "--values",
                     f"mmap:{trained[1]}"]) == 0
        captured = capsys.readouterr()
        outputs.append([json.loads(line)["completion"] for line in captured.out.splitlines()])
        assert "warning: --values is deprecated; use --rows" in captured.err
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3] and len(outputs[0]) == 2
    # streaming a single prompt prints the prompt and its continuation
    assert main(["generate", "--ckpt", str(trained[0].parent.parent), "--prompt", "Ada was",
                 "--greedy", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Ada was")
    assert main(["generate", "--ckpt", str(trained[0]), "--prompt", "x" * 40]) == 2
    assert "the model's context is 32" in capsys.readouterr().err
