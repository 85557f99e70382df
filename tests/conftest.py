"""Test set-up: TFRS needs Keras 2, so select tf_keras before TF is imported."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
