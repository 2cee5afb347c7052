"""The rules of catalog, without I/O."""
