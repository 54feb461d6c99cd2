"""RowStore backends (RAM, memory-mapped bank) and the bank format: writing, opening, damage."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memtron.storage.bank import MmapRowStore, TableRows, open_bank, write_bank
from memtron.storage.rowblock import BankError
from memtron.storage.store import RamRowStore

N, D = 1000, 8


def _tables() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"values": torch.randn(N, D, generator=gen),
            "half": torch.randn(37, 5, generator=gen).bfloat16()}


def _write(out: Path, tables: dict[str, torch.Tensor], block_bytes: int = 300 * D * 4,
           split: int = 77, **kw) -> dict:
    rows = {name: TableRows(t.shape[0], t.shape[1], t.dtype, t.split(split))
            for name, t in tables.items()}
    return write_bank(out, rows, {"note": "test"}, block_bytes=block_bytes, **kw)


@pytest.fixture
def bank(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    tables = _tables()
    _write(tmp_path / "bank", tables)
    return tmp_path / "bank", tables


def test_bank_layout_and_safetensors_files(bank):
    path, tables = bank
    manifest = json.loads((path / "manifest.json").read_text())
    spec = manifest["tables"]["values"]
    assert (spec["n_rows"], spec["dim"], spec["dtype"], spec["rows_per_block"]) == \
        (N, D, "float32", 300)
    assert [(b["row_start"], b["n_rows"]) for b in spec["blocks"]] == \
        [(0, 300), (300, 300), (600, 300), (900, 100)]
    assert manifest["source"] == {"note": "test"}
    # every block is a plain safetensors file of its rows
    for name, table in tables.items():
        for block in manifest["tables"][name]["blocks"]:
            rows = load_file(path / block["file"])["rows"]
            assert torch.equal(rows, table[block["row_start"]:block["row_start"] + block["n_rows"]])
    assert not list(path.parent.glob(".tmp-*"))


@pytest.mark.parametrize("order", ["random", "sorted", "repeated", "one", "int32"])
def test_mmap_and_ram_fetch_equal_indexing(bank, order):
    path, tables = bank
    opened = open_bank(path)
    assert opened.tables == ["values", "half"]
    gen = torch.Generator().manual_seed(1)
    ids = {"random": torch.randperm(N, generator=gen)[:400],
           "sorted": torch.randperm(N, generator=gen)[:400].sort().values,
           "repeated": torch.randint(0, N, (3000,), generator=gen),
           "one": torch.tensor([N - 1]),
           "int32": torch.randint(0, N, (50,), generator=gen, dtype=torch.int32)}[order]
    for name, table in tables.items():
        want = ids % table.shape[0]
        expected = table[want.long()]
        for store in (opened.table(name), RamRowStore(table)):
            rows = store.fetch(want)
            assert rows.dtype == table.dtype and rows.device.type == "cpu"
            assert torch.equal(rows, expected), (type(store).__name__, name)
            assert store.stats == {"requests": 1, "rows": want.numel(),
                                   "bytes": expected.numel() * expected.element_size()}


def test_fetch_contract_edges(bank):
    path, tables = bank
    store = open_bank(path).table("values")
    assert isinstance(store, MmapRowStore)
    assert (store.n_rows, store.dim, store.dtype) == (N, D, torch.float32)
    assert store.fetch(torch.empty(0, dtype=torch.int64)).shape == (0, D)
    out = torch.empty(3, D)
    assert store.fetch(torch.tensor([5, 900, 5]), out=out) is out
    assert torch.equal(out, tables["values"][[5, 900, 5]])
    for bad in ([N], [-1], [0, N + 7]):
        with pytest.raises(IndexError, match=rf"\[0, {N}\)"):
            store.fetch(torch.tensor(bad))
    with pytest.raises(TypeError, match="integers"):
        store.fetch(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="vector"):
        store.fetch(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="out must be"):
        store.fetch(torch.tensor([1]), out=torch.empty(2, D))
    with pytest.raises(KeyError, match="no table 'nope'"):
        open_bank(path).table("nope")


def _damage(path: Path, case: str) -> Path:
    """Damage the bank at ``path``; returns the file the error must name."""
    manifest = json.loads((path / "manifest.json").read_text())
    block = path / manifest["tables"]["values"]["blocks"][1]["file"]
    if case == "manifest-not-json":
        (path / "manifest.json").write_text("{not json")
        return path / "manifest.json"
    if case == "manifest-missing":
        (path / "manifest.json").unlink()
        return path / "manifest.json"
    if case == "manifest-wrong-format":
        manifest["format"] = "something-else"
        (path / "manifest.json").write_text(json.dumps(manifest))
        return path / "manifest.json"
    if case == "manifest-gap-in-rows":
        manifest["tables"]["values"]["blocks"][1]["row_start"] += 1
        (path / "manifest.json").write_text(json.dumps(manifest))
        return path / "manifest.json"
    if case == "block-missing":
        block.unlink()
    elif case == "block-truncated":
        block.write_bytes(block.read_bytes()[:-4])
    elif case in ("block-bit-flip", "block-header-garbled"):
        data = bytearray(block.read_bytes())
        data[-1 if case == "block-bit-flip" else 12] ^= 0x55
        block.write_bytes(bytes(data))
    return block


@pytest.mark.parametrize("case", ["manifest-not-json", "manifest-missing", "manifest-wrong-format",
                                  "manifest-gap-in-rows", "block-missing", "block-truncated",
                                  "block-bit-flip", "block-header-garbled"])
def test_damaged_bank_is_named(bank, case):
    path, _ = bank
    named = _damage(path, case)
    with pytest.raises(BankError) as err:
        opened = open_bank(path)
        if case == "block-header-garbled":  # same size: the header check on opening finds it
            opened.table("values")
        opened.verify()
    assert str(named) in str(err.value), err.value
    if case == "block-bit-flip":  # same size, valid header: only the checksum sees it
        assert "checksum mismatch" in str(err.value)


def test_write_bank_is_atomic_and_refuses_to_overwrite(tmp_path):
    tables = _tables()
    out = tmp_path / "bank"
    _write(out, tables)
    with pytest.raises(BankError, match="exists"):
        _write(out, tables)
    before = (out / "manifest.json").read_text()

    def failing():
        yield tables["values"][:500]
        raise RuntimeError("source died")

    rows = {"values": TableRows(N, D, torch.float32, failing())}
    with pytest.raises(RuntimeError, match="source died"):
        write_bank(out, rows, overwrite=True)
    assert (out / "manifest.json").read_text() == before  # the old bank is untouched
    assert not list(tmp_path.glob(".tmp-*"))
    short = {"values": TableRows(N, D, torch.float32, [tables["values"][:999]])}
    with pytest.raises(BankError, match="got 999 rows, n_rows is 1000"):
        write_bank(tmp_path / "short", short)
    wrong = {"values": TableRows(N, D, torch.float32, [tables["values"].double()])}
    with pytest.raises(BankError, match="float64"):
        write_bank(tmp_path / "wrong", wrong)
    assert not (tmp_path / "short").exists() and not (tmp_path / "wrong").exists()
    # overwrite replaces a bank whole
    _write(out, {"values": tables["values"][:10]}, overwrite=True)
    assert open_bank(out).table("values").n_rows == 10
