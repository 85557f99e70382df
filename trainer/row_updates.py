"""Fused row-sparse optimizer updates (row_updates.cc), built for the installed TF.

The ops must be compiled against the TensorFlow they run in, so they are
built on first use (about 10 s; `make` builds them at set-up with
`python -m trainer.row_updates`) into the package's folder, or
`$XDG_CACHE_HOME/cf-trainer` if that is not writable, under a name keyed by
the source and the TensorFlow version. Without a C++ compiler (or with
CF_TRAINER_NATIVE_UPDATES=0) `ops()` returns None, once says why, and the
optimizers in trainer/embedding.py update rows with TensorFlow's own ops:
the same mathematics, about 3x slower per table update.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from absl import logging
import tensorflow as tf

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "row_updates.cc")
_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-O3", "-fno-math-errno",
          "-Wno-deprecated-declarations"]


def _library_path(directory: str) -> str:
  with open(_SOURCE, "rb") as f:
    key = hashlib.sha1(f.read() + tf.__version__.encode() +
                       " ".join(_FLAGS).encode()).hexdigest()[:12]
  return os.path.join(directory, f"_row_updates-{key}.so")


def _directories():
  yield os.path.dirname(_SOURCE)
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  yield os.path.join(cache, "cf-trainer")


def build() -> str:
  """Compiles the ops if no library for this source and TF exists; its path."""
  for directory in _directories():
    path = _library_path(directory)
    if os.path.exists(path):
      return path
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not compiler:
    raise RuntimeError("no C++ compiler (c++, g++ or $CXX) found")
  errors = []
  for directory in _directories():
    try:
      os.makedirs(directory, exist_ok=True)
      # Built under a temporary name, then renamed: processes starting
      # together (workers of one job) never load a half-written library.
      fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
      os.close(fd)
    except OSError as e:
      errors.append(f"{directory}: {e}")
      continue
    cmd = [compiler, *_FLAGS, *tf.sysconfig.get_compile_flags(), _SOURCE,
           "-o", tmp, *tf.sysconfig.get_link_flags()]
    logging.info("Building the fused row updates: %s", " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
      os.unlink(tmp)
      raise RuntimeError(f"compiling {_SOURCE} failed:\n{out.stderr[-2000:]}")
    path = _library_path(directory)
    os.replace(tmp, path)
    return path
  raise RuntimeError("no writable folder for the library: " + "; ".join(errors))


@functools.lru_cache(maxsize=None)
def ops():
  """The loaded op module (row_sparse_sgd, _adagrad, _lazy_adam) or None."""
  if os.environ.get("CF_TRAINER_NATIVE_UPDATES", "1") == "0":
    return None
  try:
    return tf.load_op_library(build())
  except (RuntimeError, OSError, tf.errors.NotFoundError) as e:
    logging.warning("Fused row updates unavailable (%s); using TensorFlow's "
                    "ops for the same updates, more slowly.", e)
    return None


if __name__ == "__main__":
  print(build())
  sys.exit(0 if ops() is not None else 1)
