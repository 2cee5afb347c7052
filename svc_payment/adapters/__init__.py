"""Payment's I/O: storage and messaging."""
