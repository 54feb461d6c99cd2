"""memtron's rowwise_adagrad table against FBGEMM's EXACT_ROWWISE_ADAGRAD CPU TBE, an external
reference for the lookup, its weight gradients and the update (skipped without fbgemm_gpu:
``pip install --no-deps fbgemm-gpu-cpu==1.8.0``)."""

import pytest
import torch

try:
    tbe_ops = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_training")
except OSError as error:  # a build for another torch: its libraries do not load
    pytest.skip(f"fbgemm_gpu does not load: {error}", allow_module_level=True)
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (  # noqa: E402
    EmbeddingLocation,
    PoolingMode,
)

from memtron.model.memory import cpu_kernels  # noqa: E402
from memtron.model.tables import LocalValueTable, TableSpec  # noqa: E402
from memtron.train.optim import SparseRowOptimizer  # noqa: E402

N, D, T, HITS = 40, 16, 6, 5
LR, EPS = 0.05, 0.1  # an eps this large tells sqrt(s) + eps from sqrt(s + eps)


@pytest.mark.parametrize("extension", [
    pytest.param(True, marks=pytest.mark.skipif(not cpu_kernels.builds(),
                                                reason="the C++ extension does not build")),
    False])
def test_rowwise_adagrad_matches_fbgemm(monkeypatch: pytest.MonkeyPatch, extension: bool) -> None:
    """Three steps from the same rows on the same inputs (repeated ids within and across bags):
    outputs, weight gradients, rows and accumulators agree after each."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", extension)
    table = LocalValueTable(TableSpec("t", N, D, seed=3))
    opt = SparseRowOptimizer({"values": table}, lr=LR, betas=(0.9, 0.95), eps=EPS,
                             mode="rowwise_adagrad")
    tbe = tbe_ops.SplitTableBatchedEmbeddingBagsCodegen(
        [(N, D, EmbeddingLocation.HOST, tbe_ops.ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=LR, eps=EPS,
        pooling_mode=PoolingMode.SUM, weights_precision=SparseType.FP32,
        output_dtype=SparseType.FP32, device="cpu")
    assert tbe.optimizer_args.weight_decay == 0.0  # FBGEMM's default: no decay, as memtron's
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(table.weight)
    offsets = torch.arange(0, T * HITS + 1, HITS)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, N, (T, HITS), generator=g)
        weights = torch.rand(T, HITS, generator=g)
        grad = torch.randn(T, D, generator=g)
        w_ours = weights.clone().requires_grad_(True)
        out_ours = table.lookup(ids, w_ours)
        out_ours.backward(grad)
        opt.step()
        opt.zero_grad()
        w_ref = weights.reshape(-1).clone().requires_grad_(True)
        out_ref = tbe(ids.reshape(-1), offsets, per_sample_weights=w_ref)
        out_ref.backward(grad)  # FBGEMM updates its rows in this backward
        close = {"rtol": 0.0, "atol": 1e-5}
        torch.testing.assert_close(out_ours, out_ref, **close)
        torch.testing.assert_close(w_ours.grad.reshape(-1), w_ref.grad, **close)
        torch.testing.assert_close(table.weight.detach(), tbe.split_embedding_weights()[0],
                                   **close)
        torch.testing.assert_close(opt.state["values"]["sum_sq"],
                                   tbe.get_optimizer_state()[0]["sum"], rtol=1e-6, atol=1e-6)
