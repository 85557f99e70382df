"""What batches are made of: exact positive share, mixing of sorted logs, negatives."""

import gzip
import os
import unittest

import numpy as np
from scipy import stats as scipy_stats
import tensorflow as tf

from input import csv_dataset
from input import movielens
from trainer import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ML100K = os.environ.get(
    "ML100K_DIR", os.path.join(REPO, os.pardir, "shared", "data", "ml-100k"))


def write_log(folder, users, items, num_shards, name="part"):
  """Writes rows (user, item, 1, row number) in the given order, in shards."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for s, idx in enumerate(np.array_split(np.arange(len(users)), num_shards)):
    path = os.path.join(folder, f"{name}-{s}.csv.gz")
    text = "".join(f"{users[i]},{items[i]},1,{i}\n" for i in idx)
    with open(path, "wb") as f:
      f.write(gzip.compress(text.encode()))
    paths.append(path)
  return paths


def batches(data, files, batch, **kwargs):
  """[(users, items, labels)] of every batch of one pass."""
  kwargs.setdefault("training", True)
  ds = csv_dataset.make_dataset(data, files, batch, **kwargs)
  return [(f[data.user_column].numpy(), f[data.item_column].numpy(),
           l.numpy()) for f, l in ds]


def implicit(num_negatives, catalog="", **fields):
  return config_lib.DataConfig(label_mode="implicit",
                               num_negatives=num_negatives,
                               negative_catalog=catalog, **fields)


def distinct_users_of_positives(out):
  return [len(np.unique(u[l == 1])) for u, _, l in out]


def uniform_distinct_users(users, size, trials=300, seed=0):
  """Mean distinct users among `size` rows drawn uniformly from the log."""
  rng = np.random.default_rng(seed)
  return np.mean([len(np.unique(rng.choice(users, size, replace=False)))
                  for _ in range(trials)])


class SortedLogTest(tf.test.TestCase):
  """A log sorted by user: 800 users x 75 rows, 60k rows in 3 shards."""

  def setUp(self):
    super().setUp()
    self.dir = self.get_temp_dir()
    self.users = np.repeat(np.arange(800), 75)
    rng = np.random.default_rng(0)
    self.items = rng.integers(0, 500, len(self.users))
    self.files = write_log(os.path.join(self.dir, "sorted"), self.users,
                           self.items, 3)
    self.catalog = os.path.join(self.dir, "items.txt")
    with open(self.catalog, "w") as f:
      f.write("".join(f"{i}\n" for i in range(500)))

  def test_every_batch_holds_exactly_its_share_of_positives(self):
    for k in (4, 32):
      for training in (True, False):
        data = implicit(k, self.catalog)
        out = batches(data, self.files, 2048, training=training)
        rows = 2048 // (1 + k)  # 409 with 4 negatives, 62 with 32.
        self.assertLen(out, -(-60_000 // rows))
        for i, (users, items, labels) in enumerate(out):
          groups = labels.reshape(-1, 1 + k)
          expected = rows if i < len(out) - 1 else 60_000 - rows * i
          # Each positive is followed by its k negatives, of the same user.
          self.assertAllEqual(groups[:, 0], np.ones(expected))
          self.assertEqual(groups[:, 1:].sum(), 0)
          self.assertAllEqual(users.reshape(-1, 1 + k),
                              np.repeat(users[::1 + k, None], 1 + k, axis=1))
        positives = np.concatenate([i[l == 1] for _, i, l in out])
        # Nothing dropped, nothing repeated: one epoch is the log.
        self.assertAllEqual(np.sort(positives), np.sort(self.items))

  def test_a_log_that_fits_the_buffer_is_shuffled_whole(self):
    data = implicit(4, self.catalog)
    out = batches(data, self.files, 2048, seed=1)
    rows = 2048 // 5
    mixed = np.mean(distinct_users_of_positives(out[:-1]))
    uniform = uniform_distinct_users(self.users, rows)
    self.assertGreater(mixed / uniform, 0.97)
    self.assertEmpty(csv_dataset.order_warnings(
        data, csv_dataset.scan_files(data, self.files)))

  def test_a_buffer_too_small_for_a_sorted_log_is_detected(self):
    # What a window too small does to batches: this is what the default
    # buffer and the warning exist for.
    data = implicit(4, self.catalog, shuffle_buffer_rows=3000,
                    files_in_flight=1)
    out = batches(data, self.files, 2048, seed=1)
    mixed = np.mean(distinct_users_of_positives(out[:-1]))
    uniform = uniform_distinct_users(self.users, 2048 // 5)
    self.assertLess(mixed / uniform, 0.25)
    warnings = csv_dataset.order_warnings(
        data, csv_dataset.scan_files(data, self.files))
    self.assertLen(warnings, 3)  # One per shard, sorted by user and time.
    self.assertIn("sorted/part-0.csv.gz is sorted by user_id", warnings[0])
    self.assertIn("--shuffle_buffer_rows", warnings[0])

  def test_a_window_smaller_than_the_log_still_mixes_and_loses_nothing(self):
    data = implicit(4, self.catalog, shuffle_buffer_rows=20_000,
                    files_in_flight=3)
    out = batches(data, self.files, 2048, seed=2, epochs=2)
    positives = np.concatenate([i[l == 1] for _, i, l in out])
    self.assertAllEqual(np.sort(positives),
                        np.sort(np.concatenate([self.items] * 2)))
    # 20k rows of 3 files: ~89 users per file window, 267 in the buffer.
    self.assertGreater(np.mean(distinct_users_of_positives(out[:-1])), 200)

  def test_same_seed_same_batches_and_skip_counts_replicas(self):
    data = implicit(4, self.catalog)
    one = batches(data, self.files, 1000, seed=5, epochs=2)
    again = batches(data, self.files, 1000, seed=5, epochs=2)
    other = batches(data, self.files, 1000, seed=6, epochs=2)
    for a, b in zip(one, again):
      for x, y in zip(a, b):
        self.assertAllEqual(x, y)
    self.assertNotAllEqual(one[0][1], other[0][1])
    # One pipeline feeding 2 replicas: a step takes 2 batches of 500.
    ctx = tf.distribute.InputContext(num_input_pipelines=1,
                                     input_pipeline_id=0,
                                     num_replicas_in_sync=2)
    two = batches(data, self.files, 1000, seed=5, epochs=2, input_context=ctx)
    resumed = batches(data, self.files, 1000, seed=5, epochs=2,
                      input_context=ctx, skip_steps=7)
    self.assertLen(resumed, len(two) - 14)
    for a, b in zip(two[14:], resumed):
      for x, y in zip(a, b):
        self.assertAllEqual(x, y)


class NegativesTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.get_temp_dir()
    rng = np.random.default_rng(3)
    self.users = rng.integers(0, 1000, 20_000)
    self.items = rng.integers(1000, 1050, 20_000)  # 50 distinct items.
    self.files = write_log(self.dir, self.users, self.items, 2)

  def negatives(self, data, seed):
    out = batches(data, self.files, 1000, seed=seed)
    return np.concatenate([i[l == 0] for _, i, l in out])

  def test_uniform_over_the_catalog_and_seeded(self):
    catalog = os.path.join(self.dir, "catalog.txt")
    with open(catalog, "w") as f:
      f.write("".join(f"{i}\n" for i in range(100)))  # Not the log's items.
    data = implicit(4, catalog)
    negatives = self.negatives(data, seed=1)
    self.assertLen(negatives, 80_000)
    counts = np.bincount(negatives, minlength=100)
    self.assertLen(counts, 100)  # Only catalog items.
    # 800 expected per item; a chi-square test of uniformity.
    self.assertGreater(scipy_stats.chisquare(counts).pvalue, 1e-3)
    self.assertAllEqual(negatives, self.negatives(data, seed=1))
    self.assertGreater(np.mean(negatives != self.negatives(data, seed=2)),
                       0.9)

  def test_without_a_catalog_the_buffer_items_are_drawn(self):
    # The whole log fits in the buffer, so every item of it is a candidate,
    # each equally likely, whatever its popularity.
    data = implicit(4)
    negatives = self.negatives(data, seed=1)
    self.assertEqual(set(np.unique(negatives)), set(range(1000, 1050)))
    counts = np.bincount(negatives - 1000, minlength=50)
    self.assertGreater(scipy_stats.chisquare(counts).pvalue, 1e-3)


@unittest.skipUnless(os.path.exists(ML100K) or os.environ.get("CI"),
                     f"MovieLens 100K not found at {ML100K}")
class MovieLens100KBatchesTest(tf.test.TestCase):
  """The acceptance: ML-100K sorted by user and by time, 4 and 32 negatives."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = cls.get_temp_dir(cls())
    cls.files = {}
    for order in ("user", "time"):
      dst = os.path.join(cls.dir, order)
      movielens.convert("ml-100k", ML100K, dst, 4, "leave_last_out",
                        order=order)
      cls.files[order] = sorted(os.path.join(dst, f) for f in os.listdir(dst)
                                if f.startswith("train-"))
    cls.data = config_lib.DataConfig(
        columns=tuple(movielens.COLUMNS), label_mode="implicit",
        num_negatives=4)
    scans = csv_dataset.scan_files(cls.data, cls.files["user"])
    cls.train_rows = sum(s.rows for s in scans.values())

  def test_sorted_logs_give_fair_batches(self):
    users = np.concatenate([
        np.loadtxt(f, delimiter=",", usecols=0, dtype=np.int64)
        for f in self.files["user"]])
    self.assertLen(users, self.train_rows)
    for order in ("user", "time"):
      for k in (4, 32):
        data = config_lib.replace(config_lib.Config(data=self.data),
                                  data={"num_negatives": k}).data
        rows = 2048 // (1 + k)
        out = batches(data, self.files[order], 2048, seed=0)
        positives = [int(l.sum()) for _, _, l in out]
        self.assertEqual(positives[:-1], [rows] * (len(out) - 1))
        self.assertEqual(sum(positives), self.train_rows)
        ratio = (np.mean(distinct_users_of_positives(out[:-1])) /
                 uniform_distinct_users(users, rows))
        print(f"ML-100K by {order}, {k} negatives: distinct users {ratio:.3f}x uniform")
        self.assertGreater(ratio, 0.9, f"{order}, {k} negatives")

  def test_the_converter_shuffles_and_a_sorted_log_is_flagged(self):
    data = config_lib.replace(config_lib.Config(data=self.data),
                              data={"shuffle_buffer_rows": 8192}).data
    warned = csv_dataset.order_warnings(
        data, csv_dataset.scan_files(data, self.files["user"]))
    self.assertLen(warned, 4)
    dst = os.path.join(self.dir, "shuffled")
    movielens.convert("ml-100k", ML100K, dst, 4, "leave_last_out")
    shuffled = sorted(os.path.join(dst, f) for f in os.listdir(dst)
                      if f.startswith("train-"))
    scans = csv_dataset.scan_files(data, shuffled)
    self.assertEmpty(csv_dataset.order_warnings(data, scans))
    for scan in scans.values():
      self.assertBetween(scan.in_order["user_id"], 0.45, 0.55)


if __name__ == "__main__":
  tf.test.main()
