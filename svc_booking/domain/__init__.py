"""The rules of booking, without I/O."""
