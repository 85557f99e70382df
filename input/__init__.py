"""tf.data input pipelines and data tools (converters, vocabularies, synthetic logs)."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
