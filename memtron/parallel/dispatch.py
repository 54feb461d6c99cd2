"""The generic dispatcher: items to the ranks that own them, answers back (DESIGN §4, §12).

``dispatch`` permutes items (table hits, row ids, tokens) by destination rank and sends them
with one uneven ``all_to_all_single``; the owners compute one answer per received item; and
``combine`` sends the answers back the same route, reversed, and restores the items' order.
Both directions are differentiable: the gradient of ``combine`` is a ``dispatch`` of the
answers' gradients and vice versa, so owners receive exactly the gradients of what they served.

Communication, per :class:`Dispatch` built from ``dest`` [M] (M items of this rank):

* counts: one ``all_to_all_single`` of P int64 (skipped when the caller already knows what it
  will receive, e.g. from counts it all-gathered to choose an exchange);
* ``dispatch(x)``: ``x[order]`` split by ``send_counts`` -> ``[sum(recv_counts), ...]``;
* ``combine(y)``: the reverse exchange of the answers, ``recv_counts`` -> ``send_counts``.

Only bytes to or from other ranks are counted in :class:`Traffic` (forward and backward).

:class:`LocalDispatch` is the ep=1 variant: the same permutation and its inverse, no
collective; :func:`make_dispatch` picks it for a group of one.

Why not ``torch.distributed.nn.functional.all_to_all_single``: it is autograd-capable and
takes uneven splits, but it is deprecated (a warning per call) in favour of a private module
(``torch.distributed._functional_collectives``), neither moves a tensor to the backend's
device (gloo needs CPU tensors, NCCL CUDA ones) nor lets the backward exchange be counted.
The eight-line :class:`_AllToAll` below does all three.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from memtron.parallel.launch import to_backend


class Traffic:
    """Bytes this rank put on the wire to other ranks (and took off it) in memory exchanges,
    forward and backward, counted where the exchanges happen."""

    sent = 0
    received = 0

    @classmethod
    def add(cls, sent: int, received: int) -> None:
        cls.sent += sent
        cls.received += received

    @classmethod
    def take(cls) -> tuple[int, int]:
        taken = (cls.sent, cls.received)
        cls.sent = cls.received = 0
        return taken


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    wire = to_backend(x, group).contiguous()
    out = wire.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, wire, recv, send, group=group)
    me = dist.get_rank(group)
    row = math.prod(x.shape[1:]) * x.element_size()
    Traffic.add((sum(send) - send[me]) * row, (sum(recv) - recv[me]) * row)
    return out.to(x.device)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int],
               group: dist.ProcessGroup | None) -> torch.Tensor:
    """Uneven all-to-all of rows of ``x``: ``send[r]`` rows go to rank r, ``recv[r]`` come from
    it. Differentiable: the gradient travels the same route backwards."""
    if x.requires_grad:
        return _AllToAll.apply(x, send, recv, group)
    return _exchange(x, send, recv, group)


def exchange_counts(send_counts: list[int], group: dist.ProcessGroup | None) -> list[int]:
    """What every rank of ``group`` sends this one, given what this one sends each of them."""
    counts = to_backend(torch.tensor(send_counts, dtype=torch.int64), group)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    return received.tolist()


class LocalDispatch:
    """ep=1: every item's owner is this rank. ``dispatch`` groups items by destination (all
    0) exactly as :class:`Dispatch` orders them; ``combine`` undoes it. No collective."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.order = torch.argsort(dest, stable=True)
        self.send_counts = self.recv_counts = [int(dest.numel())]

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.order]

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        return y[torch.argsort(self.order)]


class Dispatch(LocalDispatch):
    """permute -> all-to-all -> (owners compute) -> all-to-all back -> inverse permute.

    Built once from each item's destination rank and reused for every payload that travels
    with those items (ids, weights, flags) and for the answers coming back. ``recv_counts``:
    what each rank sends this one, if the caller knows it; else the counts are exchanged here.
    """

    def __init__(self, dest: torch.Tensor, group: dist.ProcessGroup | None, size: int,
                 recv_counts: list[int] | None = None) -> None:
        self.group = group
        self.order = torch.argsort(dest, stable=True)
        self.send_counts = torch.bincount(dest, minlength=size).tolist()
        if recv_counts is None:
            recv_counts = exchange_counts(self.send_counts, group)
        self.recv_counts = recv_counts

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """Items to their owners: ``[M, ...]`` -> ``[sum(recv_counts), ...]``, grouped by
        source rank, each source's items in their original relative order."""
        return all_to_all(x[self.order], self.send_counts, self.recv_counts, self.group)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """Owners' answers (one per received item, in received order) back to the items'
        original order: ``[sum(recv_counts), ...]`` -> ``[M, ...]``."""
        back = all_to_all(y, self.recv_counts, self.send_counts, self.group)
        return back[torch.argsort(self.order)]


def make_dispatch(dest: torch.Tensor, group: dist.ProcessGroup | None, size: int,
                  recv_counts: list[int] | None = None) -> LocalDispatch:
    """The dispatcher for ``size`` ranks: :class:`LocalDispatch` when there is one."""
    if size == 1:
        return LocalDispatch(dest)
    return Dispatch(dest, group, size, recv_counts)
