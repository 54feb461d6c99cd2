"""The memory server: concurrent clients get identical rows; every bad request gets its 4xx."""

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from memtron.infer.server import running_server
from memtron.storage.bank import TableRows, write_bank
from memtron.storage.store import HttpBank, HttpRowStore, RemoteStoreError

REPO = Path(__file__).resolve().parent.parent
N, D = 5000, 16
MAX_IDS = 1000


def serving(bank: Path, token: str | None = None, max_ids: int = MAX_IDS, workers: int = 1):
    """A memory server on a free loopback port in a subprocess; stopped on exit."""
    return running_server(bank, token=token, max_ids=max_ids, workers=workers)


def _tables() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"values": torch.randn(N, D, generator=gen),
            "half": torch.randn(300, 4, generator=gen).bfloat16()}


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    tables = _tables()
    out = tmp_path_factory.mktemp("server") / "bank"
    write_bank(out, {name: TableRows(t.shape[0], t.shape[1], t.dtype, t.split(999))
                     for name, t in tables.items()}, block_bytes=1200 * D * 4)
    return out, tables


@pytest.fixture(scope="module")
def server(bank) -> Iterator[str]:
    with serving(bank[0]) as url:
        yield url


def _client(url: str, tables: dict[str, torch.Tensor], seed: int, requests_: int) -> int:
    """``requests_`` fetches of random ids (some above the server's limit, so split); returns
    the number of mismatches."""
    gen = torch.Generator().manual_seed(seed)
    stores = {name: HttpRowStore(url, name) for name in tables}
    bad = 0
    for i in range(requests_):
        name = "values" if i % 3 else "half"
        table = tables[name]
        ids = torch.randint(0, table.shape[0], (int(torch.randint(1, 2500, (1,), generator=gen)),),
                            generator=gen)
        bad += not torch.equal(stores[name].fetch(ids), table[ids])
    for store in stores.values():
        store.close()
    return bad


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_clients_get_identical_rows(bank, server, workers):
    path, tables = bank
    with contextlib.ExitStack() as stack:
        url = server if workers == 1 else stack.enter_context(serving(path, workers=workers))
        remote = HttpBank(url)
        assert remote.tables == ["values", "half"]
        assert remote.info["max_ids"] == MAX_IDS
        store = remote.table("values")
        assert (store.n_rows, store.dim, store.dtype) == (N, D, torch.float32)
        with ThreadPoolExecutor(8) as pool:
            mismatches = list(pool.map(lambda s: _client(url, tables, s, 12), range(8)))
        assert mismatches == [0] * 8


def _post(url: str, table: str = "values", body: bytes = b"", token: str | None = None,
          content_type: str | None = "application/octet-stream") -> requests.Response:
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(f"{url}/v1/tables/{table}/fetch", data=body, headers=headers, timeout=10)


def _ids(*values: int) -> bytes:
    return torch.tensor(values, dtype=torch.int64).numpy().tobytes()


@pytest.mark.parametrize("kwargs,status,message", [
    ({"table": "nope", "body": _ids(1)}, 404, "no table 'nope'"),
    ({"body": b""}, 400, "empty body"),
    ({"body": b"\0" * 12}, 400, "12 bytes is not a whole number of int64 ids"),
    ({"body": _ids(3, N)}, 400, f"row id {N} out of range: ids must lie in [0, {N})"),
    ({"body": _ids(-2)}, 400, f"row id -2 out of range: ids must lie in [0, {N})"),
    ({"body": _ids(*range(MAX_IDS + 1))}, 413, f"more than {MAX_IDS} ids"),
    ({"body": _ids(1), "content_type": "application/json"}, 415, "application/octet-stream"),
    ({"body": _ids(1), "content_type": None}, 415, "content type"),
])
def test_bad_requests_get_their_4xx(server, kwargs, status, message):
    response = _post(server, **kwargs)
    assert response.status_code == status
    assert message in response.text
    # and the server still serves
    assert _post(server, body=_ids(1, 2)).status_code == 200


def test_client_raises_server_message(server):
    store = HttpRowStore(server, "values")
    store.n_rows = N + 10  # let an out-of-range id past the client's own check
    with pytest.raises(RemoteStoreError, match=rf"HTTP 400: row id {N} out of range") as err:
        store.fetch(torch.tensor([N]))
    assert err.value.status == 400
    with pytest.raises(KeyError, match="no table 'nope'"):
        HttpBank(server).table("nope")


def test_bearer_token(bank):
    path, tables = bank
    with serving(path, token="s3cret") as url:
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
        assert requests.get(f"{url}/v1/tables", timeout=5).status_code == 401
        for token in (None, "wrong"):
            response = _post(url, body=_ids(1), token=token)
            assert response.status_code == 401 and "bearer token" in response.text
        response = _post(url, body=_ids(1, 7), token="s3cret")
        assert response.status_code == 200
        assert response.headers["X-Rows-Shape"] == f"2,{D}"
        assert response.headers["X-Rows-Dtype"] == "float32"
        rows = torch.frombuffer(bytearray(response.content), dtype=torch.float32).view(2, D)
        assert torch.equal(rows, tables["values"][[1, 7]])
        with pytest.raises(RemoteStoreError, match="HTTP 401: missing or wrong bearer token"):
            HttpBank(url, token="wrong")
        store = HttpBank(url, token="s3cret").table("half")
        assert torch.equal(store.fetch(torch.tensor([0, 299])), tables["half"][[0, 299]])
