"""Benchmarks: throughput, model quality, and the hashing-vs-vocabulary study."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
