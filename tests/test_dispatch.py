"""The generic dispatcher (parallel/dispatch.py) on its own: uneven counts, a rank that sends
nothing and one that receives nothing, the order owners see, a round trip with gradients, the
counts exchange against known counts, Traffic, and the local ep=1 variant."""

import torch
import torch.distributed as dist

from memtron.parallel.dispatch import Dispatch, LocalDispatch, Traffic, make_dispatch
from memtron.parallel.launch import init_distributed, shutdown_distributed
from tests.multiproc import run_ranks

WORLD = 3
# Items per (source, destination): uneven; rank 1 sends nothing; nobody sends rank 2 anything.
COUNTS = [[2, 5, 0], [0, 0, 0], [4, 1, 0]]


def _items(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(destinations [M] shuffled, payload [M, 2] = (source * 100 + item index, item index))."""
    dest = torch.cat([torch.full((n,), d) for d, n in enumerate(COUNTS[rank])]).long()
    dest = dest[torch.randperm(dest.numel(), generator=torch.Generator().manual_seed(rank))]
    index = torch.arange(dest.numel(), dtype=torch.float32)
    return dest, torch.stack([rank * 100 + index, index], dim=1)


def _round_trip(rank: int) -> dict:
    init_distributed(timeout_s=60)
    try:
        group = dist.group.WORLD
        dest, payload = _items(rank)
        x = payload.clone().requires_grad_(True)
        Traffic.take()
        route = Dispatch(dest, group, WORLD)  # exchanges its own counts
        known = Dispatch(dest, group, WORLD, [COUNTS[s][rank] for s in range(WORLD)])
        received = route.dispatch(x)
        sent_fwd, received_fwd = Traffic.take()
        answers = received * (rank + 1) + 0.5  # the owner's work: depends on who owns it
        back = route.combine(answers)
        probe = torch.randn(back.shape, generator=torch.Generator().manual_seed(10 + rank))
        (back * probe).sum().backward()
        return {"recv_counts": route.recv_counts, "known": known.recv_counts,
                "send_counts": route.send_counts, "received": received.detach(),
                "back": back.detach(), "grad": x.grad, "probe": probe, "dest": dest,
                "payload": payload, "traffic": (sent_fwd, received_fwd)}
    finally:
        shutdown_distributed()


def test_round_trip_with_uneven_counts_and_an_empty_rank():
    results = run_ranks(WORLD, _round_trip)
    row = 2 * 4  # two fp32 values per item
    for rank, r in enumerate(results):
        expected_recv = [COUNTS[s][rank] for s in range(WORLD)]
        assert r["send_counts"] == COUNTS[rank]
        assert r["recv_counts"] == expected_recv == r["known"]
        # Owners see items grouped by source, each source's in its original relative order.
        expected = torch.cat([results[s]["payload"][results[s]["dest"] == rank]
                              for s in range(WORLD)])
        torch.testing.assert_close(r["received"], expected.reshape(-1, 2), rtol=0, atol=0)
        # Answers come back to the items' own order; gradients reach the items that sent them.
        scale = (r["dest"] + 1).float()[:, None]
        torch.testing.assert_close(r["back"], r["payload"] * scale + 0.5, rtol=0, atol=0)
        torch.testing.assert_close(r["grad"], r["probe"] * scale, rtol=0, atol=0)
        remote_sent = sum(COUNTS[rank]) - COUNTS[rank][rank]
        remote_recv = sum(expected_recv) - expected_recv[rank]
        assert r["traffic"] == (remote_sent * row, remote_recv * row)
    assert results[2]["received"].shape == (0, 2)  # the empty rank served nothing, no hang
    assert results[1]["back"].shape == (0, 2)  # and the idle one got nothing back


def test_local_dispatch_is_the_one_rank_case():
    dest = torch.zeros(5, dtype=torch.long)
    route = make_dispatch(dest, None, 1)
    assert type(route) is LocalDispatch and route.recv_counts == [5]
    x = torch.randn(5, 3, requires_grad=True)
    y = route.dispatch(x)
    back = route.combine(y * 2)
    torch.testing.assert_close(back, x * 2)
    back.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5, 3), 2.0))
    # With several destinations it groups by destination and still inverts exactly.
    grouped = LocalDispatch(torch.tensor([1, 0, 1, 0]))
    z = torch.arange(4.0)
    assert grouped.dispatch(z).tolist() == [1.0, 3.0, 0.0, 2.0]
    torch.testing.assert_close(grouped.combine(grouped.dispatch(z)), z)
