"""Each table optimizer against its update computed by hand, duplicate rows included.

The row-sparse optimizers run in two ways: with the fused ops of
trainer/kernels.cc (built for the installed TensorFlow) and with
TensorFlow's own ops; both are checked against numpy here (and against each
other on large batches in test_kernels.py). Under CI the fused ops must have
been built.
"""

import contextlib
import os
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from trainer import embedding
from trainer import kernels

LR = 0.1


def _steps():
  """Two sparse gradients of a 4 x 2 table; row 1 twice in the first."""
  return [(np.array([1, 3, 1]), np.array([[1.0, 2.0], [0.5, -1.0],
                                          [3.0, 0.0]])),
          (np.array([0, 1]), np.array([[-1.0, 1.0], [2.0, 2.0]]))]


def _dense(indices, values):
  g = np.zeros((4, 2))
  np.add.at(g, indices, values)  # Duplicates add up.
  return g, np.unique(indices)


def _by_hand(name, start, epsilon=1e-7):
  """numpy updates of Keras' mathematics."""
  var = start.copy()
  acc = np.full_like(var, 1e-6)
  m, v = np.zeros_like(var), np.zeros_like(var)
  for t, (idx, vals) in enumerate(_steps(), start=1):
    g, rows = _dense(idx, vals)
    if name == "sgd":
      var -= LR * g
    elif name == "adagrad":
      acc[rows] += g[rows] ** 2
      var[rows] -= LR * g[rows] / np.sqrt(acc[rows] + epsilon)
    else:  # adam, lazy_adam (b1 0.9, b2 0.999, eps 1e-7)
      alpha = LR * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
      touched = rows if name == "lazy_adam" else np.arange(4)
      m[touched] = 0.9 * m[touched] + 0.1 * g[touched]
      v[touched] = 0.999 * v[touched] + 0.001 * g[touched] ** 2
      var[touched] -= alpha * m[touched] / (np.sqrt(v[touched]) + 1e-7)
  return var


def fused_kernels(on: bool):
  """Context: the optimizers with (on) or without the fused row updates."""
  if on:
    if kernels.ops() is None:
      raise AssertionError("the fused row updates were not built")
    return contextlib.nullcontext()
  return mock.patch.object(kernels, "ops", lambda: None)


def _op_types(fn, *args):
  return {op.type for op in fn.get_concrete_function(*args).graph.get_operations()}


class OptimizerMathTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(name=("adagrad", "sgd", "lazy_adam", "adam"),
                         fused=(True, False), index_dtype=(tf.int64, tf.int32))
  def test_two_steps_with_duplicate_rows(self, name, fused, index_dtype):
    if fused and kernels.ops() is None and not os.environ.get("CI"):
      self.skipTest("fused row updates not built (no C++ compiler)")
    start = np.arange(8, dtype=np.float64).reshape(4, 2) / 10
    var = tf.Variable(start.astype(np.float32))
    opt = embedding.make_optimizer(name, LR, initial_accumulator=1e-6)

    @tf.function
    def apply(indices, values):
      opt.apply_gradients([(tf.IndexedSlices(
          values, indices, tf.constant([4, 2], tf.int64)), var)])

    with fused_kernels(fused):
      for indices, values in _steps():
        args = (tf.constant(indices, index_dtype),
                tf.constant(values, tf.float32))
        apply(*args)
      types = _op_types(apply, *args)
    fused_op = {"adagrad": "RowSparseAdagrad", "sgd": "RowSparseSgd",
                "lazy_adam": "RowSparseLazyAdam"}.get(name)
    # The path under test is the one that ran (Keras Adam has no fused op).
    self.assertEqual(fused_op in types, bool(fused and fused_op))
    self.assertAllClose(var.numpy(), _by_hand(name, start), rtol=1e-5,
                        atol=1e-5)

  def test_adagrad_keeps_epsilon_inside_the_square_root(self):
    # A large epsilon makes sqrt(acc + eps) and sqrt(acc) + eps differ.
    start = np.arange(8, dtype=np.float64).reshape(4, 2) / 10
    var = tf.Variable(start.astype(np.float32))
    opt = embedding.SparseAdagrad(LR, initial_accumulator_value=1e-6,
                                  epsilon=0.5)
    for indices, values in _steps():
      opt.apply_gradients([(tf.IndexedSlices(
          tf.constant(values, tf.float32), tf.constant(indices, tf.int64),
          tf.constant([4, 2], tf.int64)), var)])
    self.assertAllClose(var.numpy(), _by_hand("adagrad", start, 0.5),
                        rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  tf.test.main()
