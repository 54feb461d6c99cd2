"""The bottom of the stack (DESIGN §1, §9, §11): everything memtron keeps on disk or fetches.

* :mod:`~memtron.storage.rowblock`: the row-block file format, its one writer and one reader
  (torch and the standard library only: exported models carry a copy);
* :mod:`~memtron.storage.bank`: banks (tables of row-block files + a manifest with checksums),
  written from streams of rows, served memory-mapped;
* :mod:`~memtron.storage.store`: ``RowStore.fetch(ids) -> rows`` over RAM, a bank, or a memory
  server over HTTP (timeouts and retries);
* :mod:`~memtron.storage.manifest`: checksums and checkpoint manifests;
* :mod:`~memtron.storage.checkpoint`: checkpoint tensors by row range through DCP's public API;
* :mod:`~memtron.storage.explicit`: stores of explicit memories (a bank) and their codecs.

It imports only :mod:`memtron.config` of memtron.
"""
