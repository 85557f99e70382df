"""Input pipeline tests on tiny gzipped CSV shards written to a temp dir."""

import gzip
import os
import subprocess
import threading
import time

import numpy as np
import tensorflow as tf

from input import csv_dataset
from trainer import config as config_lib

FIVE_ROWS = "1,10,1,100\n2,20,0,101\n3,10,1,102\n\n4,30,0,103\n5,20,1,104\n"


def write(path, text, compress=True):
  data = text.encode()
  with open(path, "wb") as f:
    f.write(gzip.compress(data) if compress else data)
  return path


def collect(ds):
  """All batches of a dataset, concatenated: ({name: array}, labels)."""
  feats, labels = {}, []
  for f, l in ds:
    for k, v in f.items():
      feats.setdefault(k, []).append(v.numpy())
    labels.append(l.numpy())
  return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(labels)


class CsvDatasetTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.get_temp_dir()
    self.path = write(os.path.join(self.dir, "a.csv.gz"), FIVE_ROWS)
    self.data = config_lib.DataConfig(train_files=(self.path,))

  def test_reads_rows_in_order_and_ignores_empty_lines(self):
    feats, labels = collect(csv_dataset.make_dataset(
        self.data, [self.path], 2, training=False))
    self.assertAllEqual(feats["user_id"], [1, 2, 3, 4, 5])
    self.assertAllEqual(feats["item_id"], [10, 20, 10, 30, 20])
    self.assertAllEqual(labels, [1, 0, 1, 0, 1])
    self.assertEqual(feats["user_id"].dtype, np.int64)

  def test_batches_have_the_per_replica_size_and_drop_remainder(self):
    ctx = tf.distribute.InputContext(num_input_pipelines=1,
                                     input_pipeline_id=0,
                                     num_replicas_in_sync=2)
    ds = csv_dataset.make_dataset(self.data, [self.path], 4, training=False,
                                  input_context=ctx, drop_remainder=True)
    # Global 4 over 2 replicas -> 2 per replica; 5 rows -> 2 full batches.
    self.assertEqual([int(l.shape[0]) for _, l in ds], [2, 2])

  def test_header_delimiter_and_string_ids(self):
    path = write(os.path.join(self.dir, "s.csv.gz"),
                 "who;what;rating\nalice;x1;4.5\nbob;x2;2\n")
    data = config_lib.DataConfig(
        columns=("who", "what", "rating"),
        column_types=("string", "string", "float32"), header=True,
        delimiter=";", user_column="who", item_column="what",
        label_mode="threshold", label_column="rating", label_threshold=4.0)
    feats, labels = collect(csv_dataset.make_dataset(data, [path], 8,
                                                     training=False))
    self.assertAllEqual(feats["who"], [b"alice", b"bob"])
    self.assertAllEqual(feats["what"], [b"x1", b"x2"])
    self.assertAllEqual(labels, [1.0, 0.0])  # 4.5 >= 4, 2 < 4.

  def test_implicit_negatives(self):
    data = config_lib.replace(
        config_lib.Config(data=self.data),
        data=dict(label_mode="implicit", num_negatives=3)).data
    catalog = write(os.path.join(self.dir, "items.txt"), "7\n8\n9\n", False)
    feats, labels = collect(csv_dataset.make_dataset(
        data, [self.path], 64, training=True, seed=3,
        negative_catalog=catalog))
    # 5 positives, 3 negatives each; negatives come from the catalog only,
    # and every user keeps 1 positive + 3 negatives.
    self.assertEqual(labels.sum(), 5)
    self.assertLen(labels, 20)
    self.assertContainsSubset(feats["item_id"][labels == 0], [7, 8, 9])
    self.assertAllEqual(np.bincount(feats["user_id"])[1:], [4] * 5)

  def test_same_seed_same_order_and_skip_resumes_exactly(self):
    paths = [write(os.path.join(self.dir, f"p{i}.csv.gz"),
                   "".join(f"{i * 10000 + r},{r},1,0\n" for r in range(3000)))
             for i in range(3)]

    def users(seed, skip=0):
      ds = csv_dataset.make_dataset(self.data, paths, 500, training=True,
                                    seed=seed, epochs=2, skip_steps=skip)
      return [f["user_id"].numpy().tolist() for f, _ in ds]

    first = users(1)
    self.assertEqual(first, users(1))
    self.assertNotEqual(first, users(2))
    self.assertEqual(first[7:], users(1, skip=7))
    self.assertLen(first, 36)  # 2 epochs x 9000 rows / 500.
    # Rows of different files are mixed within a batch by the shuffle.
    self.assertGreater(len({u // 10000 for u in first[0]}), 1)

  def test_stopping_early_stops_the_reading_thread(self):
    paths = [write(os.path.join(self.dir, f"r{i}.csv.gz"),
                   "".join(f"{r},{r},1,0\n" for r in range(2000)))
             for i in range(2)]
    reading = lambda: [t for t in threading.enumerate()
                       if t.name == "csv_dataset-read"]
    ds = csv_dataset.make_dataset(self.data, paths, 100, training=True,
                                  repeat=True)
    it = iter(ds)
    for _ in range(5):
      next(it)
    self.assertLen(reading(), 1)
    del it
    for _ in range(100):
      if not reading():
        break
      time.sleep(0.05)
    self.assertEmpty(reading())

  def test_errors_in_later_blocks_reach_the_consumer(self):
    text = "".join(f"{r},{r},1,0\n" for r in range(30_000)) + "9,x,1,0\n"
    path = write(os.path.join(self.dir, "late.csv.gz"), text)
    with self.assertRaisesRegex(tf.errors.OpError,
                                "late.csv.gz: line 30001: "):
      collect(csv_dataset.make_dataset(self.data, [path], 64, training=True))

  def test_files_are_sharded_by_input_pipeline(self):
    paths = [write(os.path.join(self.dir, f"q{i}.csv.gz"), f"{i},1,1,0\n")
             for i in range(4)]
    seen = []
    for pipeline in range(2):
      ctx = tf.distribute.InputContext(num_input_pipelines=2,
                                       input_pipeline_id=pipeline)
      feats, _ = collect(csv_dataset.make_dataset(
          self.data, paths, 8, training=False, input_context=ctx))
      seen.append(sorted(feats["user_id"].tolist()))
    self.assertEqual(seen, [[0, 2], [1, 3]])

  def test_pattern_matching_nothing_is_an_error(self):
    with self.assertRaisesRegex(FileNotFoundError, "nothing-here"):
      csv_dataset.resolve_files([os.path.join(self.dir, "nothing-here*.gz")])

  def test_malformed_rows_stop_the_run_naming_the_file(self):
    for bad in ("6,40,1\n", "7,abc,1,105\n"):
      path = write(os.path.join(self.dir, "bad.csv.gz"), FIVE_ROWS + bad)
      with self.assertRaisesRegex(tf.errors.OpError, "bad.csv.gz"):
        collect(csv_dataset.make_dataset(self.data, [path], 4,
                                         training=False))
      with self.assertRaisesRegex(csv_dataset.InputDataError, "bad.csv.gz"):
        csv_dataset.scan_files(self.data, [path])

  def test_skip_mode_drops_and_counts_malformed_rows(self):
    text = FIVE_ROWS + "6,40,1\n7,abc,1,105\n8,50,x,106\n9,60,1,107\n"
    path = write(os.path.join(self.dir, "bad.csv.gz"), text)
    data = config_lib.replace(config_lib.Config(data=self.data),
                              data=dict(bad_rows="skip")).data
    stats = csv_dataset.RowStats()
    feats, _ = collect(csv_dataset.make_dataset(data, [path], 4,
                                                training=False, stats=stats,
                                                epochs=2))
    self.assertAllEqual(feats["user_id"], [1, 2, 3, 4, 5, 9] * 2)
    # Three bad rows, counted once although the file was read twice.
    self.assertEqual(stats.skipped, 3)
    self.assertEqual(stats.skipped_by_file(), {path: 3})

  def test_truncated_gzip_is_an_error_naming_the_shard(self):
    blob = gzip.compress(("1,2,1,0\n" * 50000).encode())
    path = os.path.join(self.dir, "cut.csv.gz")
    with open(path, "wb") as f:
      f.write(blob[: len(blob) // 2])
    with self.assertRaisesRegex(csv_dataset.InputDataError,
                                "cut.csv.gz: truncated gzip"):
      csv_dataset.scan_files(self.data, [path])

  def test_labels_outside_zero_one_are_an_error(self):
    path = write(os.path.join(self.dir, "r.csv.gz"), "1,2,5,0\n")
    with self.assertRaisesRegex(tf.errors.OpError,
                                "r.csv.gz: label column .* --label_mode=threshold"):
      collect(csv_dataset.make_dataset(self.data, [path], 4, training=False))


def zcat_lines(path):
  """What `zcat FILE | wc -l` says."""
  out = subprocess.run(f"zcat {path} | wc -l", shell=True, check=True,
                       capture_output=True, text=True).stdout
  return int(out.strip())


class BlockBoundaryTest(tf.test.TestCase):
  """Shards of many read blocks: rows cut by blocks, gzip members, headers."""

  def setUp(self):
    super().setUp()
    self.dir = self.get_temp_dir()
    rng = np.random.default_rng(0)
    # IDs of 1 to 12 digits, so block ends fall anywhere inside rows.
    self.users = rng.integers(0, 10 ** rng.integers(1, 13, 20_000))
    self.items = rng.integers(0, 1000, 20_000)
    self.lines = [f"{u},{i},1,{n}\n" for n, (u, i) in
                  enumerate(zip(self.users, self.items))]

  def data(self, block_bytes, **fields):
    return config_lib.DataConfig(train_files=("x",), block_bytes=block_bytes,
                                 **fields)

  def read(self, data, path):
    feats, _ = collect(csv_dataset.make_dataset(data, [path], 4096,
                                                training=False))
    rows = csv_dataset.scan_files(data, [path])[path].rows
    return feats, rows

  def test_rows_cut_by_block_ends_are_read_whole(self):
    path = write(os.path.join(self.dir, "many.csv.gz"), "".join(self.lines))
    for block in (256, 1000, 4099):
      self.assertGreater(os.path.getsize(path), 40 * block)
      feats, rows = self.read(self.data(block), path)
      self.assertEqual(rows, zcat_lines(path))
      self.assertAllEqual(feats["user_id"], self.users)
      self.assertAllEqual(feats["item_id"], self.items)

  def test_multi_member_gzip(self):
    members = [gzip.compress("".join(self.lines[a:b]).encode())
               for a, b in ((0, 7000), (7000, 7001), (7001, 20_000))]
    path = os.path.join(self.dir, "members.csv.gz")
    with open(path, "wb") as f:
      f.write(b"".join(members))
    # One block size ends a read exactly where the second member starts.
    for block in (len(members[0]), 333, 1 << 16):
      feats, rows = self.read(self.data(block), path)
      self.assertEqual(rows, zcat_lines(path))
      self.assertAllEqual(feats["user_id"], self.users)

  def test_header_is_skipped_once(self):
    path = write(os.path.join(self.dir, "header.csv.gz"),
                 "user_id,item_id,label,timestamp\n" + "".join(self.lines))
    feats, rows = self.read(self.data(512, header=True), path)
    self.assertEqual(rows, zcat_lines(path) - 1)
    self.assertAllEqual(feats["user_id"], self.users)

  def test_malformed_row_after_the_first_block_names_its_line(self):
    lines = list(self.lines)
    for n in range(999, len(lines), 1000):
      lines[n] = "\n"  # Empty lines, which the parser passes over.
    header = "user_id,item_id,label,timestamp\n"
    for bad, line_no in (("5,6\n", 15_001), ("5,six,1,0\n", 17_003)):
      text = lines[:line_no - 2] + [bad] + lines[line_no - 2:]
      path = write(os.path.join(self.dir, "bad.csv.gz"),
                   header + "".join(text))
      data = self.data(700, header=True)
      # The header is line 1, so the bad row is on line_no.
      with self.assertRaisesRegex(csv_dataset.InputDataError,
                                  f"bad.csv.gz: line {line_no}: "):
        csv_dataset.scan_files(data, [path])
      with self.assertRaisesRegex(tf.errors.OpError,
                                  f"bad.csv.gz: line {line_no}: "):
        self.read(data, path)
      skip = self.data(700, header=True, bad_rows="skip")
      stats = csv_dataset.RowStats()
      rows = csv_dataset.scan_files(skip, [path], stats)[path].rows
      self.assertEqual(rows, 20_000 - 20)  # Less the 20 emptied lines.
      self.assertEqual(stats.skipped, 1)


if __name__ == "__main__":
  tf.test.main()
