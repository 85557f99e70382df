"""Collaborative-filtering trainer: model, embedding tables and training loop."""
import os

# TFRS 0.7 is written against Keras 2; this must be set before TF is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
