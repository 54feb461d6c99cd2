"""Sparse row-wise Adam against torch.optim.SparseAdam and a plain reference; the schedule."""

import math

import pytest
import torch

from memtron.config import OptimConfig
from memtron.model.tables import LocalValueTable, TableSpec
from memtron.train.optim import SparseRowOptimizer, clip_sparse_grad_norm, lr_at


def _random_grads(table, g, steps):
    """Per step: a few rows touched (some repeatedly), some steps touching nothing new."""
    for _ in range(steps):
        ids = torch.randint(0, table.n_rows, (6, 4), generator=g)
        weights = torch.rand(6, 4, generator=g)
        yield ids, weights, torch.randn(6, table.dim, generator=g)


def _reference_lazy_adamw(weight, grads, lr, betas, eps, wd):
    """Straightforward loop over rows: the documented semantics, nothing shared with the code."""
    w = weight.clone().double()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, rows_grad in enumerate(grads, start=1):  # dict row -> grad vector
        for r, g in rows_grad.items():
            g = g.double()
            m[r] = betas[0] * m[r] + (1 - betas[0]) * g
            v[r] = betas[1] * v[r] + (1 - betas[1]) * g * g
            step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
            w[r] = w[r] * (1 - lr * wd) - step_size * m[r] / (v[r].sqrt() + eps)
    return w


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sparse_adam_matches_reference(wd):
    torch.manual_seed(0)
    table = LocalValueTable(TableSpec("t", 200, 8))
    initial = table.weight.detach().clone()
    opt = SparseRowOptimizer({"t": table}, lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    g = torch.Generator().manual_seed(3)
    recorded = []
    for ids, weights, grad_out in _random_grads(table, g, 5):
        table.lookup(ids, weights).backward(grad_out)
        uid, rows = table.sparse_grad()
        recorded.append({int(i): r.clone() for i, r in zip(uid, rows)})
        opt.step()
        opt.zero_grad()
    ref = _reference_lazy_adamw(initial, recorded, 0.05, (0.9, 0.95), 1e-8, wd)
    torch.testing.assert_close(table.weight.double(), ref, rtol=1e-6, atol=1e-6)
    untouched = [r for r in range(200) if all(r not in step for step in recorded)]
    assert untouched, "test should leave some rows untouched"
    assert torch.equal(table.weight[untouched], initial[untouched])


def test_sparse_adam_matches_torch_sparse_adam():
    torch.manual_seed(0)
    table = LocalValueTable(TableSpec("t", 64, 8))
    param = torch.nn.Parameter(table.weight.detach().clone())
    ours = SparseRowOptimizer({"t": table}, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    theirs = torch.optim.SparseAdam([param], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(7)
    for ids, weights, grad_out in _random_grads(table, g, 6):
        table.lookup(ids, weights).backward(grad_out)
        out = torch.nn.functional.embedding_bag(ids, param, per_sample_weights=weights,
                                                mode="sum", sparse=True)
        out.backward(grad_out)
        ours.step()
        ours.zero_grad()
        theirs.step()
        theirs.zero_grad()
    torch.testing.assert_close(table.weight, param.detach(), rtol=1e-5, atol=1e-6)


def test_sparse_adam_counts_steps_without_rows():
    """A shard whose rows nobody touched this step still advances the step count, so every
    rank's bias correction matches the whole table's."""
    table = LocalValueTable(TableSpec("t", 16, 4))
    opt = SparseRowOptimizer({"t": table}, lr=0.1, betas=(0.9, 0.95))
    before = table.weight.detach().clone()
    opt.step()  # no gradient recorded
    assert int(opt.state["t"]["step"]) == 1
    assert torch.equal(table.weight, before)


def test_sparse_adam_keeps_fp32_state_for_bf16_table():
    table = LocalValueTable(TableSpec("t", 16, 4, dtype=torch.bfloat16))
    opt = SparseRowOptimizer({"t": table}, lr=0.1, betas=(0.9, 0.95))
    table.lookup(torch.tensor([[1, 2]]), torch.ones(1, 2)).backward(torch.ones(1, 4))
    opt.step()
    assert opt.state["t"]["exp_avg"].dtype == torch.float32
    assert table.weight.dtype == torch.bfloat16


def test_clip_sparse_grad_norm_over_tables():
    a, b = LocalValueTable(TableSpec("t", 10, 2)), LocalValueTable(TableSpec("t", 10, 2))
    a.lookup(torch.tensor([[0]]), torch.ones(1, 1)).backward(torch.tensor([[3.0, 0.0]]))
    b.lookup(torch.tensor([[5]]), torch.ones(1, 1)).backward(torch.tensor([[0.0, 4.0]]))
    norm = clip_sparse_grad_norm([a, b], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(a.sparse_grad()[1], torch.tensor([[0.6, 0.0]]))
    torch.testing.assert_close(b.sparse_grad()[1], torch.tensor([[0.0, 0.8]]))


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(5, 110, cfg) == pytest.approx(0.5)
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.55)
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)
