"""The storage layer: checkpoint row-range reads through DCP's public API equal a full
``dcp.load`` at ep=1, 2 and 4; the one row-block writer and reader round-trip (and agree with
the safetensors library); damage is reported by file name; the HTTP store times out and
retries against a local server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader

from memtron.config import Config
from memtron.storage import checkpoint as storage_checkpoint
from memtron.storage.bank import TableRows, open_bank, write_bank
from memtron.storage.checkpoint import CHUNK_BYTES, CheckpointReader
from memtron.storage.manifest import CheckpointError
from memtron.storage.rowblock import (
    DATA_ALIGN,
    BankError,
    RowBlockWriter,
    map_rows,
    read_header,
)
from memtron.storage.store import HttpRowStore, RemoteStoreError
from memtron.train.checkpoint import save_checkpoint
from tests.multiproc import run_ranks

# --------------------------------------------------------------------------- checkpoint reads

ROWS, DIM = 300_001, 8  # 9.2 MiB of fp32: several stored chunks, uneven rank shards
TABLE = "model.value_tables.table0.weight"


def _tensors() -> dict[str, torch.Tensor]:
    """Whole tensors, the same on every rank: a table, a column-split weight, an int vector and
    a scalar."""
    gen = torch.Generator().manual_seed(0)
    return {"table0.weight": torch.randn(ROWS, DIM, generator=gen),
            "wide": torch.randn(5000, 300, generator=gen),
            "ids": torch.randint(0, 1 << 40, (70_001,), generator=gen),
            "scalar": torch.tensor(2.5)}


def _save_rank(rank: int, root: Path, world: int) -> None:
    """Save the tensors as the trainer does: the table row-sharded over ep=``world`` ranks, the
    wide weight column-sharded (as under tp), the rest replicated."""
    from memtron.parallel.launch import init_distributed, shutdown_distributed

    tensors = _tensors()
    model = {"value_tables": {"table0": {"weight": tensors["table0.weight"]}},
             "wide": tensors["wide"], "ids": tensors["ids"], "scalar": tensors["scalar"]}
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        init_distributed()
        mesh = init_device_mesh("cpu", (world,))
        model["value_tables"]["table0"]["weight"] = distribute_tensor(
            tensors["table0.weight"], mesh, [Shard(0)])
        model["wide"] = distribute_tensor(tensors["wide"], mesh, [Shard(1)])
    save_checkpoint(root, 1, {"model": model}, {"config": Config().to_dict()}, keep_last=1)
    shutdown_distributed()


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda ep: f"ep{ep}")
def saved(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"ep{request.param}")
    if request.param == 1:
        _save_rank(0, root, 1)
    else:
        run_ranks(request.param, _save_rank, root, request.param)
    return root / "step-00000001"


def _full_load(ckpt: Path, reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """Every tensor of ``ckpt`` through torch's own whole-tensor load."""
    flat = {k: torch.empty(reader.shape(k), dtype=reader.dtype(k)) for k in reader.keys("")}
    dcp.load(flat, checkpoint_id=str(ckpt), no_dist=True)
    return flat


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_row_range_reads_equal_a_full_dcp_load(saved):
    chunks = FileSystemReader(str(saved)).read_metadata().state_dict_metadata[TABLE].chunks
    assert len(chunks) >= ROWS * DIM * 4 // CHUNK_BYTES  # stored in bounded chunks
    assert all(c.sizes.numel() * 4 <= CHUNK_BYTES for c in chunks)
    with CheckpointReader(saved) as reader:
        full = _full_load(saved, reader)
        assert _same_bytes(full[TABLE], _tensors()["table0.weight"])
        for key, tensor in full.items():
            assert _same_bytes(reader.read(key), tensor), key
        gen = torch.Generator().manual_seed(1)
        for key in (TABLE, "model.wide", "model.ids"):
            n = full[key].shape[0]
            bounds = [(0, 1), (n - 1, n), (0, n), (7, 7)]
            bounds += [tuple(sorted(torch.randint(0, n + 1, (2,), generator=gen).tolist()))
                       for _ in range(12)]
            for start, stop in bounds:
                assert _same_bytes(reader.read_rows(key, start, stop), full[key][start:stop]), \
                    (key, start, stop)
            out = torch.empty(3, *full[key].shape[1:], dtype=full[key].dtype)
            assert reader.read_rows(key, n - 3, n, out=out) is out
            assert _same_bytes(out, full[key][n - 3:])
            blocks = list(reader.iter_rows(key, 40_000))
            assert _same_bytes(torch.cat([rows for _, rows in blocks]), full[key])


def _load_rank(rank: int, path: Path) -> bool:
    """Load the table row-sharded and the wide weight column-sharded over 2 ranks, as a resumed
    run does; True when this rank's shards hold the saved values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from memtron.parallel.launch import init_distributed, shutdown_distributed
    from memtron.train.checkpoint import load_checkpoint

    init_distributed()
    mesh = init_device_mesh("cpu", (2,))
    tensors = _tensors()
    table = distribute_tensor(torch.zeros(ROWS, DIM), mesh, [Shard(0)])
    wide = distribute_tensor(torch.zeros(5000, 300), mesh, [Shard(1)])
    load_checkpoint(path, {"model": {"value_tables": {"table0": {"weight": table}},
                                     "wide": wide}})
    ok = torch.equal(table.full_tensor(), tensors["table0.weight"]) and \
        torch.equal(wide.full_tensor(), tensors["wide"])
    shutdown_distributed()
    return ok


def test_chunked_checkpoint_loads_at_another_layout(saved):
    """Training loads the chunked checkpoint into shards of another layout (DCP reshards)."""
    assert run_ranks(2, _load_rank, saved) == [True, True]


def test_checkpoints_with_chunks_bigger_than_the_bound_read_the_same(tmp_path, monkeypatch):
    """A checkpoint whose stored chunks exceed CHUNK_BYTES (saved without memtron's planner)
    reads each big chunk once, whole, and gives the same bytes."""
    tensors = _tensors()
    dcp.save({"model": {"t": tensors["table0.weight"]}}, checkpoint_id=str(tmp_path),
             no_dist=True)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "step": 0, "files": {}, "config": {}}))
    monkeypatch.setattr(storage_checkpoint, "CHUNK_BYTES", 1 << 16)
    with CheckpointReader(tmp_path) as reader:
        assert _same_bytes(reader.read_rows("model.t", 5, 123_457),
                           tensors["table0.weight"][5:123_457])
        assert _same_bytes(reader.read("model.t"), tensors["table0.weight"])


def test_damaged_checkpoint_is_named(saved, tmp_path):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(saved, copy)
    shard = max(copy.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{shard}: checksum mismatch"):
        CheckpointReader(copy)
    with CheckpointReader(copy, verify=False) as reader, \
            pytest.raises(CheckpointError, match=rf"cannot read {TABLE} from .*{shard.name}"):
        reader.read(TABLE)


# --------------------------------------------------------------------------- row-block files


def test_row_block_writer_and_reader_round_trip(tmp_path):
    """The one writer streams tensors in pieces; the safetensors library and the one reader
    (memory-mapped) read back the same bytes."""
    gen = torch.Generator().manual_seed(2)
    tensors = {"a": torch.randn(37, 5, generator=gen), "b": torch.randn(11, 3).bfloat16(),
               "c": torch.randint(0, 100, (9, 2), dtype=torch.int16)}
    path = tmp_path / "f.safetensors"
    with RowBlockWriter(path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
                        {"note": "x"}) as writer:
        for t in tensors.values():
            for piece in t.split(4):
                writer.write(piece)
        sha256, nbytes = writer.finish()
    assert nbytes == path.stat().st_size and len(sha256) == 64
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "x"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
    assert read_header(path)[0] % DATA_ALIGN == 0  # the data starts aligned
    for name, t in tensors.items():
        assert torch.equal(map_rows(path, tuple(t.shape), t.dtype, name), t)
    short = RowBlockWriter(tmp_path / "short.safetensors", [("a", (2, 2), torch.float32)])
    short.write(torch.zeros(1, 2))
    with pytest.raises(BankError, match="got 8 data bytes, declared 16"):
        short.finish()


def test_damaged_bank_files_are_named(tmp_path):
    table = torch.arange(600, dtype=torch.float32).view(100, 6)
    write_bank(tmp_path / "bank", {"t": TableRows(100, 6, torch.float32, table.split(30))},
               block_bytes=40 * 6 * 4)
    bank = open_bank(tmp_path / "bank")
    assert torch.equal(bank.table("t").fetch(torch.arange(100)), table)
    block = sorted((tmp_path / "bank").glob("t-*.safetensors"))[1]
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF
    block.write_bytes(bytes(data))
    with pytest.raises(BankError, match=rf"{block}: checksum mismatch"):
        open_bank(tmp_path / "bank").verify()
    block.write_bytes(bytes(data[:-8]))
    with pytest.raises(BankError, match=rf"{block}: .* bytes, the manifest says"):
        open_bank(tmp_path / "bank")
    block.write_bytes(b"\xff" * len(data))
    with pytest.raises(BankError, match=rf"{block}: not a safetensors file"):
        open_bank(tmp_path / "bank").table("t")


# --------------------------------------------------------------------------- HTTP store

N, D = 50, 4
ROWS_HTTP = torch.arange(N * D, dtype=torch.float32).view(N, D)


class _Server(ThreadingHTTPServer):
    """A stand-in memory server speaking the fetch protocol: answers 503 to the first
    ``busy`` fetches, and waits ``delay`` seconds before each fetch answer."""

    daemon_threads = True

    def __init__(self, busy: int = 0, delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.busy, self.delay, self.fetches = busy, delay, 0


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._send(200, json.dumps({"tables": {"t": {"n_rows": N, "dim": D,
                                                     "dtype": "float32"}},
                                    "max_ids": 1000}).encode())

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.fetches += 1
        if self.server.fetches <= self.server.busy:
            self._send(503, b"busy")
            return
        time.sleep(self.server.delay)
        ids = torch.frombuffer(bytearray(body), dtype=torch.int64)
        rows = ROWS_HTTP[ids].contiguous()
        self._send(200, rows.numpy().tobytes(), {"X-Rows-Shape": f"{ids.numel()},{D}",
                                                 "X-Rows-Dtype": "float32"})


@contextmanager
def _serving(**kw: float) -> Iterator[tuple[str, _Server]]:
    server = _Server(**kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


def test_http_store_retries_a_busy_server():
    ids = torch.tensor([3, 1, 49, 3])
    with _serving(busy=2) as (url, server):
        store = HttpRowStore(url, "t", retries=3)
        assert torch.equal(store.fetch(ids), ROWS_HTTP[ids])
        assert server.fetches == 3  # two 503s, then the rows
        store.close()
    with _serving(busy=2) as (url, server):
        store = HttpRowStore(url, "t", retries=0)
        with pytest.raises(RemoteStoreError, match="HTTP 503: busy") as raised:
            store.fetch(ids)
        assert raised.value.status == 503 and server.fetches == 1
        store.close()


def test_http_store_times_out_and_names_the_server():
    with _serving(delay=5.0) as (url, _):
        store = HttpRowStore(url, "t", timeout=0.3, retries=0)
        start = time.perf_counter()
        with pytest.raises(RemoteStoreError, match=rf"{url}/v1/tables/t/fetch: no answer"):
            store.fetch(torch.tensor([0]))
        assert time.perf_counter() - start < 3.0
        store.close()
    with pytest.raises(RemoteStoreError, match=rf"{url}/v1/tables: no answer") as raised:
        HttpRowStore(url, "t", timeout=1.0, retries=1)  # the server is gone
    assert raised.value.status is None
