"""Storage: the bottom of the stack: row-block files, row stores, stores of explicit memories."""
