"""Bytewax sources that emit ``(src, raw_bytes)`` pairs: ``src`` locates the record for dead letters."""
