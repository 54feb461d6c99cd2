"""``memtron serve-memory``: an HTTP fetch service over an on-disk bank (DESIGN §11).

Inference workers that share one memory server fetch rows by id instead of each holding the
tables. Endpoints:

* ``GET /health`` -> ``{"status": "ok"}`` (no token needed, for liveness probes);
* ``GET /v1/tables`` -> ``{"max_ids": M, "tables": {name: {"n_rows", "dim", "dtype"}}}``;
* ``POST /v1/tables/{name}/fetch``, body = raw little-endian int64 ids
  (``Content-Type: application/octet-stream``) -> the rows' raw bytes, row-major, with headers
  ``X-Rows-Dtype`` (e.g. ``float32``) and ``X-Rows-Shape`` (``M,dim``).

Every request is validated before any work, answering a plain-text message: 401 missing or
wrong bearer token (when the server has one), 404 unknown table, 415 wrong content type, 400
empty / not a multiple of 8 bytes / ids out of range, 413 more than ``max_ids`` ids. Each worker
process opens the bank's memory maps once; the gathers run in a thread pool (torch releases the
GIL), so the event loop keeps reading requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from memtron.storage.bank import open_bank
from memtron.storage.rowblock import dtype_name
from memtron.storage.store import check_ids

DEFAULT_PORT = 8421
DEFAULT_MAX_IDS = 1 << 18  # 2 MiB of ids per request; clients split larger fetches
# Environment that carries serve()'s arguments to uvicorn's worker processes (app_from_env).
ENV_BANK, ENV_TOKEN, ENV_MAX_IDS = "MEMTRON_SERVE_BANK", "MEMTRON_SERVE_TOKEN", \
    "MEMTRON_SERVE_MAX_IDS"
OCTET = "application/octet-stream"
# Rows go out in pieces of this size: one large write would sit in asyncio's transport buffer,
# which (Python < 3.12) memmoves its remaining bytes after every socket send.
SEND_BYTES = 1 << 20
GATHER_BYTES = 16 << 20  # rows gathered per thread-pool call, overlapped with sending
IDLE_BUFFERS = 4  # response buffers a worker keeps for reuse


class _Buffers:
    """Reusable response buffers. Fresh memory costs a page fault per 4 KiB on first touch
    (gathering 226 MiB of rows: ~1-3 GB/s into fresh pages, ~8 GB/s into reused ones, see
    bench/memory_fetch.py), so a response borrows an idle buffer until its last byte is sent;
    at most ``keep`` idle ones are kept."""

    def __init__(self, keep: int) -> None:
        self.keep, self.idle, self.lock = keep, [], threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            fitting = [i for i, b in enumerate(self.idle) if b.numel() >= nbytes]
            if fitting:
                return self.idle.pop(min(fitting, key=lambda i: self.idle[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self.lock:
            self.idle.append(buffer)
            if len(self.idle) > self.keep:  # drop the smallest
                self.idle.pop(min(range(len(self.idle)), key=lambda i: self.idle[i].numel()))


def create_app(bank_dir: str | Path, token: str | None = None,
               max_ids: int = DEFAULT_MAX_IDS) -> FastAPI:
    """The FastAPI app serving ``bank_dir``; opens the bank's tables now."""
    if max_ids < 1:
        raise ValueError(f"max_ids must be >= 1, got {max_ids}")
    if token == "":
        raise ValueError("token must not be empty (pass None to serve without one)")
    bank = open_bank(bank_dir)
    stores = {name: bank.table(name) for name in bank.tables}
    tables = {"max_ids": max_ids,
              "tables": {name: {"n_rows": s.n_rows, "dim": s.dim, "dtype": dtype_name(s.dtype)}
                         for name, s in stores.items()}}
    expected_auth = f"Bearer {token}".encode() if token is not None else None
    max_bytes = max_ids * 8
    buffers = _Buffers(IDLE_BUFFERS)
    app = FastAPI(title="memtron memory server", docs_url=None, redoc_url=None,
                  openapi_url=None)

    def unauthorized(request: Request) -> Response | None:
        """401 unless the request carries the bearer token (when the server has one)."""
        given = request.headers.get("authorization", "").encode()
        if expected_auth is None or hmac.compare_digest(given, expected_auth):
            return None
        return PlainTextResponse("missing or wrong bearer token", status_code=401,
                                 headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/tables")
    async def list_tables(request: Request) -> Response:
        return unauthorized(request) or JSONResponse(tables)

    @app.post("/v1/tables/{name}/fetch")
    async def fetch(name: str, request: Request) -> Response:
        def error(status: int, message: str) -> Response:
            return PlainTextResponse(message, status_code=status)

        denied = unauthorized(request)
        if denied is not None:
            return denied
        store = stores.get(name)
        if store is None:
            return error(404, f"no table {name!r}; tables: {list(stores)}")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != OCTET:
            return error(415, f"content type must be {OCTET} (raw little-endian int64 ids), "
                              f"got {media or 'none'!r}")
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            return error(400, f"bad Content-Length {length!r}")
        too_many = f"more than {max_ids} ids in one request (split it)"
        if length is not None and int(length) > max_bytes:
            return error(413, too_many)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_bytes:
                return error(413, too_many)
        if not body:
            return error(400, "empty body: send raw little-endian int64 ids")
        if len(body) % 8:
            return error(400, f"body of {len(body)} bytes is not a whole number of int64 ids")
        try:
            ids = check_ids(torch.frombuffer(body, dtype=torch.int64), store.n_rows)
        except IndexError as e:
            return error(400, str(e))
        row_bytes = store.dim * store.dtype.itemsize
        nbytes = ids.numel() * row_bytes
        buffer = buffers.take(nbytes)
        rows = buffer[:nbytes].view(store.dtype).view(ids.numel(), store.dim)
        payload = memoryview(buffer.numpy())
        step = max(1, GATHER_BYTES // row_bytes)  # rows per gathered piece

        def gather(start: int) -> asyncio.Future[torch.Tensor]:
            stop = min(ids.numel(), start + step)
            return asyncio.ensure_future(
                run_in_threadpool(store.fetch, ids[start:stop], rows[start:stop]))

        async def pieces() -> AsyncIterator[memoryview]:
            """Gathers piece k + 1 (in a thread) while piece k is being sent."""
            pending = gather(0)
            try:
                for start in range(0, ids.numel(), step):
                    await pending
                    if start + step < ids.numel():
                        pending = gather(start + step)
                    end = min(ids.numel(), start + step) * row_bytes
                    for offset in range(start * row_bytes, end, SEND_BYTES):
                        yield payload[offset : min(end, offset + SEND_BYTES)]
            finally:
                await asyncio.wait([pending])  # never recycle a buffer a thread still fills
                buffers.give(buffer)

        return StreamingResponse(pieces(), media_type=OCTET, headers={
            "Content-Length": str(nbytes), "X-Rows-Dtype": dtype_name(store.dtype),
            "X-Rows-Shape": f"{ids.numel()},{store.dim}"})

    return app


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes: the arguments come from the environment
    :func:`serve` set (``uvicorn --factory memtron.infer.server:app_from_env``)."""
    token = os.environ.get(ENV_TOKEN) or None
    return create_app(os.environ[ENV_BANK], token,
                      int(os.environ.get(ENV_MAX_IDS, DEFAULT_MAX_IDS)))


def serve(bank_dir: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          workers: int = 1, token: str | None = None, max_ids: int = DEFAULT_MAX_IDS) -> None:
    """Serve ``bank_dir`` until interrupted; ``workers`` processes share the port."""
    open_bank(bank_dir)  # fail here, naming the file, rather than in every worker
    os.environ[ENV_BANK] = str(Path(bank_dir).resolve())
    os.environ[ENV_MAX_IDS] = str(max_ids)
    os.environ.pop(ENV_TOKEN, None)
    if token is not None:
        os.environ[ENV_TOKEN] = token
    uvicorn.run("memtron.infer.server:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level="warning", access_log=False)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(bank_dir: str | Path, token: str | None = None,
                   max_ids: int = DEFAULT_MAX_IDS, workers: int = 1,
                   start_timeout_s: float = 60) -> Iterator[str]:
    """``memtron serve-memory`` in a child process on a free loopback port, for tests,
    benchmarks and notebooks: yields its URL once ``/health`` answers, stops it on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "memtron.cli", "serve-memory", "--rows", str(bank_dir), "--port",
           str(port), "--max-ids", str(max_ids), "--workers", str(workers)]
    env = dict(os.environ)
    if token is not None:
        env["MEMTRON_MEMORY_TOKEN"] = token
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"memory server exited ({proc.returncode}): "
                                   f"{proc.stdout.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"memory server not up after {start_timeout_s} s")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
