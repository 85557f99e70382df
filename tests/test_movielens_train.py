"""MovieLens-100K end to end: convert, train in both ID modes, export, reload."""

import json
import os
import unittest

import numpy as np
import tensorflow as tf

from input import movielens
from input import vocab
from input import csv_dataset
from trainer import config as config_lib
from trainer import export
from tests.test_train import REPO, run_task, score_saved_model, scores_from_checkpoint

ML100K = os.environ.get(
    "ML100K_DIR", os.path.join(REPO, os.pardir, "shared", "data", "ml-100k"))


@unittest.skipUnless(os.path.exists(ML100K) or os.environ.get("CI"),
                     f"MovieLens 100K not found at {ML100K}")
class MovieLensTrainTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = cls.get_temp_dir(cls())
    cls.data = os.path.join(cls.dir, "ml100k")
    movielens.convert("ml-100k", ML100K, cls.data, 4, "leave_last_out")
    data = config_lib.DataConfig(
        train_files=(f"{cls.data}/train-*",),
        columns=("user_id", "item_id", "rating", "timestamp"))
    cls.vocab = os.path.join(cls.dir, "vocab")
    cls.vocab_summary = vocab.build(
        data, csv_dataset.resolve_files(data.train_files), cls.vocab)
    cls.common = [f"--train_files={cls.data}/train-*",
                  f"--eval_files={cls.data}/test-*",
                  "--columns=user_id,item_id,rating,timestamp",
                  "--num_negatives=4", "--epochs=5"]

  def check_export(self, model_dir, export_dir):
    # User 1 and item 1 exist; user 99999 and item 77777 were never seen.
    users, items = [1, 1, 943, 99999], [1, 50, 1682, 77777]
    reloaded = score_saved_model(export.latest_version(export_dir), users,
                                 items)
    self.assertAllClose(reloaded,
                        scores_from_checkpoint(model_dir, users, items),
                        rtol=1e-6, atol=1e-7)
    self.assertTrue(np.all(np.isfinite(reloaded)))

  def test_hash_mode(self):
    out = os.path.join(self.dir, "hash")
    # The item vocabulary is the catalog negatives come from, as in vocab mode.
    code, log = run_task(*self.common, "--id_mode=hash", "--num_bins=4096",
                         f"--negative_catalog={self.vocab}/item_id.txt",
                         f"--model_dir={out}/model",
                         f"--export_dir={out}/export")
    self.assertEqual(code, 0, log[-3000:])
    with open(f"{out}/model/metrics.json") as f:
      metrics = json.load(f)
    # Held-out positives against 4 random items each: well above chance.
    self.assertGreater(metrics["eval"]["auc"], 0.75)
    self.assertEqual(metrics["eval_rows"], 943)
    self.check_export(f"{out}/model", f"{out}/export")

  def test_vocab_mode(self):
    out = os.path.join(self.dir, "vocab_run")
    self.assertEqual(self.vocab_summary["user_id"]["size"], 943)
    code, log = run_task(*self.common, "--id_mode=vocab",
                         f"--vocab_dir={self.vocab}",
                         f"--model_dir={out}/model",
                         f"--export_dir={out}/export")
    self.assertEqual(code, 0, log[-3000:])
    self.assertIn("Negatives: 4 per positive, uniform over", log)
    with open(f"{out}/model/metrics.json") as f:
      self.assertGreater(json.load(f)["eval"]["auc"], 0.75)
    self.check_export(f"{out}/model", f"{out}/export")


if __name__ == "__main__":
  tf.test.main()
