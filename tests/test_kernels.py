"""The fused CPU kernels (trainer/kernels.cc) against TensorFlow's ops.

Under CI the kernels must have been built; elsewhere these tests are skipped
when no C++ compiler could build them.
"""

import os

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tests.test_optimizers import fused_kernels
from trainer import config as config_lib
from trainer import embedding
from trainer import kernels
from trainer import models


def _require_kernels(test):
  if kernels.ops() is None:
    if os.environ.get("CI"):
      raise AssertionError("the fused kernels were not built")
    test.skipTest("fused kernels not built (no C++ compiler)")


class FusedRowUpdatesTest(tf.test.TestCase, parameterized.TestCase):
  """The fused ops against TensorFlow's ops, on a batch the size of training's."""

  def setUp(self):
    super().setUp()
    _require_kernels(self)

  def _run(self, name, fused, steps, rows=5000, dim=33):
    rng = np.random.default_rng(3)
    var = tf.Variable(rng.standard_normal((rows, dim)).astype(np.float32))
    opt = embedding.make_optimizer(name, 0.05, initial_accumulator=1e-6)

    @tf.function
    def apply(indices, values):
      opt.apply_gradients([(tf.IndexedSlices(values, indices), var)])

    with fused_kernels(fused):
      for indices, values in steps:
        apply(tf.constant(indices), tf.constant(values))
    return var.numpy()

  @parameterized.parameters("adagrad", "sgd", "lazy_adam")
  def test_same_tables_as_tensorflows_ops(self, name):
    rng = np.random.default_rng(0)
    # 4,096 rows per step over 5,000 rows, Zipf-like: most rows repeat, some
    # dozens of times, and each step touches rows the earlier ones did.
    steps = [((rng.zipf(1.3, 4096) - 1) % 5000,
              rng.standard_normal((4096, 33)).astype(np.float32) / 10)
             for _ in range(5)]
    fused, ops = self._run(name, True, steps), self._run(name, False, steps)
    self.assertGreater(np.abs(fused - self._run(name, True, steps[:0])).max(),
                       1e-3)  # The steps changed the table.
    self.assertAllClose(fused, ops, rtol=1e-5, atol=1e-5)

  def test_index_outside_the_table_fails_and_writes_nothing(self):
    var = tf.Variable(tf.ones([4, 2]))
    acc = tf.Variable(tf.ones([4, 2]))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                "Index 4 at position 2 is outside"):
      kernels.ops().row_sparse_adagrad(
          var.handle, acc.handle, tf.constant([0, 1, 4]), tf.ones([3, 2]),
          tf.constant(0.1))
    self.assertAllEqual(var.numpy(), np.ones([4, 2]))
    self.assertAllEqual(acc.numpy(), np.ones([4, 2]))

  def test_wrong_gradient_shape_fails(self):
    var = tf.Variable(tf.ones([4, 2]))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r"grad must be \[3, 2\]"):
      kernels.ops().row_sparse_sgd(var.handle, tf.constant([0, 1, 2]),
                                       tf.ones([3, 3]), tf.constant(0.1))

  def test_a_value_read_before_the_update_keeps_its_rows(self):
    var = tf.Variable(tf.ones([4, 2]))
    before = var.read_value()
    kernels.ops().row_sparse_sgd(var.handle, tf.constant([1, 1]),
                                     tf.ones([2, 2]), tf.constant(0.5))
    self.assertAllEqual(before.numpy(), np.ones([4, 2]))
    self.assertAllEqual(var.numpy()[1], [0.0, 0.0])  # 1 - 0.5 * (1 + 1).
    kernels.ops().row_sparse_sgd(var.handle, tf.zeros([0], tf.int32),
                                     tf.zeros([0, 2]), tf.constant(0.5))
    self.assertAllEqual(var.numpy()[0], [1.0, 1.0])


class BiasedDotTest(tf.test.TestCase, parameterized.TestCase):
  """Matrix factorization's fused score and gradient."""

  def setUp(self):
    super().setUp()
    _require_kernels(self)

  def _model(self, dim):
    tables = tuple(config_lib.TableConfig(f, num_bins=50, salt=i + 1)
                   for i, f in enumerate(("user_id", "item_id")))
    return models.build_model(config_lib.validate(config_lib.Config(
        data=config_lib.DataConfig(train_files=("x",)),
        model=config_lib.ModelConfig(embedding_dim=dim, tables=tables),
        runtime=config_lib.RuntimeConfig(model_dir="unused"))))

  @parameterized.parameters(1, 8, 32, 37)
  def test_score_and_gradient_match_tensorflows_ops(self, dim):
    model = self._model(dim)
    model.global_bias.assign(0.25)
    rng = np.random.default_rng(dim)
    emb = {f: tf.constant(rng.standard_normal((4099, dim + 1)), tf.float32)
           for f in ("user_id", "item_id")}
    weights = tf.constant(rng.standard_normal(4099), tf.float32)
    results = []
    for on in (True, False):
      with tf.GradientTape() as tape:
        tape.watch(list(emb.values()))
        score = model.score_logits(emb, fused=on)
        total = tf.reduce_sum(weights * score)
      results.append([score, *tape.gradient(total, list(emb.values()))])
    for got, want in zip(*results):
      self.assertAllClose(got, want, rtol=1e-5, atol=1e-5)
    u, v = (emb[f].numpy().astype(np.float64) for f in ("user_id", "item_id"))
    by_hand = (u[:, :-1] * v[:, :-1]).sum(1) + u[:, -1] + v[:, -1] + 0.25
    self.assertAllClose(results[0][0], by_hand, rtol=1e-5, atol=1e-5)
    # d score / d u = (v's factors, 1 for the bias slot), times the weight.
    self.assertAllClose(results[0][1][:, -1], weights)
    self.assertAllClose(results[0][1][:, :-1],
                        weights.numpy()[:, None] * v[:, :-1], rtol=1e-6)

  def test_training_fuses_and_serving_does_not(self):
    model = self._model(8)
    model.compile(optimizer=embedding.make_optimizer("adagrad", 0.1))
    ids = {"user_id": tf.constant([1, 2, 3], tf.int64),
           "item_id": tf.constant([4, 5, 4], tf.int64)}
    labels = tf.constant([1.0, 0.0, 1.0])
    train = tf.function(model.train_step).get_concrete_function(
        (ids, labels))
    serve = tf.function(model.call).get_concrete_function(ids)
    train_ops = {op.type for op in train.graph.get_operations()}
    serve_ops = {op.type for op in serve.graph.get_operations()}
    self.assertIn("RowGather", train_ops)
    self.assertIn("BiasedDot", train_ops)
    self.assertIn("RowSparseAdagrad", train_ops)
    # Exports never need the library.
    self.assertFalse({"RowGather", "BiasedDot", "RowSparseAdagrad"} &
                     serve_ops)

  @parameterized.parameters(tf.int32, tf.int64)
  def test_gather_and_its_gradient_match_tf_gather(self, index_dtype):
    rng = np.random.default_rng(1)
    table = tf.Variable(rng.standard_normal((1000, 33)), dtype=tf.float32)
    rows = tf.constant((rng.zipf(1.3, 4096) - 1) % 1000, index_dtype)
    weights = tf.constant(rng.standard_normal((4096, 33)), tf.float32)
    results = []
    for fn in (kernels.gather, tf.gather):
      with tf.GradientTape() as tape:
        got = fn(table, rows)
        total = tf.reduce_sum(weights * got)
      grad = tape.gradient(total, table)
      results.append((got, tf.convert_to_tensor(grad)))
    self.assertAllEqual(results[0][0], results[1][0])
    self.assertAllClose(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                "Index 1000 at position 1 is outside"):
      kernels.gather(table, tf.constant([3, 1000], index_dtype))

  def test_mf_training_matches_tensorflows_ops(self):
    rng = np.random.default_rng(2)
    batches = [({"user_id": tf.constant(rng.integers(0, 300, 512)),
                 "item_id": tf.constant(rng.zipf(1.3, 512) % 200)},
                tf.constant((rng.random(512) < 0.3).astype(np.float32)))
               for _ in range(6)]
    tables, losses = [], []
    for on in (True, False):
      model = self._model(16)
      model.compile(optimizer=embedding.make_optimizer("adagrad", 0.1))
      step = tf.function(model.train_step)
      with fused_kernels(on):
        losses.append([float(step(b)["loss"]) for b in batches])
        ops = {op.type for op in step.get_concrete_function(
            batches[0]).graph.get_operations()}
      self.assertEqual("RowGather" in ops, on)
      tables.append({f: t.numpy() for f, t in model.embedding.tables().items()})
    self.assertAllClose(losses[0], losses[1], rtol=1e-5)
    self.assertGreater(losses[0][0] - losses[0][-1], 0.01)  # It learns.
    for f in tables[0]:
      self.assertAllClose(tables[0][f], tables[1][f], rtol=1e-5, atol=1e-6)

  def test_mismatched_shapes_fail(self):
    with self.assertRaisesRegex((tf.errors.InvalidArgumentError, ValueError),
                                "Shape|shape"):
      kernels.biased_dot(tf.ones([3, 4]), tf.ones([3, 5]))


if __name__ == "__main__":
  tf.test.main()
