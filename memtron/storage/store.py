"""Rows by id from RAM or a memory server (DESIGN §11).

Every memory kind (value-table rows, bank blocks, explicit memories) is rows addressed by id, so
inference reads them through one contract, :class:`RowStore`: ``fetch(ids) -> rows``. Backends:

* :class:`RamRowStore`: a tensor in this process;
* :class:`~memtron.storage.bank.MmapRowStore`: one table of an on-disk bank, memory-mapped;
* :class:`HttpRowStore`: a client of ``memtron serve-memory`` (:mod:`memtron.infer.server`),
  with timeouts, and retries of failed connections and of 429/502/503/504 answers (urllib3's
  ``Retry``: a fetch is idempotent).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

import torch

from memtron.storage.rowblock import dtype_from_name, dtype_name

READ_BYTES = 1 << 20  # HttpRowStore reads responses in pieces of this size
RETRY_STATUS = (429, 502, 503, 504)  # answers of a busy or restarting server: worth a retry


class RemoteStoreError(RuntimeError):
    """The memory server refused a request (``status``: its HTTP status) or could not be
    reached or read in time (``status`` None)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.status = status


def check_ids(ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``ids`` as a contiguous CPU int64 vector, every id in ``[0, n_rows)``."""
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise TypeError(f"row ids must be integers, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"row ids must be a vector [M], got shape {list(ids.shape)}")
    ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
    if ids.numel():
        low, high = torch.aminmax(ids)
        if low < 0 or high >= n_rows:
            bad = int(low) if low < 0 else int(high)
            raise IndexError(f"row id {bad} out of range: ids must lie in [0, {n_rows})")
    return ids


class RowStore(ABC):
    """Rows ``[n_rows, dim]`` of one table, fetched by id.

    ``fetch`` returns CPU rows in ``dtype`` in the order of ``ids`` (which may repeat and live on
    any device). ``stats`` counts requests, rows and bytes served by this object.
    """

    def __init__(self, n_rows: int, dim: int, dtype: torch.dtype) -> None:
        self.n_rows, self.dim, self.dtype = n_rows, dim, dtype
        self.stats = {"requests": 0, "rows": 0, "bytes": 0}
        self._stats_lock = threading.Lock()

    def fetch(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[M, dim]`` for ``ids [M]``; written into ``out`` when given (a contiguous CPU
        tensor of that shape and dtype, reused across calls to skip allocating fresh pages)."""
        ids = check_ids(ids, self.n_rows)
        shape = (ids.numel(), self.dim)
        if out is None:
            out = torch.empty(shape, dtype=self.dtype)
        elif (tuple(out.shape) != shape or out.dtype != self.dtype or out.device.type != "cpu"
              or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous CPU {self.dtype} tensor {list(shape)}, "
                             f"got {out.dtype} {list(out.shape)} on {out.device}")
        if ids.numel():
            self._gather(ids, out)
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["rows"] += ids.numel()
            self.stats["bytes"] += out.numel() * out.element_size()
        return out

    @abstractmethod
    def _gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Write rows ``ids`` (checked, CPU int64, non-empty) into ``out``."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_rows={self.n_rows}, dim={self.dim}, "
                f"dtype={dtype_name(self.dtype)})")


class RamRowStore(RowStore):
    """Rows of a tensor ``[n_rows, dim]`` (gathered on its device, returned on the CPU)."""

    def __init__(self, table: torch.Tensor) -> None:
        if table.dim() != 2:
            raise ValueError(f"a table is [n_rows, dim], got shape {list(table.shape)}")
        super().__init__(table.shape[0], table.shape[1], table.dtype)
        self.table = table

    def _gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        if self.table.device.type == "cpu":
            torch.index_select(self.table, 0, ids, out=out)
        else:
            out.copy_(self.table.index_select(0, ids.to(self.table.device)))


# --------------------------------------------------------------------------- memory server


def _session(token: str | None, retries: int) -> Any:
    """A keep-alive session that retries failed connections and busy answers, with backoff."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=retries, backoff_factor=0.1, status_forcelist=RETRY_STATUS,
                  allowed_methods=frozenset({"GET", "POST"}), raise_on_status=False)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    if token is not None:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def _send(session: Any, method: str, url: str, **kwargs: Any) -> Any:
    """``session.request``, a transport failure (no connection, timeout) as a
    :class:`RemoteStoreError` naming the URL."""
    import requests

    try:
        return session.request(method, url, **kwargs)
    except requests.RequestException as e:
        raise RemoteStoreError(None, f"{url}: no answer ({type(e).__name__}: {e})") from e


def _tables_info(session: Any, url: str, timeout: float) -> dict[str, Any]:
    response = _send(session, "GET", f"{url}/v1/tables", timeout=timeout)
    if response.status_code != 200:
        raise RemoteStoreError(response.status_code, response.text)
    return response.json()


class HttpRowStore(RowStore):
    """Table ``table`` of a memory server at ``url`` (``http://host:port``).

    Ids go out as raw little-endian int64 and rows come back as raw bytes read straight into
    the output tensor, over one keep-alive connection; requests above the server's limit are
    split. ``timeout``: seconds to connect, and between two reads of an answer. ``retries``:
    how often a request is sent again after a failed connection or a 429/502/503/504 answer
    (a fetch is idempotent). Not thread-safe: give each thread its own store.
    """

    def __init__(self, url: str, table: str, token: str | None = None,
                 timeout: float = 60.0, retries: int = 3) -> None:
        self.url, self.table, self.timeout = url.rstrip("/"), table, timeout
        self.session = _session(token, retries)
        info = _tables_info(self.session, self.url, timeout)
        if table not in info["tables"]:
            raise KeyError(f"no table {table!r} on {self.url}; tables: {list(info['tables'])}")
        spec = info["tables"][table]
        super().__init__(spec["n_rows"], spec["dim"], dtype_from_name(spec["dtype"]))
        self.max_ids = int(info["max_ids"])

    def _gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        for start in range(0, ids.numel(), self.max_ids):
            part = ids[start : start + self.max_ids]
            self._request(part, out[start : start + part.numel()])

    def _request(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        import requests
        from urllib3.exceptions import HTTPError

        url = f"{self.url}/v1/tables/{self.table}/fetch"
        response = _send(self.session, "POST", url,
                         data=ids.numpy().astype("<i8").tobytes(),
                         headers={"Content-Type": "application/octet-stream"}, stream=True,
                         timeout=self.timeout)
        with response:
            if response.status_code != 200:
                raise RemoteStoreError(response.status_code, response.text)
            shape = response.headers.get("X-Rows-Shape", "")
            dtype = response.headers.get("X-Rows-Dtype", "")
            if shape != f"{out.shape[0]},{out.shape[1]}" or dtype != dtype_name(self.dtype):
                raise RemoteStoreError(response.status_code, f"unexpected rows {dtype} [{shape}], "
                                       f"asked for {dtype_name(self.dtype)} {list(out.shape)}")
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            done = 0
            # urllib3's readinto reads a temporary of the size asked for, then copies it:
            # pieces keep that temporary small and in cache (226 MiB of rows over loopback:
            # 0.8-1.1 GB/s read whole, 1.5-1.6 GB/s in 1 MiB pieces, as fast as http.client)
            while done < len(view):
                try:
                    n = response.raw.readinto(view[done : done + READ_BYTES])
                except (HTTPError, requests.RequestException, OSError) as e:
                    raise RemoteStoreError(None, f"{url}: answer broken off after {done} of "
                                           f"{len(view)} bytes ({type(e).__name__}: {e})") from e
                if not n:
                    raise RemoteStoreError(response.status_code, f"response ended after {done} "
                                           f"of {len(view)} bytes")
                done += n

    def close(self) -> None:
        self.session.close()


class HttpBank:
    """The tables of a memory server, like :class:`~memtron.storage.bank.Bank` for an on-disk
    one."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0,
                 retries: int = 3) -> None:
        self.url, self.token, self.timeout, self.retries = url.rstrip("/"), token, timeout, retries
        with _session(token, retries) as session:
            self.info = _tables_info(session, self.url, timeout)

    @property
    def tables(self) -> list[str]:
        return list(self.info["tables"])

    def table(self, name: str) -> HttpRowStore:
        if name not in self.info["tables"]:
            raise KeyError(f"no table {name!r} on {self.url}; tables: {self.tables}")
        return HttpRowStore(self.url, name, self.token, self.timeout, self.retries)
