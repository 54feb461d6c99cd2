"""Offline checkpoint reading and bank export: the reader equals DCP's own load at any saved
layout, exported rows are bit-identical through every RowStore, and a table of 4M rows exports
in bounded memory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from memtron.config import Config, load_config
from memtron.export.bank import export_bank
from memtron.model.transformer import build_model
from memtron.storage.bank import open_bank
from memtron.storage.checkpoint import CHUNK_BYTES, CheckpointReader
from memtron.storage.manifest import CheckpointError, resolve_checkpoint
from memtron.storage.store import HttpBank, RamRowStore
from memtron.train.checkpoint import save_checkpoint
from memtron.train.trainer import train
from tests.conftest import tiny_overrides
from tests.multiproc import run_ranks
from tests.test_server import serving

REPO = Path(__file__).resolve().parent.parent
TABLE = "model.value_tables.table0.weight"


def _overrides(corpus: Path, run_dir: Path, **extra) -> list[str]:
    values = {"model.n_heads": 4, "model.n_kv_heads": 2, "train.steps": 2,
              "optim.warmup_steps": 1, "checkpoint.resume": "none"}
    values.update(extra)
    return tiny_overrides(corpus, run_dir, **values)


def _train_rank(rank: int, overrides: list[str]) -> None:
    train(load_config(None, overrides))


@pytest.fixture(scope="module")
def checkpoints(tiny_corpus, tmp_path_factory) -> dict[str, Path]:
    """Run directories of a one-process run and of a (tp=2, dp=2, ep=4) run on 4 ranks."""
    root = tmp_path_factory.mktemp("ckpts")
    train(load_config(None, _overrides(tiny_corpus, root / "single")))
    run_ranks(4, _train_rank, _overrides(tiny_corpus, root / "sharded", **{
        "parallel.tp": 2, "parallel.ep": 4, "data.micro_batch_size": 2}))
    return {"single": root / "single", "sharded": root / "sharded"}


def _dcp_load(ckpt: Path, reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """Every tensor of ``ckpt`` through torch's own in-process load."""
    flat = {k: torch.empty(reader.shape(k), dtype=reader.dtype(k)) for k in reader.keys(prefix="")}
    dcp.load(flat, checkpoint_id=str(ckpt))
    return flat


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_reader_equals_in_process_load(checkpoints, layout):
    ckpt = resolve_checkpoint(checkpoints[layout])
    assert ckpt == checkpoints[layout] / "checkpoints" / "step-00000002"
    chunks = {k: len(v.chunks) for k, v in
              FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.items()
              if hasattr(v, "chunks")}
    if layout == "sharded":  # the layout really is sharded: ep=4 rows, tp=2 columns / rows
        assert chunks[TABLE] == 4 and chunks["memory_optim.table0.exp_avg"] == 4
        assert chunks["model.blocks.0.attn.wq.weight"] == 2
        assert chunks["model.blocks.0.attn.wo.weight"] == 2
    with CheckpointReader(checkpoints[layout]) as reader:
        assert reader.path == ckpt and reader.step == 2
        assert reader.config.parallel.tp == (2 if layout == "sharded" else 1)
        expected = _dcp_load(ckpt, reader)
        assert set(reader.keys(prefix="")) == set(expected)
        assert any(k.startswith("optim.") for k in expected)
        assert any(k.startswith("memory_optim.") for k in expected)
        for key, tensor in expected.items():
            got = reader.read(key)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), key
            if tensor.dim() >= 1:
                blocks = list(reader.iter_rows(key, 7))
                assert [start for start, _ in blocks] == list(range(0, tensor.shape[0], 7))
                assert torch.equal(torch.cat([rows for _, rows in blocks]), tensor), key
        state = reader.model_state_dict()
        model = build_model(reader.config)
        model.load_state_dict(state, strict=True)
        reference = build_model(reader.config).state_dict()
        dcp.load({"model": reference}, checkpoint_id=str(ckpt))
        assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_resolve_and_verify_name_the_problem(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty-run")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path / "empty-run" / "checkpoints")
    ckpt = resolve_checkpoint(checkpoints["single"])
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(ckpt), str(damaged)], check=True)
    shard = sorted(damaged.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard}: checksum mismatch"):
        CheckpointReader(damaged)
    with pytest.raises(KeyError, match="no such tensor"):
        CheckpointReader(ckpt).shape("model.nope")


def test_sharded_export_is_bit_identical_in_every_store(checkpoints, tmp_path):
    ckpt = resolve_checkpoint(checkpoints["sharded"])
    with CheckpointReader(ckpt) as reader:
        table = _dcp_load(ckpt, reader)[TABLE]
        config = reader.manifest["config"]
    n_rows, dim = table.shape
    manifest = export_bank(checkpoints["sharded"], tmp_path / "bank", block_bytes=50 * dim * 4)
    assert manifest["source"] == {"checkpoint": str(ckpt.resolve()), "step": 2, "config": config}
    spec = manifest["tables"]["table0"]
    assert (spec["n_rows"], spec["dim"], spec["dtype"]) == (n_rows, dim, "float32")
    assert [b["n_rows"] for b in spec["blocks"]] == [50] * (n_rows // 50) + [n_rows % 50]
    bank = open_bank(tmp_path / "bank")
    bank.verify()
    ids = torch.cat([torch.randperm(n_rows), torch.randint(0, n_rows, (500,))])
    with serving(tmp_path / "bank") as url:
        stores = [RamRowStore(table), bank.table("table0"), HttpBank(url).table("table0")]
        for store in stores:
            assert torch.equal(store.fetch(ids), table[ids]), type(store).__name__
    assert json.loads((tmp_path / "bank" / "manifest.json").read_text()) == manifest


# --------------------------------------------------------------------------- 4M-row table

BIG_ROWS, BIG_DIM = 4_194_304, 16  # 256 MiB of fp32
BIG_KEY = "value_tables.big.weight"


def _big_rows(start: int, count: int) -> torch.Tensor:
    """Rows whose fp32 bit patterns are their element numbers: any misplaced row shows."""
    return torch.arange(start * BIG_DIM, (start + count) * BIG_DIM,
                        dtype=torch.int32).view(torch.float32).view(count, BIG_DIM)


def _save_big_rank(rank: int, root: Path, world: int) -> None:
    """Save the big table from ``world`` ranks (row shards) or one process (a single chunk)."""
    from memtron.parallel.launch import init_distributed, shutdown_distributed

    per_rank = BIG_ROWS // world
    rows = _big_rows(rank * per_rank, per_rank)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        init_distributed()
        mesh = init_device_mesh("cpu", (world,))
        rows = DTensor.from_local(rows, mesh, [Shard(0)], run_check=False)
    save_checkpoint(root, 1, {"model": {BIG_KEY: rows}}, {"config": Config().to_dict()},
                    keep_last=1)
    shutdown_distributed()


_EXPORT_AND_MEASURE = """
import json, sys
from memtron.export.bank import export_bank

def status(field):  # kB, from the kernel's own accounting of this process
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024

# High-water mark from here on (ru_maxrss would carry over the parent's RSS at fork)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
export_bank(sys.argv[1], sys.argv[2], block_bytes=64 << 20)
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


@pytest.mark.parametrize("world", [4, 1], ids=["4-rank-shards", "one-chunk"])
def test_big_table_exports_in_bounded_memory(tmp_path, world):
    """A 256 MiB table saved as 4 rank shards (DTensor, gloo) or as one chunk by one process
    exports with a peak RSS far below its size, and every row arrives intact."""
    run_ranks(world, _save_big_rank, tmp_path / "ckpts", world, timeout=600)
    ckpt = tmp_path / "ckpts" / "step-00000001"
    chunks = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata[f"model.{BIG_KEY}"]
    # each rank's shard is stored in chunks of CHUNK_BYTES, which row-range reads load one by one
    assert len(chunks.chunks) == BIG_ROWS * BIG_DIM * 4 // CHUNK_BYTES
    assert all(c.sizes.numel() * 4 <= CHUNK_BYTES for c in chunks.chunks)
    done = subprocess.run([sys.executable, "-c", _EXPORT_AND_MEASURE, str(ckpt),
                           str(tmp_path / "bank")], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    table_bytes = BIG_ROWS * BIG_DIM * 4
    grown = rss["peak"] - rss["base"]
    print(f"{world} chunk(s): export grew RSS by {grown / 2**20:.1f} MiB "
          f"(peak {rss['peak'] / 2**20:.0f} MiB) for a {table_bytes / 2**20:.0f} MiB table")
    # one read block (export.bank.READ_BYTES) + one stored chunk being loaded, and the
    # allocator's slack: measured +12 MiB
    assert grown < 20 << 20
    bank = open_bank(tmp_path / "bank")
    assert len(bank.manifest["tables"]["big"]["blocks"]) == 4
    store = bank.table("big")
    step = 1 << 20
    for start in range(0, BIG_ROWS, step):
        rows = store.fetch(torch.arange(start, start + step))
        assert torch.equal(rows.view(torch.int32), _big_rows(start, step).view(torch.int32))
    sample = torch.randint(0, BIG_ROWS, (10_000,))
    assert torch.equal(store.fetch(sample).view(torch.int32),
                       (sample[:, None] * BIG_DIM + torch.arange(BIG_DIM)).int())
