"""Booking's I/O: storage and messaging."""
