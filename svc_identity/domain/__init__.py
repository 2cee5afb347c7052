"""The rules of identity, without I/O."""
