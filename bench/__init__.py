"""Benchmark harness: this service against the PyTorch service, Optimum's pipeline and the in-process limit."""
