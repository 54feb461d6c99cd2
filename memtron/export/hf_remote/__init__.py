"""Remote code of exported memtron models: copied next to the weights by ``memtron export hf``
and loaded by ``transformers`` with ``trust_remote_code=True``, together with
:mod:`memtron.storage.rowblock` (copied as ``rowblock.py``, the bank reader the model imports).
These files import only torch, transformers and the standard library, so they work where
memtron is not installed."""
