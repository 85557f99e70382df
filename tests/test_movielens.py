"""MovieLens converter: the split on a hand example, and real ML-100K counts."""

import gzip
import json
import os
import subprocess
import sys
import unittest

import numpy as np
import tensorflow as tf

from input import movielens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ML100K = os.environ.get(
    "ML100K_DIR", os.path.join(REPO, os.pardir, "shared", "data", "ml-100k"))


def read_shards(folder, prefix):
  rows = []
  for name in sorted(os.listdir(folder)):
    if name.startswith(prefix + "-"):
      with gzip.open(os.path.join(folder, name), "rt") as f:
        rows += [line.split(",") for line in f.read().splitlines()]
  return rows


class LeaveLastOutTest(tf.test.TestCase):

  def test_hand_example_with_a_timestamp_tie(self):
    users = np.array([7, 5, 7, 7, 5, 7, 5, 9, 9])
    times = np.array([30, 1, 10, 30, 2, 20, 3, 1, 2])
    # User 7: times 30 (row 0), 10, 30 (row 3), 20 -> by time then file
    # order: row 2 (10), row 5 (20), row 0 (30), row 3 (30, later in file).
    #   test = row 3, validation = row 0.
    # User 5: rows 1, 4, 6 at times 1, 2, 3 -> test row 6, validation row 4.
    # User 9: only 2 rows -> all train.
    self.assertAllEqual(movielens.leave_last_out(users, times),
                        [1, 0, 0, 2, 1, 0, 2, 0, 0])


class ConvertTest(tf.test.TestCase):

  def test_ml_1m_and_ml_latest_formats(self):
    src = self.get_temp_dir()
    with open(os.path.join(src, "ratings.dat"), "w") as f:
      f.write("1::10::5::100\n1::11::3::101\n")
    with open(os.path.join(src, "ratings.csv"), "w") as f:
      f.write("userId,movieId,rating,timestamp\n2,20,3.5,200\n")
    for fmt, expected in (("ml-1m", [["1", "10", "5", "100"],
                                     ["1", "11", "3", "101"]]),
                          ("ml-latest", [["2", "20", "3.5", "200"]])):
      dst = os.path.join(src, fmt)
      info = movielens.convert(fmt, src, dst, num_shards=1)
      self.assertEqual(read_shards(dst, "ratings"), expected)
      self.assertEqual(info["num_rows"], len(expected))

  def test_missing_source_names_the_expected_file(self):
    with self.assertRaisesRegex(FileNotFoundError, "u.data"):
      movielens.convert("ml-100k", self.get_temp_dir(), self.get_temp_dir())


@unittest.skipUnless(os.path.exists(ML100K) or os.environ.get("CI"),
                     f"MovieLens 100K not found at {ML100K}")
class MovieLens100KTest(tf.test.TestCase):

  def test_whole_and_leave_last_out(self):
    dst = os.path.join(self.get_temp_dir(), "all")
    info = movielens.convert("ml-100k", ML100K, dst, num_shards=4)
    rows = read_shards(dst, "ratings")
    self.assertLen(rows, 100_000)
    self.assertEqual({len(r) for r in rows}, {4})
    self.assertEqual((info["num_users"], info["num_items"]), (943, 1682))

    dst = os.path.join(self.get_temp_dir(), "split")
    subprocess.run([sys.executable, "-m", "input.movielens", "--format=ml-100k",
                    f"--src={ML100K}", f"--dst={dst}",
                    "--split=leave_last_out"], cwd=REPO, check=True,
                   capture_output=True)
    split = {name: read_shards(dst, name)
             for name in ("train", "validation", "test")}
    self.assertEqual({k: len(v) for k, v in split.items()},
                     {"train": 98_114, "validation": 943, "test": 943})
    # Nothing lost or duplicated: the three splits are the source rows.
    self.assertEqual(sorted(map(tuple, sum(split.values(), []))),
                     sorted(map(tuple, rows)))
    latest = {}
    for u, _, _, t in rows:
      latest[u] = max(latest.get(u, 0), int(t))
    self.assertTrue(all(int(t) == latest[u] for u, _, _, t in split["test"]))
    with open(os.path.join(dst, "dataset.json")) as f:
      self.assertEqual(json.load(f)["splits"]["test"]["rows"], 943)


if __name__ == "__main__":
  tf.test.main()
