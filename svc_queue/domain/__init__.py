"""The rules of queue, without I/O."""
