"""The quality benchmarks: the protocol on a hand example, the study's memory and
collision figures by hand, and both commands end to end on a small planted log."""

import json
import os

import numpy as np
import tensorflow as tf

from benchmarks import hash_vs_vocab
from benchmarks import protocol
from benchmarks import quality
from trainer import config as config_lib
from trainer.models import mf as model_lib

# user, item, timestamp. Per user, the latest row is the test item and the one
# before it the validation item; user 3 has two rows and keeps both in train.
_ROWS = [(1, 10, 1), (1, 11, 2), (1, 12, 3), (1, 13, 4),
         (2, 11, 1), (2, 12, 2), (2, 10, 3),
         (3, 10, 5), (3, 11, 6),
         (4, 12, 1), (4, 13, 2), (4, 10, 3), (4, 11, 4),
         (5, 10, 1), (5, 11, 2), (5, 99, 3)]


def _small_synthetic(monkeypatch_target):
  """Makes 'synthetic' a small planted log (1,000 users, 200 items).

  Like the benchmarks' log, flat popularity and a sharp affinity: which
  items a user keeps is mostly personal, and popularity alone ranks them
  poorly.
  """
  monkeypatch_target.SYNTHETIC = dict(num_rows=40_000, num_users=1_000,
                                      num_items=200, zipf=0.5, sharpness=20.0,
                                      seed=0)


class ProtocolTest(tf.test.TestCase):

  def test_splits_on_a_hand_example(self):
    src = self.get_temp_dir()
    with open(os.path.join(src, "u.data"), "w") as f:
      f.writelines(f"{u}\t{i}\t4\t{t}\n" for u, i, t in _ROWS)
    splits = protocol.prepare(src, os.path.join(src, "out"))
    val, test = splits["validation"], splits["test"]
    self.assertAllEqual(val.user_ids, [1, 2, 3, 4, 5])
    # Validation fit: train rows only. Items 10..13 were all trained on.
    self.assertAllEqual(val.item_ids, [10, 11, 12, 13])
    self.assertLen(val.train_items, 8)
    # Held out for validation: (1, 12), (2, 12), (4, 10), (5, 11).
    self.assertAllEqual(val.eval_users, [0, 1, 3, 4])
    self.assertAllEqual(val.eval_items, [2, 2, 0, 1])
    # Test fit: train + validation; user 5's test item 99 is outside the
    # catalog and must be a miss (-1), not dropped.
    self.assertAllEqual(test.item_ids, [10, 11, 12, 13])
    self.assertLen(test.train_items, 12)
    self.assertAllEqual(test.eval_users, [0, 1, 3, 4])
    self.assertAllEqual(test.eval_items, [3, 0, 1, -1])
    with open(os.path.join(test.vocab_dir, "item_id.txt")) as f:
      self.assertCountEqual(f.read().split(), ["10", "11", "12", "13"])
    # A scorer that ranks the held-out item first everywhere scores 1 except
    # on the miss: HR@10 = 3/4.
    best = np.zeros((5, 4))
    best[[0, 1, 3], [3, 0, 1]] = 1.0
    m = protocol.evaluate(lambda u: best[u], test, sampled=False)
    self.assertAllClose([m["hr@10"], m["ndcg@10"]], [0.75, 0.75])

  def test_hash_bins(self):
    self.assertEqual(quality.hash_bins(943, 8), 8192)  # 7,544 -> 2^13.
    self.assertEqual(quality.hash_bins(1024, 1), 1024)


  def test_finished_runs_are_reused_only_with_the_same_flags(self):
    run_dir = os.path.join(self.get_temp_dir(), "run")
    os.makedirs(run_dir)
    flags = ["--no_such_flag=1"]  # trainer.task would exit 1 on it.
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
      json.dump({"train_seconds": 7.0}, f)
    with open(os.path.join(run_dir, "benchmark_flags.json"), "w") as f:
      json.dump(flags, f)
    # Same flags: the finished run is returned, the trainer never started.
    self.assertEqual(protocol.run_trainer(flags, run_dir),
                     {"train_seconds": 7.0})
    # Other flags: the old run is discarded and the trainer really runs.
    with self.assertRaisesRegex(RuntimeError, "exited 1"):
      protocol.run_trainer(flags + ["--seed=2"], run_dir)
    self.assertFalse(os.path.exists(os.path.join(run_dir, "metrics.json")))


class CollisionAndBytesTest(tf.test.TestCase):

  def _model(self, id_mode, **table):
    config = config_lib.replace(config_lib.Config(), model={
        "id_mode": id_mode, "embedding_dim": 3,
        "tables": (config_lib.TableConfig("user_id", salt=1, **table),
                   config_lib.TableConfig("item_id", salt=2, **table))})
    return model_lib.MatrixFactorization(config)

  def test_one_bin_collides_everything_and_bytes_are_rows_times_slots(self):
    model = self._model("hash", num_bins=1)
    ids = np.array([3, 5, 8], np.int64)
    self.assertEqual(protocol.collision_rate(model, ids, "item_id"), 1.0)
    # Two tables of 1 row x (3 factors + bias) float32.
    self.assertEqual(protocol.table_bytes(model), 2 * 1 * 4 * 4)

  def test_rates_match_the_rows_the_lookup_gives(self):
    model = self._model("hash", num_bins=64, num_hashes=2)
    ids = np.arange(200, dtype=np.int64)
    rows = np.sort(np.stack([r.numpy() for r in model.lookups["item_id"](ids)],
                            axis=1), axis=1)
    keys = [tuple(r) for r in rows]
    expected = np.mean([keys.count(k) > 1 for k in keys])
    self.assertAllClose(protocol.collision_rate(model, ids, "item_id"),
                        expected)
    # 200 IDs in 64 bins with two hashes: 2,080 row pairs, so many IDs stay
    # unique where one hash into 64 bins would collide them all.
    self.assertLess(expected, 0.9)
    self.assertEqual(protocol.table_bytes(model), 2 * 64 * 4 * 4)

  def test_vocab_ids_outside_share_the_oov_row(self):
    path = os.path.join(self.get_temp_dir(), "v.txt")
    with open(path, "w") as f:
      f.write("1\n2\n")
    model = self._model("vocab", vocab_file=path)
    ids = np.array([1, 2, 3, 4], np.int64)  # 3 and 4 share the OOV row.
    self.assertEqual(protocol.collision_rate(model, ids, "item_id"), 0.5)
    self.assertEqual(protocol.table_bytes(model), 2 * 3 * 4 * 4)


class EndToEndTest(tf.test.TestCase):
  """Both commands on a small planted log, with short training."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._saved = protocol.SYNTHETIC
    _small_synthetic(protocol)

  @classmethod
  def tearDownClass(cls):
    protocol.SYNTHETIC = cls._saved
    super().tearDownClass()

  def test_quality_contract_and_mf_learns(self):
    out = os.path.join(self.get_temp_dir(), "quality")
    results = quality.run("synthetic", out, seeds=2, id_modes=["vocab"],
                          mf_params={"epochs": 8, "batch_size": 1024,
                                     "num_negatives": 8},
                          sorted_orders=("user",))
    with open(os.path.join(out, "results.json")) as f:
      self.assertEqual(json.load(f), json.loads(json.dumps(results)))
    self.assertEqual(results["protocol"], "leave-last-out")
    self.assertEqual(set(results["models"]),
                     {"popularity", "ease", "ials", "mf_vocab",
                      "mf_vocab_sorted_by_user"})
    for m in results["models"].values():
      for key in ("hr@10", "ndcg@10", "sampled_hr@10", "sampled_ndcg@10"):
        self.assertBetween(m[key], 0.0, 1.0)
      self.assertIn("params", m)
    mf = results["models"]["mf_vocab"]
    self.assertEqual(mf["seeds"], 2)
    self.assertIn(results["models"]["ease"]["params"]["l2"], quality.EASE_GRID)
    # The planted affinity is personal: MF must rank far above popularity
    # (2.08x when measured) and EASE (1.48x), and on par with iALS (0.94x).
    models = results["models"]
    self.assertGreater(mf["ndcg@10"], 1.6 * models["popularity"]["ndcg@10"])
    self.assertGreater(mf["ndcg@10"], 1.15 * models["ease"]["ndcg@10"])
    self.assertGreater(mf["ndcg@10"], 0.9 * models["ials"]["ndcg@10"])
    # The same rows sorted by user train as well as shuffled ones (measured:
    # 0.2668 against 0.2652).
    self.assertGreater(models["mf_vocab_sorted_by_user"]["ndcg@10"],
                       0.9 * mf["ndcg@10"])

  def test_study_tables_plot_and_collisions(self):
    out = os.path.join(self.get_temp_dir(), "study")
    results = hash_vs_vocab.run("synthetic", out, seeds=1,
                                multiples=["1/4", "1"], min_counts=[1],
                                mf_params={"epochs": 4, "embedding_dim": 8})
    models = results["models"]
    self.assertEqual(set(models), {"hash_1/4x", "hash_1x", "hash2_1/4x",
                                   "hash2_1x", "vocab_min1"})
    users, items = results["num_users"], results["num_items"]
    # Bytes by hand: rows x (8 factors + bias) x 4 bytes, both tables.
    self.assertEqual(models["hash_1x"]["table_bytes"],
                     (users + items) * 9 * 4)
    self.assertEqual(models["hash2_1x"]["table_bytes"],
                     models["hash_1x"]["table_bytes"])
    self.assertEqual(models["vocab_min1"]["table_bytes"],
                     (users + 1 + items + 1) * 9 * 4)
    self.assertEqual(models["vocab_min1"]["collision_rate"], 0.0)
    # A quarter of a row per ID: nearly every ID shares its row; two hashes
    # into the same rows separate most of them.
    self.assertGreater(models["hash_1/4x"]["collision_rate"], 0.95)
    self.assertLess(models["hash2_1/4x"]["collision_rate"],
                    models["hash_1/4x"]["collision_rate"] - 0.3)
    # One bin per ID: a share 1 - 1/e ~ 0.63 of IDs meet another.
    self.assertBetween(models["hash_1x"]["collision_rate"], 0.55, 0.71)
    self.assertSetEqual(set(results["hash2_over_hash_ndcg@10"]),
                        {"1/4x", "1x"})
    png = os.path.join(out, "quality_vs_memory.png")
    with open(png, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    with open(os.path.join(out, "results.md")) as f:
      self.assertIn("| vocab | min_count 1 |", f.read())


if __name__ == "__main__":
  tf.test.main()


class ThroughputHarnessTest(tf.test.TestCase):
  """benchmarks.throughput's input measurement, in its own process, of this
  checkout and of a 'baseline' checkout (here the same one, through the
  harness path a baseline takes): every row read, both ways."""

  def test_input_measurement_counts_every_row_both_ways(self):
    from benchmarks import throughput  # pylint: disable=g-import-not-at-top
    folder = throughput.ensure_log(os.path.join(self.get_temp_dir(), "log"),
                                   80_000)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(throughput.__file__)))
    for cwd in (None, repo):
      result = throughput._child("input_ours", folder, cwd=cwd)
      self.assertEqual(result["rows"], 80_000)
      self.assertGreater(result["rows_per_s"], 0)
      self.assertGreater(result["python_loop_rows_per_s"], 0)
