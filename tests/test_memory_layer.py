"""Product-key retrieval and the sparse value-table gradient against dense references."""

import pytest
import torch
import torch.nn.functional as F

from memtron.config import MemoryConfig
from memtron.model.memory.product_key import ProductKeyMemory, product_key_topk
from memtron.model.tables import LocalValueTable, TableSpec, sum_rows_by_id
from memtron.model.tables import table as values


@pytest.mark.parametrize("n,k,heads", [(8, 4, 1), (16, 8, 3), (32, 32, 2), (64, 5, 4)])
def test_topk_equals_brute_force(n, k, heads):
    g = torch.Generator().manual_seed(n * 100 + k)
    s1 = torch.randn(50, heads, n, generator=g, dtype=torch.float64)
    s2 = torch.randn(50, heads, n, generator=g, dtype=torch.float64)
    best, ids = product_key_topk(s1, s2, k)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [T, H, n*n], id = i*n + j
    ref_best, ref_ids = full.topk(k, dim=-1)
    torch.testing.assert_close(best, ref_best, rtol=0, atol=1e-12)
    assert torch.equal(ids, ref_ids)  # float64 random scores: no ties


def test_memory_layer_ids_and_weights_match_brute_force():
    cfg = MemoryConfig(layers=[0], n_heads=2, topk=6, d_key=16, n_sub_keys=10)
    table = LocalValueTable(TableSpec("t", cfg.n_slots, 24))
    layer = ProductKeyMemory(24, cfg, table, init_std=0.1, out_std=0.1)
    x = torch.randn(40, 24)
    ids, weights = layer.retrieve(x)
    q = layer.query_norm(layer.query(x).view(40, 2, 16))
    keys = layer.keys  # [H, 2, n, d/2]
    # every slot's key is the concatenation of its two sub-keys
    full_keys = torch.cat([keys[:, 0].unsqueeze(2).expand(-1, -1, 10, -1),
                           keys[:, 1].unsqueeze(1).expand(-1, 10, -1, -1)], dim=-1)
    scores = torch.einsum("thd,hnmd->thnm", q, full_keys).flatten(-2)
    ref_scores, ref_ids = scores.topk(6, dim=-1)
    assert torch.equal(ids, ref_ids.flatten(1))
    torch.testing.assert_close(weights, torch.softmax(ref_scores, -1).flatten(1))
    assert weights.dtype == torch.float32


def _dense_reference(table, ids, weights):
    ref = torch.nn.Parameter(table.weight.detach().clone())
    w = weights.detach().clone().requires_grad_(True)
    out = (w.unsqueeze(-1) * ref[ids]).sum(1)
    return ref, w, out


def _dense_from_sparse(table):
    ids, rows = table.sparse_grad()
    dense = torch.zeros_like(table.weight)
    dense[ids] = rows
    return dense, ids


def test_sparse_gradient_equals_dense_autograd():
    torch.manual_seed(0)
    table = LocalValueTable(TableSpec("t", 500, 16))
    ids = torch.randint(0, 500, (30, 12))
    ids[:, 3] = 7  # repeated ids across tokens and within a token
    ids[0, :4] = 11
    weights = torch.rand(30, 12, requires_grad=True)
    grad_out = torch.randn(30, 16)
    out = table.lookup(ids, weights)
    out.backward(grad_out)
    ref, w, ref_out = _dense_reference(table, ids, weights)
    ref_out.backward(grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights.grad, w.grad)
    dense, touched = _dense_from_sparse(table)
    torch.testing.assert_close(dense, ref.grad)
    assert torch.equal(touched, torch.unique(ids))  # deduplicated, sorted
    assert table.weight.grad is None  # never a dense gradient


def test_shared_table_accumulates_across_three_layers_and_micro_batches():
    torch.manual_seed(1)
    cfg = MemoryConfig(layers=[0, 1, 2], n_heads=2, topk=4, d_key=8, n_sub_keys=8)
    table = LocalValueTable(TableSpec("t", cfg.n_slots, 12))
    layers = [ProductKeyMemory(12, cfg, table, 0.2, 0.2) for _ in range(3)]
    ref_table = torch.nn.Parameter(table.weight.detach().clone())
    for _micro in range(2):
        x = torch.randn(20, 12)
        h = x
        h_ref = x
        for layer in layers:
            h = h + layer(h)
            ids, weights = layer.retrieve(h_ref)
            y = (weights.unsqueeze(-1) * ref_table[ids]).sum(1)
            h_ref = h_ref + layer.out(y * F.silu(layer.gate(h_ref)))
        h.pow(2).sum().backward()
        h_ref.pow(2).sum().backward()
    dense, _ = _dense_from_sparse(table)
    torch.testing.assert_close(dense, ref_table.grad, rtol=1e-5, atol=1e-6)


def test_sum_rows_by_id_pairs_hits_with_rows():
    ids = torch.tensor([5, 2, 5, 9, 2, 2])
    rows = torch.arange(12.0).view(6, 2)
    unique, summed = sum_rows_by_id(ids, rows)
    assert unique.tolist() == [2, 5, 9]
    assert summed.tolist() == [[2 + 8 + 10, 3 + 9 + 11], [0 + 4, 1 + 5], [6, 7]]


def test_usage_counts_hits_and_resets():
    table = LocalValueTable(TableSpec("t", 100, 4))
    table.lookup(torch.tensor([[1, 1, 2, 3]]), torch.ones(1, 4))
    stats = table.usage()
    assert stats["slots_used"] == pytest.approx(0.03)
    assert stats["max_slot_hit_share"] == pytest.approx(0.5)
    assert table.hits.sum() == 0


@pytest.mark.parametrize("extension", [True, False])
def test_init_rows_same_for_any_row_range_column_slice_and_threads(monkeypatch, extension):
    """Shards (unaligned, bf16, column slices starting on odd and even columns) initialise to
    the rows of the whole table, on one thread or several, by the C++ extension or the torch
    ops (chunked: more rows than one chunk)."""
    from memtron.model.memory import cpu_kernels
    from memtron.model.tables import TableSpec, init_rows

    if extension and not cpu_kernels.builds():
        pytest.skip("the C++ extension does not build here")
    monkeypatch.setattr(cpu_kernels, "ENABLED", extension)
    monkeypatch.setitem(values.INIT_CHUNK, "cpu", 4096)
    dim, n = 9, 3000
    spec = TableSpec("t", n, dim, seed=5)
    whole = torch.empty(n, dim)
    init_rows(whole, spec)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            part = torch.empty(1500, dim)
            init_rows(part, spec, 700)
            assert torch.equal(part, whole[700:2200])
            assert torch.equal(LocalValueTable(spec).weight, whole)  # a Parameter
    finally:
        torch.set_num_threads(threads)
    half = torch.empty(n - 3, dim, dtype=torch.bfloat16)
    init_rows(half, spec, 3)
    assert torch.equal(half, whole[3:].to(torch.bfloat16))  # rounded to nearest even
    for first, last in ((2, 5), (3, 8), (0, 1), (8, 9)):
        cols = torch.empty(100, last - first)
        init_rows(cols, spec, 950, first)
        assert torch.equal(cols, whole[950:1050, first:last])


def test_init_rows_is_normal_with_std_of_the_full_dim():
    """1M values: mean 0 and std dim**-0.5 (of the full dim for a column slice), the share
    beyond 2 and 3 std and the kurtosis of a normal, the two values of a Box-Muller pair
    uncorrelated (also their squares: independent), all within ~5 standard errors;
    seeds and rows differ."""
    from memtron.model.tables import TableSpec, init_rows

    dim, n = 256, 4096
    w = torch.empty(n, dim)
    # row ids past 32 bits: keys hash both halves
    init_rows(w, TableSpec("t", 2**33, dim, seed=3), 2**32 - 100)
    z = w.double().flatten() * dim**0.5
    count = z.numel()
    assert abs(z.mean().item()) < 5 / count**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / count) ** 0.5
    for k, share in ((2, 0.0455003), (3, 0.0026998)):
        error = (share * (1 - share) / count) ** 0.5
        assert abs((z.abs() > k).double().mean().item() - share) < 5 * error
    assert abs((z**4).mean().item() - 3) < 5 * (96 / count) ** 0.5
    x, y = z.view(n, dim // 2, 2).unbind(2)
    for a, b in ((x, y), (x**2, y**2)):
        assert abs(torch.corrcoef(torch.stack((a.flatten(), b.flatten())))[0, 1]) < 5 / (
            count / 2) ** 0.5
    assert z.abs().max() < 6  # 24-bit uniforms reach 5.8 std
    cols = torch.empty(n, 64)
    init_rows(cols, TableSpec("t", n, 1024, seed=3), 0, 64)
    assert abs(cols.double().std().item() * 1024**0.5 - 1) < 5 * (2 / cols.numel()) ** 0.5
    other = torch.empty(n, dim)
    init_rows(other, TableSpec("t", 2**33, dim, seed=4), 2**32 - 100)
    assert (other == w).float().mean() < 1e-3
    assert torch.unique(w, dim=0).shape[0] == n


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_table_drawn_on_device_is_the_seeded_table(device):
    """A table drawn on a device (torch ops on a GPU) holds the host table's values, bit for
    bit: the same polynomials in fp32 ops that round alike everywhere."""
    for dtype in (torch.float32, torch.bfloat16):
        spec = TableSpec("t", 300, 12, seed=7, dtype=dtype)
        drawn = LocalValueTable(spec, device=device)
        assert drawn.weight.device.type == device and drawn.hits.shape == (300,)
        assert torch.equal(drawn.weight.cpu(), LocalValueTable(spec).weight)
