"""Identity's I/O: storage and messaging."""
