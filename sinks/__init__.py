"""Bytewax sinks, one module per destination. Each docstring states its delivery guarantee."""
