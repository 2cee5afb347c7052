"""Queue's I/O: storage and messaging."""
