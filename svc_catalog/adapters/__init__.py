"""Catalog's I/O: storage and messaging."""
