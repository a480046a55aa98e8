"""Benchmarks: scripts that print throughput, latency and memory. Never part of the test suite."""
