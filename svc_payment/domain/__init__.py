"""The rules of payment, without I/O."""
