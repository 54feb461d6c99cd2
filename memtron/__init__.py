"""memtron: pretraining language models with large memory layers."""

__version__ = "0.1.0"
