"""The one device policy (memtron.device) and train.device: fail early, naming the key."""

import pytest
import torch

from memtron.config import ConfigError, load_config
from memtron.device import default_backend, resolve_device
from memtron.parallel import launch
from memtron.parallel.launch import LaunchError, init_distributed, training_device

no_accelerator = pytest.mark.skipif(torch.accelerator.is_available(),
                                    reason="this machine has an accelerator")


@pytest.mark.parametrize("overrides,key", [
    (["train.device=tpu"], "train.device"),
    (["train.device=3"], "train.device"),
    (["train.device=cpu", "parallel.backend=nccl"], "parallel.backend"),
])
def test_bad_device_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(key)


def test_device_defaults_to_auto():
    assert load_config(None).train.device == "auto"


@no_accelerator
def test_auto_is_the_cpu_without_an_accelerator():
    assert resolve_device("auto") == torch.device("cpu")
    assert training_device(load_config(None).train.device) == torch.device("cpu")
    assert default_backend(resolve_device("auto")) == "gloo"
    assert launch._resolve_backend("auto") == "gloo"


@no_accelerator
def test_cuda_without_cuda_fails_before_launch(monkeypatch):
    """Under torchrun variables nothing rendezvouses: the device check comes first."""
    monkeypatch.setattr(launch, "_ENV", None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens: a rendezvous would hang or fail
    with pytest.raises(ConfigError) as err:
        init_distributed(timeout_s=1, device=load_config(None, ["train.device=cuda"]).train.device)
    assert str(err.value).startswith("train.device: cuda requested")
    assert not torch.distributed.is_initialized()


@no_accelerator
def test_nccl_without_cuda_fails():
    with pytest.raises(LaunchError, match="parallel.backend=nccl"):
        launch._resolve_backend("nccl", torch.device("cpu"))


def test_resolve_device_names_the_key():
    with pytest.raises(ConfigError, match="^--device: 'gpu0' is not a device"):
        resolve_device("gpu0", "--device")
    assert resolve_device("cpu") == torch.device("cpu")


@no_accelerator
def test_cli_train_on_cuda_without_cuda_names_the_key(capsys, monkeypatch):
    from memtron.cli import main

    monkeypatch.setattr(launch, "_ENV", None)
    assert main(["train", "train.device=cuda"]) == 2
    assert "memtron: error: train.device: cuda requested" in capsys.readouterr().err
