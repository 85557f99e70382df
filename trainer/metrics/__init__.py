"""Exact full-catalog ranking metrics, shared by the trainer and the benchmarks."""
