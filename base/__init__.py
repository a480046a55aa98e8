"""The base layer: errors, time, keys and counters. Every other layer may import it; it imports nothing of
meterflow's own."""
