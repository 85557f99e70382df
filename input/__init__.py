"""tf.data input pipelines and data tools (converters, vocabularies, synthetic logs)."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TF's C++ logging at ERROR level is noise for users here (rebatching shuffled
# slices logs a line per batch when it copies instead of forwarding a buffer);
# real failures still raise Python exceptions. Set it yourself to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
