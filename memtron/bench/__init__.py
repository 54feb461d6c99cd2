"""Benchmark support: the shared harness of the bench/ scripts and `memtron bench report`."""
