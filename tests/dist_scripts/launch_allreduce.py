"""Child-process entry point for tests/test_launch.py: start up through memtron's launcher and
all-reduce the ranks, or make rank 1 die inside ``fail_fast`` before the collective (``fail``)
or stall without joining it (``hang``).

Prints ``LAUNCH_OK source=... rank=... world=... local_rank=... local_world=... sum=...``.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from memtron.parallel.launch import fail_fast, init_distributed, shutdown_distributed


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
    timeout_s = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    env = init_distributed(timeout_s=timeout_s)
    with fail_fast(env):
        if mode == "fail" and env.rank == 1:
            time.sleep(0.5)  # let rank 0 enter the all_reduce first
            raise ValueError("rank 1 fails on purpose before the collective")
        if mode == "hang" and env.rank == 1:
            time.sleep(3600)  # alive but never joins: rank 0 must fail by the collective timeout
        t = torch.tensor([float(env.rank)])
        start = time.monotonic()
        dist.all_reduce(t)
        line = (f"LAUNCH_OK source={env.source} rank={env.rank} world={env.world_size} "
                f"local_rank={env.local_rank} local_world={env.local_world_size} "
                f"sum={int(t.item())} master={env.master_addr}:{env.master_port} "
                f"waited={time.monotonic() - start:.1f}\n")
        sys.stdout.write(line)  # one write: ranks share the launcher's pipe
        sys.stdout.flush()
    shutdown_distributed()


if __name__ == "__main__":
    main()
