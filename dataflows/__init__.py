"""Dataflows: thin wiring of sources, operators and sinks."""
