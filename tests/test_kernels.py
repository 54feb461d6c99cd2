"""GPU kernels against their torch paths: the Triton value-table kernels and the CUDA local
kernel of ring attention.

The Triton kernels are checked twice by the same ``check_*`` functions: under the Triton
interpreter on CPU tensors (a child process started with ``TRITON_INTERPRET=1``, which triton
reads when the kernels are defined; tiny sizes, seconds), and compiled on a GPU (``cuda``
marked). Tolerances, as max |error| over the largest |reference| of the tensor:
- Triton, fp32 tables, and anything summed in fp32 (row gradients, bf16 tables against fp32
  sums of their bf16 values): 1e-6;
- Triton against the torch path's own bf16 arithmetic (embedding_bag rounds weights and sums
  to bf16): 2e-2;
- the Adam and row-wise updates on the same gradients: 1e-6 for fp32 rows and moments; bf16
  rows and bf16 first moments within one bf16 ulp of each element (2^-7 of its magnitude).
  After a whole layer step, whose gradients differ in fp32 rounding, fp32 rows: 1e-4 (Adam
  divides by sqrt(v) + eps, so a gradient element near zero turns a rounding difference into a
  larger step difference);
- SDPA attention against the blocked fp32 kernel: 1e-4 with fp32 inputs (the kernel's fp32
  matmuls are 3xTF32); with bf16 inputs 1e-2 for out, 1e-3 for lse, 2e-2 for gradients.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from memtron.model.memory import cpu_kernels, kernels
from memtron.model.tables import LocalValueTable, TableSpec, bag_index, ops, sum_rows_by_id
from memtron.parallel.context import (
    _padded_lse,
    attention_lse,
    attention_lse_backward,
    blocked_attention_lse,
    blocked_attention_lse_backward,
    merge_partial,
)
from memtron.train.optim import ROWWISE_MODES, SparseRowOptimizer

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
# Older interpreters hand a loaded scalar to range() as a 1-element array, which NumPy >= 2.4
# refuses to turn into an int.
INTERPRETER_OK = HAS_TRITON and tuple(
    int(p) for p in importlib.metadata.version("triton").split(".")[:2]) >= (3, 7)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16_ULP = 2.0**-7
ROOT = Path(__file__).resolve().parents[1]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max |expected| (both compared in fp64 on the CPU)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    print(f"{what}: max error {err:.2e} of scale {scale:.2e}")
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:g} x {scale:.3e}"


def assert_within_bf16_ulp(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    excess = ((a - e).abs() - BF16_ULP * e.abs()).max().item()
    print(f"{what}: largest error beyond one bf16 ulp {excess:.2e}")
    assert excess <= 1e-12, f"{what}: an element differs by more than one bf16 ulp"


def _bags(g: torch.Generator, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, weights, offsets of bags with empty ones (first, middle, last), one bag longer than
    any kernel's hit block, and ids repeated within and across bags."""
    lengths = torch.tensor([0, 3, 0, 5, 1, 70, 7, 0])
    ids = torch.randint(0, n_rows, (int(lengths.sum()),), generator=g)
    ids[:12] = 7
    ids[40:45] = 7
    weights = torch.rand(ids.numel(), generator=g)
    offsets = torch.cumsum(lengths, 0) - lengths
    return ids, weights, offsets


# -- checks: run under the interpreter (CPU) and on the GPU ---------------------------------------
def check_gather(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for dim in (24, 64, 768):
            table = torch.randn(50, dim, generator=g).to(dtype)
            ids, weights, offsets = _bags(g, 50)
            out = kernels.bag_gather(table.to(device), ids.to(device), weights.to(device),
                                     offsets.to(device))
            assert out.dtype == torch.float32 and out.device.type == device.type
            ref = F.embedding_bag(ids, table.float(), offsets, per_sample_weights=weights,
                                  mode="sum")
            assert_close(out, ref, 1e-6, f"gather {dtype} d={dim}")
            assert not out[[0, 2, 7]].any(), "empty bags must give zeros"


def check_backward(device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for dim in (24, 768):
            table = torch.randn(40, dim, generator=g).to(dtype)
            ids, weights, offsets = _bags(g, 40)
            grad_out = torch.randn(offsets.numel(), dim, generator=g)
            bags = bag_index(offsets, ids.numel())
            ref_ids, ref_rows = sum_rows_by_id(ids, grad_out, weights, src=bags)
            ref_w = (grad_out[bags] * table.float()[ids]).sum(1)
            on = [t.to(device) for t in (grad_out, table, ids, weights, bags)]
            unique_ids, rows, grad_w = kernels.bag_backward(*on, weight_grad=True)
            assert torch.equal(unique_ids.cpu(), ref_ids)
            assert_close(rows, ref_rows, 1e-6, f"row grads {dtype} d={dim}")
            assert_close(grad_w, ref_w, 1e-6, f"weight grads {dtype} d={dim}")
            unique_ids, rows, grad_w = kernels.bag_backward(*on, weight_grad=False)
            assert grad_w is None and torch.equal(unique_ids.cpu(), ref_ids)
            assert_close(rows, ref_rows, 1e-6, f"row grads alone {dtype} d={dim}")


def _step_with_and_without_triton(pair, dim: int, device: torch.device,
                                  g: torch.Generator) -> None:
    """One optimizer step of both (table, optimizer) of ``pair`` on the same row gradients (25
    of 60 rows), the first with the Triton kernels on, the second off."""
    ids = torch.randperm(60, generator=g)[:25].sort().values.to(device)
    rows = torch.randn(25, dim, generator=g).to(device)
    for (table, optimizer), enabled in zip(pair, (True, False), strict=True):
        table.accumulate_grad(ids, rows.clone())
        with kernels.triton_enabled(enabled):
            assert kernels.use_triton(table.weight) == enabled
            optimizer.step()
        optimizer.zero_grad()


def _adam_pair(dtype: torch.dtype, dim: int, device: torch.device, betas, wd: float):
    tables = []
    for _ in range(2):
        table = LocalValueTable(TableSpec("t", 60, dim, seed=3, dtype=dtype)).to(device)
        tables.append((table, SparseRowOptimizer({"t": table}, lr=0.01, betas=betas, eps=1e-8,
                                            weight_decay=wd)))
    return tables


def check_adam(device: torch.device) -> None:
    """The fused update against SparseRowOptimizer's torch path, step after step; betas with
    1 - beta1 above 0.5 take torch.lerp's other formula."""
    g = torch.Generator().manual_seed(2)
    for dtype, steps in ((torch.float32, 3), (torch.bfloat16, 1)):
        for dim in (24, 768):
            for betas, wd in (((0.9, 0.95), 0.1), ((0.3, 0.999), 0.0)):
                (ours, opt), (ref, ref_opt) = _adam_pair(dtype, dim, device, betas, wd)
                for _ in range(steps):
                    _step_with_and_without_triton(((ours, opt), (ref, ref_opt)), dim, device, g)
                what = f"adam {dtype} d={dim} betas={betas} wd={wd}"
                for key in ("exp_avg", "exp_avg_sq"):
                    assert_close(opt.state["t"][key], ref_opt.state["t"][key], 1e-6,
                                 f"{what} {key}")
                if dtype == torch.float32:
                    assert_close(ours.weight, ref.weight, 1e-6, f"{what} rows")
                else:
                    assert_within_bf16_ulp(ours.weight, ref.weight, f"{what} rows")


def _rowwise_pair(mode: str, dim: int, device: torch.device, **options):
    """Two tables, SparseRowOptimizer ``mode`` on each, 3 steps on the same gradients (25 of 60
    rows a step, so rows miss steps), the first with the Triton kernels on, the second off:
    (table, state, reference table, reference state, calls to ``kernels.sparse_rowwise_``).
    A bf16 first moment is compared every step within one bf16 ulp and carried on from the
    reference's: the interpreter rounds it to bf16 by truncation (the GPU, as torch, to
    nearest even), and a moment one ulp apart moves later rows by far more than 1e-6."""
    dtype = options.pop("dtype", torch.float32)
    pair = []
    for _ in range(2):
        table = LocalValueTable(TableSpec("t", 60, dim, seed=3, dtype=dtype)).to(device)
        pair.append((table, SparseRowOptimizer({"t": table}, lr=0.01, mode=mode, **options)))
    (ours, opt), (ref, ref_opt) = pair
    state, ref_state = opt.state["t"], ref_opt.state["t"]
    g = torch.Generator().manual_seed(10)
    with mock.patch.object(kernels, "sparse_rowwise_", wraps=kernels.sparse_rowwise_) as kernel:
        for step in range(3):
            _step_with_and_without_triton(pair, dim, device, g)
            if options.get("moment_dtype") == torch.bfloat16:
                assert_within_bf16_ulp(state["exp_avg"], ref_state["exp_avg"],
                                       f"{mode} bf16 exp_avg d={dim} step {step}")
                state["exp_avg"].copy_(ref_state["exp_avg"])
    return ours, state, ref, ref_state, kernel.call_count


def check_rowwise(device: torch.device) -> None:
    """The fused row-wise update against SparseRowOptimizer's torch path, step after step, for
    each row-wise mode (a bf16 first moment too; betas with 1 - beta1 above 0.5 take
    torch.lerp's other formula); bf16 tables and global decay stay on the torch path."""
    cases = [(mode, torch.float32) for mode in ROWWISE_MODES]
    cases.append(("adam_rowwise_v", torch.bfloat16))
    for mode, moment_dtype in cases:
        for dim in (24, 768):
            for betas in ((0.9, 0.95), (0.3, 0.999)):
                ours, state, ref, ref_state, calls = _rowwise_pair(
                    mode, dim, device, betas=betas, weight_decay=0.1, moment_dtype=moment_dtype)
                assert calls == 3, f"{mode}: the kernel ran {calls} of 3 steps"
                what = f"{mode} {moment_dtype} moment d={dim} betas={betas}"
                assert_close(ours.weight, ref.weight, 1e-6, f"{what} rows")
                for key, value in state.items():
                    if value.is_floating_point():
                        assert_close(value, ref_state[key], 1e-6, f"{what} {key}")
                    else:
                        assert torch.equal(value, ref_state[key]), f"{what} {key}"
    for mode in ROWWISE_MODES:
        for options in ({"dtype": torch.bfloat16}, {"decay_mode": "global"}):
            ours, state, ref, ref_state, calls = _rowwise_pair(
                mode, 24, device, betas=(0.9, 0.95), weight_decay=0.1, **options)
            assert calls == 0, f"{mode} {options}: took the kernel"
            assert torch.equal(ours.weight, ref.weight), f"{mode} {options}: rows differ"
            for key, value in state.items():
                assert torch.equal(value, ref_state[key]), f"{mode} {options}: {key} differs"


def _layer_step(table: LocalValueTable, hits: list, enabled: bool):
    """Two 'layers' looking up one shared table plus a lookup_bags call with empty bags, one
    backward, one SparseRowOptimizer step: outputs, weight grads, the coalesced sparse grad."""
    opt = SparseRowOptimizer({"t": table}, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    with kernels.triton_enabled(enabled):
        assert kernels.use_triton(table.weight) == enabled
        outs, weights = [], []
        for ids, w, _ in hits[:2]:
            weights.append(w.clone().requires_grad_(True))
            outs.append(table.lookup(ids, weights[-1]))
        ids, w, offsets, _ = hits[2]
        weights.append(w.clone().requires_grad_(True))
        outs.append(table.lookup_bags(ids, weights[-1], offsets))
        loss = sum((out * hit[-1]).sum() for out, hit in zip(outs, hits))
        loss.backward()
        grad_ids, grad_rows = (t.clone() for t in table.sparse_grad())
        opt.step()
    return outs, [w.grad for w in weights], grad_ids, grad_rows, opt.state["t"]


def check_layer(device: torch.device) -> None:
    """LocalValueTable + SparseRowOptimizer end to end, Triton against the torch path."""
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        dim = 40
        hits = []
        for _ in range(2):
            ids = torch.randint(0, 64, (6, 8), generator=g)
            ids[:, 0] = 5  # every token of both layers hits row 5
            hits.append((ids.to(device), torch.rand(6, 8, generator=g).to(device),
                         torch.randn(6, dim, generator=g).to(device)))
        ids, weights, offsets = _bags(g, 64)
        hits.append((ids.to(device), weights.to(device), offsets.to(device),
                     torch.randn(offsets.numel(), dim, generator=g).to(device)))
        results = []
        for enabled in (True, False):
            table = LocalValueTable(TableSpec("t", 64, dim, seed=5, dtype=dtype)).to(device)
            results.append((_layer_step(table, hits, enabled), table))
        (outs, wgrads, grad_ids, grad_rows, state), table = results[0]
        (ref_outs, ref_wgrads, ref_ids, ref_rows, ref_state), ref_table = results[1]
        # the torch path rounds bf16 tables' weights and sums to bf16; row grads are fp32 on both
        rounded = 1e-6 if dtype == torch.float32 else 2e-2
        for i, (out, ref) in enumerate(zip(outs, ref_outs)):
            assert out.dtype == ref.dtype
            assert_close(out, ref, rounded, f"{dtype} lookup {i}")
        for i, (wg, ref) in enumerate(zip(wgrads, ref_wgrads)):
            assert_close(wg, ref, rounded, f"{dtype} weight grad {i}")
        assert torch.equal(grad_ids, ref_ids)
        assert_close(grad_rows, ref_rows, 1e-6, f"{dtype} shared-table row grads")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(state[key], ref_state[key], 1e-6, f"{dtype} {key}")
        if dtype == torch.float32:
            assert_close(table.weight, ref_table.weight, 1e-4, f"{dtype} rows after step")
        else:
            assert_within_bf16_ulp(table.weight, ref_table.weight, f"{dtype} rows after step")


CHECKS: dict[str, Callable[[torch.device], None]] = {
    "gather": check_gather, "backward": check_backward, "adam": check_adam,
    "rowwise": check_rowwise, "layer": check_layer,
}


# -- Triton under the interpreter (CPU) -----------------------------------------------------------
@pytest.mark.skipif(not INTERPRETER_OK, reason="needs triton >= 3.7 (its interpreter)")
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_triton_kernels_under_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1", MEMTRON_TRITON="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True,
                          text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(kernels.INTERPRET, reason="the interpreter runs the kernels on CPU tensors")
def test_kernels_stay_off_the_cpu_path():
    assert not kernels.use_triton(torch.zeros(4, 8))


# -- Triton compiled on a GPU ---------------------------------------------------------------------
@pytest.mark.cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_triton_kernels_on_gpu(check):
    with kernels.triton_enabled(True):
        CHECKS[check](torch.device("cuda"))


# -- the torch path's weight gradient where embedding_bag's backward lacks the dtype ---------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_weight_grad_matches_embedding_bag_backward(monkeypatch, dtype):
    """The fp32 gather-and-dot weight gradient (bf16 tables on CUDA), run here on the CPU in
    chunks of a few hits, against embedding_bag's own per-sample-weight backward."""
    ids, weights, offsets = _bags(torch.Generator().manual_seed(6), 64)
    grad_out = torch.randn(offsets.numel(), 40, generator=torch.Generator().manual_seed(7))
    grads = []
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)  # the reference kernel
    for supported in (True, False):
        monkeypatch.setattr(ops, "_bag_weight_grad_supported", lambda weight, s=supported: s)
        monkeypatch.setattr(ops, "WEIGHT_GRAD_CHUNK", 40 * 7)  # 7 hits a chunk
        table = LocalValueTable(TableSpec("t", 64, 40, seed=8, dtype=dtype))
        w = weights.clone().requires_grad_(True)
        with kernels.triton_enabled(False):
            table.lookup_bags(ids, w, offsets).backward(grad_out)
        grads.append(w.grad)
    assert_close(grads[1], grads[0], 1e-6 if dtype == torch.float32 else 2e-2,
                 f"{dtype} chunked weight grads")


def test_padded_lse_has_the_forward_layout():
    """The efficient-attention backward checks lse.stride(0) and stride(1) % 8 == 0."""
    lse = torch.randn(2, 3, 45)[..., 5:42]  # an unaligned view, as the ring's chunks are
    padded = _padded_lse(lse)
    assert padded.shape == (2, 3, 64) and padded.dtype == torch.float32
    assert padded.stride(0) % 8 == 0 and padded.stride(1) % 8 == 0
    assert torch.equal(padded[..., :37], lse) and torch.isposinf(padded[..., 37:]).all()


# -- ring attention's local kernel on CUDA --------------------------------------------------------
def _attention_tolerances(dtype: torch.dtype) -> tuple[float, float, float]:
    """(out, lse, grads) tolerances against the blocked fp32 kernel."""
    return (1e-4, 1e-4, 1e-4) if dtype == torch.float32 else (1e-2, 1e-3, 2e-2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("length", [37, 130])
def test_efficient_attention_matches_blocked_kernel(dtype, causal, kv_heads, length):
    g = torch.Generator().manual_seed(length + kv_heads)
    q = torch.randn(2, 4, length, 64, generator=g).to(dtype)
    k, v = (torch.randn(2, kv_heads, length, 64, generator=g).to(dtype) for _ in range(2))
    grad_out = torch.randn(2, 4, length, 64, generator=g).to(dtype)
    cuda = [t.cuda() for t in (q, k, v)]
    out, lse = attention_lse(*cuda, causal)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    ref_out, ref_lse = blocked_attention_lse(q, k, v, causal)  # fp32 on the CPU
    tol_out, tol_lse, tol_grad = _attention_tolerances(dtype)
    what = f"{dtype} causal={causal} kv={kv_heads} L={length}"
    assert_close(out, ref_out, tol_out, f"{what} out")
    assert_close(lse, ref_lse, tol_lse, f"{what} lse")
    grads = attention_lse_backward(*cuda, ref_out.cuda(), ref_lse.cuda(), grad_out.cuda(),
                                   causal)
    ref_grads = blocked_attention_lse_backward(q, k, v, ref_out, ref_lse, grad_out, causal)
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert grad.dtype == torch.float32
        assert_close(grad, ref, tol_grad, f"{what} {name}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_gradients_from_final_lse_add_up_to_full_attention(dtype):
    """A ring step's view: queries of chunk 1 against key chunk 0 (whole) and chunk 1 (causal),
    merged by LSE; each pair's backward with the merged out/lse adds up to the gradient of full
    causal attention (fp64 autograd on the CPU)."""
    c, d = 45, 64
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, c, d, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 2 * c, d, generator=g).to(dtype) for _ in range(2))
    grad_out = torch.randn(1, 4, c, d, generator=g).to(dtype)
    qc, kc, vc = (t.cuda() for t in (q, k, v))
    parts = [(kc[:, :, :c], vc[:, :, :c], False), (kc[:, :, c:], vc[:, :, c:], True)]
    out, lse = None, None
    for kp, vp, causal in parts:
        o, s = attention_lse(qc, kp, vp, causal)
        out, lse = (o, s) if out is None else merge_partial(out, lse, o, s)
    dq = torch.zeros(q.shape, device="cuda")
    dks, dvs = [], []
    for kp, vp, causal in parts:
        dq_p, dk_p, dv_p = attention_lse_backward(qc, kp, vp, out, lse, grad_out.cuda(), causal)
        dq += dq_p
        dks.append(dk_p)
        dvs.append(dv_p)

    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    scores = q64 @ k64.repeat_interleave(2, dim=1).transpose(-1, -2) / math.sqrt(d)
    visible = torch.arange(2 * c)[None, :] <= torch.arange(c, 2 * c)[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    ref = probs @ v64.repeat_interleave(2, dim=1)
    ref.backward(grad_out.double())
    tol_out, _, tol_grad = _attention_tolerances(dtype)
    assert_close(out, ref, tol_out, f"{dtype} merged out")
    assert_close(dq, q64.grad, tol_grad, f"{dtype} dq")
    assert_close(torch.cat(dks, dim=2), k64.grad, tol_grad, f"{dtype} dk")
    assert_close(torch.cat(dvs, dim=2), v64.grad, tol_grad, f"{dtype} dv")


if __name__ == "__main__":  # one check in this process, e.g. under TRITON_INTERPRET=1
    CHECKS[sys.argv[1]](torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu"))
