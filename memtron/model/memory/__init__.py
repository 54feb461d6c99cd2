"""Memory layers: product-key memories and their value tables."""
