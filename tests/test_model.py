"""Embedding seam and model tests with hand-computed numbers."""

import os

import numpy as np
import tensorflow as tf
import tf_keras

from trainer import config as config_lib
from trainer import embedding
from trainer.models import mf as model_lib


def tiny_config(**model_fields):
  tables = (config_lib.TableConfig("user_id", num_bins=2, salt=1),
            config_lib.TableConfig("item_id", num_bins=3, salt=2))
  return config_lib.Config(
      data=config_lib.DataConfig(train_files=("x",)),
      model=config_lib.ModelConfig(embedding_dim=2, tables=tables,
                                   **model_fields))


class IdLookupTest(tf.test.TestCase):

  def test_int_hash_is_deterministic_in_range_and_salted(self):
    ids = tf.range(10000, dtype=tf.int64)
    a = embedding.hash_int64(ids, salt=1) % 97
    self.assertAllEqual(a, embedding.hash_int64(ids, salt=1) % 97)
    self.assertNotAllEqual(a, embedding.hash_int64(ids, salt=2) % 97)
    self.assertAllGreaterEqual(embedding.hash_int64(ids, salt=1), 0)
    # Consecutive IDs spread evenly: every bucket within 25% of 10000 / 97.
    counts = np.bincount(a.numpy(), minlength=97)
    self.assertAllInRange(counts, 0.75 * 10000 / 97, 1.25 * 10000 / 97)

  def test_hash_lookup_for_int_and_string_ids(self):
    table = config_lib.TableConfig("user_id", num_bins=5, salt=3)
    for dtype, ids in (("int64", tf.constant([1, 2, 1], tf.int64)),
                       ("string", tf.constant(["a", "b", "a"]))):
      rows = embedding.IdLookup(table, "hash", dtype)(ids)[0].numpy()
      self.assertEqual(rows[0], rows[2])
      self.assertAllInRange(rows, 0, 4)

  def test_vocab_lookup_puts_unknown_ids_in_oov_rows(self):
    path = os.path.join(self.get_temp_dir(), "v.txt")
    with open(path, "w") as f:
      f.write("42\n7\n")
    table = config_lib.TableConfig("item_id", vocab_file=path, num_oov=1)
    lookup = embedding.IdLookup(table, "vocab", "int64")
    self.assertEqual(lookup.num_rows, 3)
    # Row 0 is the OOV row; the vocabulary follows in file order.
    self.assertAllEqual(lookup(tf.constant([42, 7, 999], tf.int64))[0],
                        [1, 2, 0])


class TablesTest(tf.test.TestCase):

  def test_two_hashes_sum_two_rows_of_one_table(self):
    table = config_lib.TableConfig("user_id", num_bins=1000, salt=1,
                                   num_hashes=2)
    lookup = embedding.IdLookup(table, "hash", "int64")
    ids = tf.constant([3, 4], tf.int64)
    first, second = lookup(ids)
    self.assertNotAllEqual(first, second)
    tables = embedding.EmbeddingTables([table], {"user_id": 1000}, 3, seed=0,
                                       num_hashes={"user_id": 2})
    self.assertLen(tables.tables(), 1)  # Same memory as one hash.
    t = tables.tables()["user_id"].numpy()
    self.assertAllClose(tables({"user_id": [first, second]})["user_id"],
                        t[first.numpy()] + t[second.numpy()])

  def test_tables_are_distinct_and_bias_slot_starts_at_zero(self):
    config = tiny_config()
    tables = embedding.EmbeddingTables(config.model.tables,
                                       {"user_id": 50, "item_id": 50}, 4,
                                       seed=0)
    t = {k: v.numpy() for k, v in tables.tables().items()}
    self.assertEqual(t["user_id"].shape, (50, 5))
    self.assertAllEqual(t["user_id"][:, -1], np.zeros(50))
    self.assertNotAllClose(t["user_id"], t["item_id"])
    self.assertNear(t["user_id"][:, :-1].std(), 0.05 * 0.88, 0.01)

  def test_lazy_adam_updates_only_touched_rows(self):
    var = tf.Variable(tf.ones([4, 2]))
    opt = embedding.LazyAdam(0.1)
    grad = tf.IndexedSlices(tf.constant([[1.0, -1.0], [1.0, -1.0]]),
                            tf.constant([1, 1]), tf.constant([4, 2]))
    opt.apply_gradients([(grad, var)])
    # First Adam step moves a touched weight by lr * sign(g): duplicated
    # indices are summed first (g = 2, -2). Untouched rows stay at 1.
    self.assertAllClose(var.numpy(), [[1, 1], [0.9, 1.1], [1, 1], [1, 1]])

  def test_sparse_sgd_moves_touched_rows_by_lr_times_gradient(self):
    var = tf.Variable(tf.ones([3, 2]))
    opt = embedding.make_optimizer("sgd", 0.5)
    grad = tf.IndexedSlices(tf.constant([[1.0, 2.0], [1.0, 0.0]]),
                            tf.constant([2, 2]), tf.constant([3, 2]))
    opt.apply_gradients([(grad, var)])
    # Row 2: 1 - 0.5 * (1 + 1), 1 - 0.5 * (2 + 0); rows 0 and 1 untouched.
    self.assertAllClose(var.numpy(), [[1, 1], [1, 1], [0, 0]])
    self.assertEmpty([v for v in opt.variables if v.shape == var.shape])

  def test_keras_adam_touches_every_row(self):
    # The reason LazyAdam exists: Keras Adam decays all moments every step.
    var = tf.Variable(tf.ones([3, 1]))
    opt = tf_keras.optimizers.Adam(0.1)
    for row in (0, 1):
      opt.apply_gradients([(tf.IndexedSlices(tf.constant([[1.0]]),
                                             tf.constant([row]),
                                             tf.constant([3, 1])), var)])
    self.assertNotAllClose(var.numpy()[0], [0.9])  # Moved again at step 2.


class MatrixFactorizationTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.model = model_lib.MatrixFactorization(tiny_config())
    tables = self.model.embedding.tables()
    # Rows are [f1, f2, bias].
    tables["user_id"].assign([[1.0, 2.0, 0.5], [0.0, 1.0, -1.0]])
    tables["item_id"].assign([[3.0, 1.0, 0.25], [1.0, -1.0, 0.0],
                              [0.0, 0.0, 2.0]])
    self.model.global_bias.assign(0.1)

  def rows(self, ids, feature):
    return self.model.lookups[feature](tf.constant(ids, tf.int64))[0].numpy()

  def test_score_is_dot_plus_biases(self):
    users, items = [5, 6, 7], [1, 2, 3]
    u, v = self.rows(users, "user_id"), self.rows(items, "item_id")
    user_t = np.array([[1.0, 2.0, 0.5], [0.0, 1.0, -1.0]])
    item_t = np.array([[3.0, 1.0, 0.25], [1.0, -1.0, 0.0], [0.0, 0.0, 2.0]])
    # e.g. user row 0, item row 0: 1*3 + 2*1 + 0.5 + 0.25 + 0.1 = 5.85.
    expected = [user_t[a, :2] @ item_t[b, :2] + user_t[a, 2] + item_t[b, 2]
                + 0.1 for a, b in zip(u, v)]
    logits = self.model({"user_id": tf.constant(users, tf.int64),
                         "item_id": tf.constant(items, tf.int64)})
    self.assertAllClose(logits, expected)

  def test_loss_is_mean_binary_cross_entropy(self):
    feats = {"user_id": tf.constant([5, 6], tf.int64),
             "item_id": tf.constant([1, 2], tf.int64)}
    labels = tf.constant([1.0, 0.0])
    z = self.model(feats).numpy()
    p = 1 / (1 + np.exp(-z))
    expected = -(np.log(p[0]) + np.log(1 - p[1])) / 2
    loss = self.model.compute_loss((feats, labels), training=True)
    self.assertAllClose(loss, expected, rtol=1e-5)

  def test_l2_adds_squared_norm_of_used_rows(self):
    plain = model_lib.MatrixFactorization(tiny_config())
    model = model_lib.MatrixFactorization(config_lib.replace(
        tiny_config(), model=dict(tables=tuple(
            config_lib.TableConfig(t.feature, num_bins=t.num_bins, salt=t.salt,
                                   l2=0.5) for t in tiny_config().model.tables))))
    for m in (model, plain):
      for t in m.embedding.tables().values():
        t.assign(tf.ones_like(t))
    feats = {"user_id": tf.constant([5], tf.int64),
             "item_id": tf.constant([1], tf.int64)}
    labels = tf.constant([1.0])
    # Each row is three ones: 0.5 * 3 (user) + 0.5 * 3 (item) = 3.
    self.assertAllClose(
        model.compute_loss((feats, labels), training=True) -
        plain.compute_loss((feats, labels), training=True), 3.0)


if __name__ == "__main__":
  tf.test.main()
