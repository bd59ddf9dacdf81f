"""Helpers shared by the tests and the benchmarks (images, free ports, waiting for a node)."""
