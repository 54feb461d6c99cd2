"""What the network computes, with single-process semantics."""
