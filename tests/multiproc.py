"""Run a function on N local ranks (gloo), the way torchrun would start them, and collect
each rank's return value. Ranks are spawned processes with torchrun's environment variables,
so the code under test goes through its normal launch path. The spawning is the benchmark
harness's (one copy for tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memtron.bench.harness import spawn_ranks


def _call(rank: int, world: int, fn: Callable, args: tuple) -> Any:
    return fn(rank, *args)


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = 300) -> list[Any]:
    """``fn(rank, *args)`` on ``world`` processes; returns the results in rank order, or raises
    with every rank's error (a peer's "connection closed" often hides the first cause)."""
    return spawn_ranks(_call, world, (fn, args), timeout=timeout).raise_errors(
        f"{getattr(fn, '__name__', fn)} on {world} ranks")
