"""Data: tokenizers, the synthetic facts corpus, shard preparation and the resumable loader.

Import the submodules directly (``memtron.data.loader``...): this package imports nothing, so
that reading a tokenizer does not pull in torch.
"""
