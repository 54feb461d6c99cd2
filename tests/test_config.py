"""Bad configs fail before any work, naming the key."""

import pytest

from memtron.cli import main
from memtron.config import ConfigError, load_config


@pytest.mark.parametrize("overrides,key", [
    (["model.n_layerz=4"], "model.n_layerz"),
    (["modle.n_layers=4"], "modle"),
    (["model.n_layers=four"], "model.n_layers"),
    (["model.tie_embeddings=3"], "model.tie_embeddings"),
    (["optim.lr=fast"], "optim.lr"),
    (["train.dtype=fp8"], "train.dtype"),
    (["model.n_heads=5"], "model.n_heads"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["memory.layers=[4]"], "memory.layers[0]"),
    (["memory.layers=[1]", "memory.topk=80", "memory.n_sub_keys=64"], "memory.topk"),
    (["memory.layers=[1]", "memory.d_key=63"], "memory.d_key"),
    (["memory.layers=[1,2]", "memory.shared_tables=[[1,3]]"], "memory.shared_tables[0]"),
    (["memory.layers=[1]", "memory.memory_plus=false", "memory.value_dim=64"],
     "memory.value_dim"),
    (["data.seq_len=1024"], "data.seq_len"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["checkpoint.async_save=maybe"], "checkpoint.async_save"),
    (["train.max_bad_steps=0"], "train.max_bad_steps"),
    (["train.loss_spike_window=-1"], "train.loss_spike_window"),
    (["train.loss_spike_z=0"], "train.loss_spike_z"),
    (["model=3"], "model"),
    (["optim.memory_optimizer=lion"], "optim.memory_optimizer"),
    (["optim.memory_optimizer=rowwise_adagrad", "memory.parallel=colwise"],
     "optim.memory_optimizer"),
    (["optim.memory_optimizer=rowwise_adagrad", "optim.memory_moment_dtype=bf16"],
     "optim.memory_moment_dtype"),
    (["memory.value_dtype=fp16"], "memory.value_dtype"),
    (["optim.memory_weight_decay_mode=sometimes"], "optim.memory_weight_decay_mode"),
    (["optim.memory_weight_decay_mode=global", "memory.parallel=colwise"],
     "optim.memory_weight_decay_mode"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(key)


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  n_layers: 6\nmemory:\n  layers: [3]\n")
    cfg = load_config(recipe, ["memory.topk=8", "optim.lr=1e-3"])
    assert cfg.model.n_layers == 6 and cfg.memory.layers == [3]
    assert cfg.memory.topk == 8 and cfg.optim.lr == 1e-3


def test_shipped_recipes_are_valid():
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        load_config(recipe)


def test_cli_reports_config_error_without_traceback(capsys):
    assert main(["config", "memory.layers=[9]"]) == 2
    err = capsys.readouterr().err
    assert "memory.layers[0]" in err and "Traceback" not in err


def test_architecture_keys_are_tagged_once():
    """Resume, export and explicit-memory fingerprints read the same tagged fields."""
    from memtron.config import ModelConfig, architecture, architecture_keys
    from memtron.storage.explicit import FINGERPRINT_KEYS

    arch = architecture(load_config(None))
    assert set(arch) == {"model", "memory", "bank"}
    assert FINGERPRINT_KEYS == architecture_keys(ModelConfig) == tuple(arch["model"])
    assert "init_std" not in arch["model"]  # the init, not what a trained model is
    for layout in ("parallel", "usage_window", "tp_slice_lookups", "explicit"):
        assert layout not in arch["memory"]
    assert {"value_dtype", "n_sub_keys", "shared_tables"} <= set(arch["memory"])
    assert "lr_mult" not in arch["bank"] and "freeze_anchor" in arch["bank"]


@pytest.mark.parametrize("overrides,diff", [
    (["model.d_model=64"], ("model.d_model", 128, 64)),
    (["memory.value_dtype=bf16"], ("memory.value_dtype", "fp32", "bf16")),
    (["bank.branching=4"], ("bank.branching", 16, 4)),
    (["memory.parallel=colwise", "model.init_std=0.01", "bank.lr_mult=2",
      "memory.explicit.r=2", "train.steps=3"], None),
])
def test_architecture_diff(overrides, diff):
    from memtron.config import architecture_diff

    assert architecture_diff(load_config(None), load_config(None, overrides)) == diff


def test_colwise_value_dim_is_checked_with_the_world():
    from memtron.config import check_world

    cfg = load_config(None, ["memory.layers=[1]", "memory.parallel=colwise",
                             "memory.value_dim=6"])
    assert check_world(cfg, 2) == (1, 1, 2, 2)
    with pytest.raises(ConfigError, match="^memory.value_dim: 6 is not divisible by ep=4"):
        check_world(cfg, 4)
