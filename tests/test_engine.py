"""The dense engines: DDP and FSDP2 at dp=2 reproduce one process, with and without gradient
accumulation, and a step issues the gradient reductions plus one control collective."""

from collections import Counter
from pathlib import Path

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from memtron.config import ConfigError, load_config
from memtron.parallel.launch import init_distributed, shutdown_distributed
from memtron.parallel.mesh import destroy_mesh
from memtron.train.trainer import Trainer
from tests.conftest import tiny_overrides
from tests.multiproc import run_ranks
from tests.test_parallel import _params, _rel, _train_rank

GLOBAL_BATCH = 4
STEPS = 4


def _overrides(corpus: Path, run_dir: Path, dp: int = 1, accum: int = 1, **extra) -> list[str]:
    values = {"data.micro_batch_size": GLOBAL_BATCH // (dp * accum), "train.grad_accum": accum,
              "train.steps": STEPS, "optim.warmup_steps": 1}
    values.update(extra)
    return tiny_overrides(corpus, run_dir, **values)


@pytest.fixture(scope="module")
def single(tiny_corpus, tmp_path_factory):
    """One process at each accumulation: (losses, final weights, overrides)."""
    out = {}
    for accum in (1, 2):
        overrides = _overrides(tiny_corpus, tmp_path_factory.mktemp(f"single{accum}"),
                               accum=accum)
        result = _train_rank(0, overrides)
        out[accum] = result, _params(result["checkpoint"], overrides), overrides
    return out


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("accum", [1, 2])
def test_engine_at_dp2_equals_one_process(tiny_corpus, tmp_path, single, engine, accum):
    ref, ref_params, ref_overrides = single[accum]
    overrides = _overrides(tiny_corpus, tmp_path / "run", dp=2, accum=accum,
                           **{"train.engine": engine})
    (result, *_) = run_ranks(2, _train_rank, overrides)
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    loss_err = max(abs(result["losses"][s] - ref["losses"][s]) / abs(ref["losses"][s])
                   for s in ref["losses"])
    params = _params(result["checkpoint"], ref_overrides)  # FSDP2's shards load whole
    param_err = max(_rel(params[k], ref_params[k]) for k in ref_params)
    print(f"{engine} dp=2 accum={accum}: max loss rel err {loss_err:.2e}, "
          f"max param rel err {param_err:.2e}")
    # The tolerances of test_parallel.py's dp=2 equivalence: fp32 sums in another order
    # (~1e-7), which Adam amplifies where a gradient element is near zero.
    assert loss_err <= 1e-5
    assert param_err <= 2e-5
    assert "value_tables.table0.weight" in params  # the row-sharded table trained beside


class _CollectiveCounter(TorchDispatchMode):
    """Counts the c10d ops dispatched while active, whoever issues them (DDP's reducer and
    FSDP2 included; torch's CommDebugMode counts the same, but its module tracker fails on
    DDP's no_sync micro-batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _step_collectives(rank: int, overrides: list[str], steps: int) -> list[Counter]:
    """The collectives each of ``steps`` training steps issues on this rank (step and stop
    check, as the loop runs them)."""
    cfg = load_config(None, overrides)
    init_distributed(cfg.parallel.timeout_s)
    try:
        trainer = Trainer(cfg)
        batches = trainer.batches()
        for _ in range(2):  # warm-up: DDP rebuilds its buckets after the first step
            trainer.train_step(batches)
        counts = []
        for _ in range(steps):
            with _CollectiveCounter() as counter:
                trainer.train_step(batches)
                trainer._agreed_stop()
            counts.append(counter.counts)
        return counts
    finally:
        destroy_mesh()
        shutdown_distributed()


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("accum", [1, 2])
def test_step_issues_gradient_reductions_and_one_control_collective(tiny_corpus, tmp_path,
                                                                    engine, accum):
    """Dense only (no memory layer), dp=2. DDP: the tiny model's ~0.1 MB of gradients fit
    DDP's first bucket (1 MiB), so one bucket all-reduce, in the last micro-batch only, plus
    the control all-reduce. FSDP2: one reduce-scatter per unit (2 blocks + the root), the
    control all-reduce, and parameter all-gathers (FSDP2's forward and backward), nothing
    else."""
    overrides = _overrides(tiny_corpus, tmp_path / "run", dp=2, accum=accum, **{
        "memory.layers": "[]", "train.engine": engine, "train.steps": 10})
    for rank_counts in run_ranks(2, _step_collectives, overrides, 3):
        for counts in rank_counts:
            print(engine, accum, dict(counts))
            if engine == "ddp":
                assert counts == {"c10d.allreduce_": 2}
            else:
                assert counts["c10d.allreduce_"] == 1
                assert counts["c10d._reduce_scatter_base_"] == 3
                assert set(counts) == {"c10d.allreduce_", "c10d._reduce_scatter_base_",
                                       "c10d._allgather_base_"}


def test_memory_layer_adds_only_its_exchanges(tiny_corpus, tmp_path):
    """With a row-sharded memory layer (ep=2) a DDP step adds the lookups' own collectives
    (an all-gather of the exchange counts per lookup and its all-to-alls, forward and
    backward), and no all-reduce: the row gradients stay with their owners."""
    overrides = _overrides(tiny_corpus, tmp_path / "run", dp=2, **{"train.steps": 10})
    for rank_counts in run_ranks(2, _step_collectives, overrides, 2):
        for counts in rank_counts:
            print(dict(counts))
            assert counts["c10d.allreduce_"] == 2
            assert set(counts) - {"c10d.allreduce_"} <= {"c10d.allgather_",
                                                         "c10d.alltoall_base_"}


def test_old_engine_name_is_refused_with_its_new_name(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="'native' is now called 'ddp'"):
        load_config(None, _overrides(tiny_corpus, tmp_path, **{"train.engine": "native"}))
