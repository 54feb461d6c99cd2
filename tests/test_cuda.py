"""The package on a GPU: training, generation and a tp=2 / ep=2 layout (skipped without CUDA).

Each run is compared with the same run on the CPU. Two ranks on one GPU cannot use NCCL (it
refuses two ranks on one device), so with a single GPU the tp/ep layout runs on gloo, whose
collectives take the GPU tensors through ``to_backend`` staging; with two GPUs it runs on NCCL.
"""

import pytest
import torch

from memtron.config import load_config
from memtron.infer.generate import SamplingConfig, generate
from memtron.infer.model import load_model
from memtron.train.trainer import train
from tests.conftest import tiny_overrides
from tests.multiproc import run_ranks

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _overrides(corpus, run_dir, **extra):
    values = {"model.n_heads": 4, "model.n_kv_heads": 2, "train.steps": 6,
              "optim.warmup_steps": 1, "data.micro_batch_size": 4}
    values.update(extra)
    return tiny_overrides(corpus, run_dir, **values)


def _train_rank(rank: int, overrides: list[str]) -> dict | None:
    result = train(load_config(None, [*overrides, "checkpoint.resume=none"]))
    return {"losses": result.losses, "checkpoint": result.checkpoint} if rank == 0 else None


def _rel_err(a: dict, b: dict) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in b)


@pytest.fixture(scope="module")
def cpu_reference(tiny_corpus, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path_factory.mktemp("cpu")
    result = _train_rank(0, _overrides(tiny_corpus, run))
    monkeypatch_module.undo()
    return result


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_tiny_model_trains_and_generates_on_gpu(tiny_corpus, tmp_path, cpu_reference):
    result = _train_rank(0, _overrides(tiny_corpus, tmp_path / "gpu"))
    err = _rel_err(result["losses"], cpu_reference["losses"])
    print(f"cuda vs cpu: max loss rel err {err:.2e}")
    assert err <= 1e-3  # fp32 on both; GPU kernels sum in other orders
    prompts = [[256, *b"Ada was born in"], [256, *b"The"]]
    sampling = SamplingConfig(max_new_tokens=10, greedy=True, stop_at_eos=False)
    on_gpu = load_model(result["checkpoint"], device="cuda")
    assert on_gpu.model.embed.weight.is_cuda
    gpu_tokens = generate(on_gpu.model, prompts, sampling, 256).tokens
    cpu_tokens = generate(load_model(result["checkpoint"]).model, prompts, sampling, 256).tokens
    assert gpu_tokens == cpu_tokens
    bf16 = generate(on_gpu.model, prompts, sampling, 256, dtype="bf16")
    assert bf16.new_tokens == 20


def test_tp2_ep2_layout_on_gpu(tiny_corpus, tmp_path, cpu_reference):
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    overrides = _overrides(tiny_corpus, tmp_path / "tp2", **{
        "parallel.tp": 2, "parallel.ep": 2, "parallel.backend": backend})
    (result, _) = run_ranks(2, _train_rank, overrides, timeout=600)
    err = _rel_err(result["losses"], cpu_reference["losses"])
    print(f"tp=2 ep=2 on cuda ({backend}) vs cpu: max loss rel err {err:.2e}")
    assert err <= 1e-3
