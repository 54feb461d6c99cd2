"""Ring attention (zigzag, cp = 2 and 4) equals full attention, forward and backward; the local
kernel equals scaled_dot_product_attention and its LSE the reference logsumexp."""

import math

import pytest
import torch
import torch.nn.functional as F

from memtron.config import ConfigError, load_config
from memtron.parallel.context import (
    attention_lse,
    attention_lse_backward,
    ring_attention,
    zigzag_indices,
)
from memtron.parallel.launch import init_distributed, shutdown_distributed
from memtron.parallel.mesh import build_mesh, destroy_mesh
from tests.multiproc import run_ranks


def _qkv(b=2, h=4, kv=2, length=24, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, length, d, generator=g), torch.randn(b, kv, length, d, generator=g),
            torch.randn(b, kv, length, d, generator=g))


@pytest.mark.parametrize("causal,block,kv", [(True, 7, 2), (False, 5, 4), (True, 512, 1)])
def test_local_kernel_equals_sdpa_and_logsumexp(causal, block, kv):
    q, k, v = _qkv(kv=kv, length=23)
    out, lse = attention_lse(q, k, v, causal, block=block)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    kr = k.repeat_interleave(4 // kv, dim=1)
    scores = q @ kr.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones(23, 23).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-6)


def test_local_kernel_backward_equals_autograd():
    q, k, v = (t.requires_grad_(True) for t in _qkv(length=19))
    grad = torch.randn(2, 4, 19, 8)
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad)
    with torch.no_grad():
        out, lse = attention_lse(q, k, v, True, block=6)
        dq, dk, dv = attention_lse_backward(q, k, v, out, lse, grad, True, block=6)
    for ours, ref in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _ring_rank(rank: int, cp: int, length: int) -> dict:
    init_distributed(timeout_s=60)
    try:
        cfg = load_config(None, [f"parallel.cp={cp}", "data.seq_len=32", "parallel.ep=1"])
        state = build_mesh(cfg)
        q, k, v = _qkv(length=length)
        idx = zigzag_indices(length, cp, state.cp_rank)
        ql, kl, vl = (t[:, :, idx].clone().requires_grad_(True) for t in (q, k, v))
        out = ring_attention(ql, kl, vl, state.cp_group, cp, state.cp_rank)
        grad = torch.randn(2, 4, length, 8, generator=torch.Generator().manual_seed(5))
        out.backward(grad[:, :, idx])
        return {"idx": idx, "out": out.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    finally:
        destroy_mesh()
        shutdown_distributed()


@pytest.mark.parametrize("cp,length", [(2, 24), (4, 40)])
def test_ring_attention_equals_full_attention(cp, length):
    q, k, v = (t.requires_grad_(True) for t in _qkv(length=length))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(torch.randn(2, 4, length, 8, generator=torch.Generator().manual_seed(5)))
    for r in run_ranks(cp, _ring_rank, cp, length):
        idx = r["idx"]
        torch.testing.assert_close(r["out"], ref.detach()[:, :, idx], rtol=1e-5, atol=1e-5)
        for name, full in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            torch.testing.assert_close(r[name], full[:, :, idx], rtol=1e-5, atol=1e-5)


def test_zigzag_layout_and_odd_lengths():
    assert zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="divisible by 2 \\* cp"):
        zigzag_indices(10, 2, 0)
    with pytest.raises(ConfigError, match="^data.seq_len"):
        load_config(None, ["parallel.cp=4", "data.seq_len=100"])
