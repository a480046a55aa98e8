"""Typed records exchanged with the outside world: events, configuration, outputs."""
