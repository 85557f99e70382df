"""Test set-up: TFRS needs Keras 2, so select tf_keras before TF is imported."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_collection_modifyitems(config, items):
  # tf.test.TestCase.test_session is a deprecated helper pytest collects as a
  # test (and TF skips); deselect it so skip counts mean something.
  del config
  items[:] = [item for item in items if item.name != "test_session"]
