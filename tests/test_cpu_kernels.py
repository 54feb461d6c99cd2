"""The C++ CPU backward against the torch ops it replaces; the fallback when it is off."""

import os
import subprocess
import sys

import pytest
import torch

from memtron.model.memory import counter_rng, cpu_kernels
from memtron.model.tables import LocalValueTable, TableSpec, bag_index, sum_rows_by_id
from memtron.model.tables.grad import ARENA_HEADROOM
from memtron.train.optim import MEMORY_OPTIMIZERS, SparseRowOptimizer

needs_ext = pytest.mark.skipif(not cpu_kernels.builds(),
                               reason="the C++ extension does not build here")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 24, 257])
def test_bag_backward_matches_torch_ops(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    table = torch.randn(50, dim, generator=g).to(dtype)
    ids = torch.randint(0, 50, (120,), generator=g)
    weights = torch.rand(120, generator=g)
    offsets = torch.tensor([0, 7, 7, 40, 100])  # an empty bag
    grad_out = torch.randn(offsets.numel(), dim, generator=g)
    bags = bag_index(offsets, ids.numel())
    ref_ids, ref_rows = sum_rows_by_id(ids, grad_out, weights, src=bags)
    ref_w = (grad_out[bags] * table.float()[ids]).sum(1)
    arena = torch.full((200, dim), float("nan"))
    for buffer in (None, arena, arena[:3]):  # no arena, room for the rows, too little room
        unique, rows, grad_w = cpu_kernels.bag_backward(grad_out, table, ids, weights,
                                                        offsets, True, buffer)
        assert torch.equal(unique, ref_ids)
        torch.testing.assert_close(rows, ref_rows, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-5)
        assert (rows.data_ptr() == arena.data_ptr()) == (buffer is arena)
    assert cpu_kernels.bag_backward(grad_out, table, ids, weights, offsets, False)[2] is None


@needs_ext
def test_lookup_backward_same_with_extension_on_and_off(monkeypatch):
    """Two micro-batches into the arena, then a step's reset: the table's sparse gradient and
    the weight gradients equal the torch path's."""
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(cpu_kernels, "ENABLED", enabled)
        table = LocalValueTable(TableSpec("t", 64, 16, seed=1))
        g = torch.Generator().manual_seed(0)
        grads = []
        for _step in range(2):
            for _ in range(2):
                ids = torch.randint(0, 64, (5, 6), generator=g)
                w = torch.rand(5, 6, generator=g, requires_grad=True)
                table.lookup(ids, w).backward(torch.randn(5, 16, generator=g))
                grads.append(w.grad)
            grads.extend(t.clone() for t in table.sparse_grad())
            table.zero_grad_rows()
        results.append(grads)
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("full_dim,columns", [(256, None), (1, None), (7, None), (12, (3, 10)),
                                              (12, (4, 6)), (12, (5, 6))])
def test_init_normal_matches_torch_ops(dtype, full_dim, columns):
    """The C++ init writes counter_rng.normal's values bit for bit (the same polynomials, no
    fused multiply-adds), rounded to nearest even for bf16, whatever the row and column
    offsets (odd column starts split a Box-Muller pair)."""
    first, last = columns or (0, full_dim)
    rows = torch.arange(2**32 - 700, 2**32 + 500)
    ref = counter_rng.normal(9, counter_rng.INIT_STREAM, rows, first, last - first,
                             full_dim**-0.5)
    weight = torch.full((rows.numel(), last - first), float("nan"), dtype=dtype)
    cpu_kernels.init_normal(weight, int(rows[0]), first, 9, counter_rng.INIT_STREAM,
                            full_dim**-0.5)
    assert torch.equal(weight, ref.to(dtype))
    strided = torch.zeros(rows.numel(), last - first + 3, dtype=dtype)  # rows of a wider tensor
    cpu_kernels.init_normal(strided[:, 1 : last - first + 1], int(rows[0]), first, 9,
                            counter_rng.INIT_STREAM, full_dim**-0.5)
    assert torch.equal(strided[:, 1 : last - first + 1], weight)
    assert not strided[:, 0].any() and not strided[:, last - first + 1 :].any()


def test_falls_back_when_the_extension_does_not_build(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    monkeypatch.setattr(cpu_kernels, "builds", lambda: False)
    assert not cpu_kernels.available(torch.empty(0))
    table = LocalValueTable(TableSpec("t", 10, 4))
    w = torch.tensor([[0.5, 0.25, 0.125]], requires_grad=True)
    table.lookup(torch.tensor([[1, 2, 2]]), w).backward(torch.ones(1, 4))
    ids, rows = table.sparse_grad()
    assert torch.equal(ids, torch.tensor([1, 2]))
    assert torch.equal(rows, torch.tensor([[0.5] * 4, [0.375] * 4]))
    torch.testing.assert_close(w.grad, table.weight.detach()[[1, 2, 2]].sum(1, keepdim=True).T)


def _optimizer_run(monkeypatch, enabled: bool, mode: str, value_dtype: torch.dtype,
                   moment_dtype: torch.dtype, decay_mode: str) -> list[torch.Tensor]:
    """Rows and state after 4 steps (one touching nothing, rows repeating, weight decay on)."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", enabled)
    table = LocalValueTable(TableSpec("t", 40, 24, seed=5, dtype=value_dtype))
    opt = SparseRowOptimizer({"t": table}, lr=0.05, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=0.1, mode=mode, moment_dtype=moment_dtype,
                             decay_mode=decay_mode)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        n = 0 if step == 2 else 5
        ids = torch.randint(0, 20, (n, 3), generator=g)
        w = torch.rand(n, 3, generator=g, requires_grad=True)
        if n:
            table.lookup(ids, w).backward(torch.randn(n, 24, generator=g))
        opt.step()
        opt.zero_grad()
    return [table.weight.detach().clone()] + [s.clone() for s in opt.state["t"].values()]


@needs_ext
@pytest.mark.parametrize("decay_mode", ["touched", "global"])
@pytest.mark.parametrize("mode,value_dtype,moment_dtype", [
    (mode, value, torch.float32) for mode in MEMORY_OPTIMIZERS
    for value in (torch.float32, torch.bfloat16)] + [
    ("adam_rowwise_v", torch.bfloat16, torch.bfloat16), ("adam", torch.float32, torch.bfloat16)])
def test_sparse_update_matches_torch_path(monkeypatch, mode, value_dtype, moment_dtype,
                                          decay_mode):
    """The fused in-place update equals SparseRowOptimizer's torch ops: fp32 rows and state to
    1e-6; bf16 rows (stochastically rounded with the same keys) to one bf16 ulp."""
    ours = _optimizer_run(monkeypatch, True, mode, value_dtype, moment_dtype, decay_mode)
    ref = _optimizer_run(monkeypatch, False, mode, value_dtype, moment_dtype, decay_mode)
    for a, b in zip(ours, ref, strict=True):
        if a.dtype == torch.bfloat16:
            scale = b.float().abs().clamp_min(1e-3)
            assert ((a.float() - b.float()).abs() / scale).max() <= 2.0**-7
            assert (a != b).float().mean() < 0.05  # nearly every element identical
        elif a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b)
    assert not torch.equal(ours[0].float(), _fresh_rows(value_dtype))  # rows did move


def _fresh_rows(dtype: torch.dtype) -> torch.Tensor:
    return LocalValueTable(TableSpec("t", 40, 24, seed=5, dtype=dtype)).weight.detach().float()


@needs_ext
def test_sparse_update_is_in_place_without_row_temporaries(monkeypatch):
    """Rows and moments are written where they live (no re-allocation of the state)."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    table = LocalValueTable(TableSpec("t", 30, 8, seed=2))
    opt = SparseRowOptimizer({"t": table}, lr=0.1, betas=(0.9, 0.95))
    pointers = [table.weight.data_ptr()] + [s.data_ptr() for s in opt.state["t"].values()]
    table.lookup(torch.tensor([[1, 4]]), torch.ones(1, 2)).backward(torch.ones(1, 8))
    opt.step()
    assert pointers == [table.weight.data_ptr()] + [s.data_ptr()
                                                     for s in opt.state["t"].values()]
    assert int((opt.state["t"]["exp_avg"].abs().sum(1) > 0).sum()) == 2


def _kernel_outputs() -> dict[str, torch.Tensor]:
    """Init, backward and update of fixed inputs through the extension this process built."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        weight = torch.empty(300, 40, dtype=dtype)
        cpu_kernels.init_normal(weight, 2**32 - 100, 3, 9, counter_rng.INIT_STREAM, 0.1)
        out[f"init_{name}"] = weight
    g = torch.Generator().manual_seed(3)

    def exact(*shape: int) -> torch.Tensor:  # randn's bits depend on torch's own vector width
        return torch.randint(-512, 512, shape, generator=g) / 256.0

    table, ids = exact(500, 40), torch.randint(0, 500, (64 * 16,), generator=g)
    weights, grad = exact(64 * 16).abs(), exact(64, 40)
    unique, rows, grad_w = cpu_kernels.bag_backward(grad, table, ids, weights,
                                                    torch.arange(0, 64 * 16, 16), True)
    out.update(unique=unique, rows=rows, grad_w=grad_w)
    for mode, dtype in (("adam", torch.float32), ("rowwise_adagrad", torch.bfloat16)):
        weight = table.to(dtype)
        exp_avg = torch.zeros_like(table) if mode == "adam" else None
        second = torch.zeros_like(table) if mode == "adam" else torch.zeros(500)
        keys = (counter_rng.row_keys(0, counter_rng.ROUND_STREAM, 7, unique)
                if dtype == torch.bfloat16 else None)
        cpu_kernels.sparse_update(mode, weight, unique, rows, exp_avg, second, None, decay=0.99,
                                  betas=(0.9, 0.95), eps=1e-8, step_size=1e-2, step=1,
                                  round_keys=keys)
        out[f"update_{mode}"] = weight
    return out


@needs_ext
@pytest.mark.skipif(cpu_kernels.capability() == "DEFAULT", reason="no wider build to compare")
def test_every_vector_build_gives_the_same_results(tmp_path):
    """The extension is built per vector capability (AVX-512 / AVX2 / baseline): each lower
    build, loaded in a child with ``ATEN_CPU_CAPABILITY``, draws the same init bits and computes
    the backward and the update as this process's build does (sums may differ in order)."""
    ours = _kernel_outputs()
    caps = [c for c in ("AVX2", "DEFAULT") if c != cpu_kernels.capability()]
    for cap in caps:
        path = tmp_path / f"{cap}.pt"
        code = ("import sys, torch; sys.path.insert(0, sys.argv[2]); "
                "from memtron.model.memory import cpu_kernels; "
                f"assert cpu_kernels.capability() == {cap!r}, cpu_kernels.capability(); "
                "import test_cpu_kernels as t; torch.save(t._kernel_outputs(), sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, str(path), os.path.dirname(__file__)],
                       check=True, env={**os.environ, "ATEN_CPU_CAPABILITY": cap.lower()},
                       timeout=600)
        theirs = torch.load(path)
        for key in ("init_fp32", "init_bf16", "unique"):
            assert torch.equal(ours[key], theirs[key]), (cap, key)
        for key in ("rows", "grad_w", "update_adam"):
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6)
        diff = (ours["update_rowwise_adagrad"].float() - theirs["update_rowwise_adagrad"].float())
        assert (diff.abs() <= ours["update_rowwise_adagrad"].float().abs() * 2.0**-7).all()


@needs_ext
def test_arena_has_headroom_for_wandering_distinct_rows(monkeypatch):
    """The row-gradient arena grows to the largest step's distinct rows plus 1/ARENA_HEADROOM,
    so steps a little larger reuse it (a new arena is fresh pages to fault in)."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    table = LocalValueTable(TableSpec("t", 10_000, 8))

    def step(distinct: int) -> None:
        ids = torch.arange(distinct).view(1, -1)
        table.lookup(ids, torch.ones(1, distinct)).backward(torch.ones(1, 8))
        table.zero_grad_rows()

    step(320)
    arena = table.grad_rows.arena(torch.device("cpu"))
    assert arena.shape[0] == 320 + 320 // ARENA_HEADROOM
    for distinct in (330, 340, 300):
        step(distinct)
        assert table.grad_rows.arena(torch.device("cpu")).data_ptr() == arena.data_ptr()
    step(400)
    assert table.grad_rows.arena(torch.device("cpu")).shape[0] == 400 + 400 // ARENA_HEADROOM
