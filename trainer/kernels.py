"""Fused CPU kernels (kernels.cc), built for the installed TensorFlow.

Row-sparse table updates (RowSparseSgd, RowSparseAdagrad, RowSparseLazyAdam,
used by the optimizers of trainer/embedding.py), the lookup of table rows
(`gather`, used by EmbeddingTables in training) and matrix factorization's
score with its gradient (`biased_dot`, used by trainer/models/mf.py in
training). They are training-time only: exports and evaluation use
TensorFlow's ops, so a SavedModel never needs this library.

The ops must be compiled against the TensorFlow they run in, so they are
built on first use (about 12 s; `make` builds them at set-up with
`python -m trainer.kernels`) into the package's folder, or
`$XDG_CACHE_HOME/cf-trainer` if that is not writable, under a name keyed by
the source and the TensorFlow version. Without a C++ compiler (or with
CF_TRAINER_FUSED_KERNELS=0) `ops()` returns None, once says why, and training
uses TensorFlow's ops for the same mathematics, more slowly.
"""

import contextlib
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from absl import logging
import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops  # pylint: disable=g-direct-tensorflow-import

from trainer import strategy as strategy_lib

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "kernels.cc")
_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-O3", "-fno-math-errno",
          "-Wno-deprecated-declarations"]


@functools.lru_cache(maxsize=None)
def _key() -> str:
  """Of the source, the TensorFlow version and the flags: a library's name."""
  with open(_SOURCE, "rb") as f:
    return hashlib.sha1(f.read() + tf.__version__.encode() +
                        " ".join(_FLAGS).encode()).hexdigest()[:12]


def _library_path(directory: str) -> str:
  return os.path.join(directory, f"_kernels-{_key()}.so")


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
    logging.info("Building the fused kernels: %s", " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
      os.unlink(tmp)
      raise RuntimeError(f"compiling {_SOURCE} failed:\n{out.stderr[-2000:]}")
    path = _library_path(directory)
    os.replace(tmp, path)
    for old in glob.glob(os.path.join(directory, "_kernels-*.so")):
      if old != path:  # Built from an earlier source or for another TF.
        with contextlib.suppress(OSError):
          os.unlink(old)
    return path
  raise RuntimeError("no writable folder for the library: " + "; ".join(errors))


@functools.lru_cache(maxsize=None)
def ops():
  """The loaded op module, or None where the kernels cannot be built."""
  if os.environ.get("CF_TRAINER_FUSED_KERNELS", "1") == "0":
    return None
  try:
    module = tf.load_op_library(build())
  except (RuntimeError, OSError, tf.errors.NotFoundError) as e:
    logging.warning("Fused kernels unavailable (%s); training uses "
                    "TensorFlow's ops for the same mathematics, more slowly.",
                    e)
    return None

  @tf.RegisterGradient("BiasedDot")
  def _biased_dot_grad(op, grad):
    return module.biased_dot_grad(op.inputs[0], op.inputs[1], grad)

  @tf.RegisterGradient("RowGather")
  def _row_gather_grad(op, grad):
    # As ResourceGather's: the batch's rows of the table, duplicates and all.
    handle, indices = op.inputs
    return (tf.IndexedSlices(grad, indices,
                             resource_variable_ops.variable_shape(handle)),
            None)

  return module


def usable_here() -> bool:
  """Whether this process runs the ops it traces on its own CPU, with the
  kernels built: not under parameter servers (the servers and workers need
  not have built them) nor on GPUs or TPUs."""
  strategy = tf.distribute.get_strategy()
  if (strategy_lib.is_parameter_server(strategy) or
      strategy_lib.is_tpu(strategy) or tf.config.list_logical_devices("GPU")):
    return False
  return ops() is not None


def gather(table: tf.Variable, rows: tf.Tensor) -> tf.Tensor:
  """table[rows] for a plain variable and rows [B] (RowGather), differentiable
  with respect to the table as tf.gather is (IndexedSlices)."""
  resource_variable_ops.variable_accessed(table)  # So that tapes watch it.
  return ops().row_gather(table.handle, rows)


def biased_dot(u: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
  """<u[:, :-1], v[:, :-1]> + u[:, -1] + v[:, -1] per row: [B] (BiasedDot)."""
  return ops().biased_dot(u, v)


if __name__ == "__main__":
  print(build())
  sys.exit(0 if ops() is not None else 1)
