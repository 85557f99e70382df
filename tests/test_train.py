"""End-to-end runs of `python -m trainer.task`, each in its own process."""

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from input import synthetic
from trainer import config as config_lib
from trainer import export
from trainer.models import mf as model_lib
from trainer.train import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_task(*flags, timeout=600):
  """Runs the trainer; returns (exit code, combined log)."""
  proc = subprocess.run(
      [sys.executable, "-m", "trainer.task", *flags], cwd=REPO,
      capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stdout + proc.stderr


def score_saved_model(export_dir, users, items):
  """Scores raw IDs with a SavedModel loaded in a fresh Python process."""
  code = (
      "import json, sys, numpy as np, tensorflow as tf\n"
      "m = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
      "u, i = json.loads(sys.argv[2]), json.loads(sys.argv[3])\n"
      "s = m(user_id=tf.constant(u, tf.int64), item_id=tf.constant(i, tf.int64))"
      "['score']\n"
      "print(json.dumps(s.numpy().astype(float).tolist()))\n")
  out = subprocess.run(
      [sys.executable, "-c", code, export_dir, json.dumps(users),
       json.dumps(items)], capture_output=True, text=True, check=True,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


def scores_from_checkpoint(model_dir, users, items):
  """Scores raw IDs with a model rebuilt from the run's config and checkpoint."""
  config = config_lib.load(os.path.join(model_dir, "config.json"))
  model = model_lib.MatrixFactorization(config)
  tf.train.Checkpoint(model=model).restore(
      tf.train.latest_checkpoint(model_dir)).expect_partial()
  logits = model({"user_id": tf.constant(users, tf.int64),
                  "item_id": tf.constant(items, tf.int64)})
  return tf.sigmoid(logits).numpy()


def run_multi_worker(*flags, workers=2, timeout=300):
  """Runs trainer.task as `workers` processes on loopback; (procs, logs)."""
  ports = []
  for _ in range(workers):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      ports.append(s.getsockname()[1])
  procs = []
  for index in range(workers):
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                 "task": {"type": "worker", "index": index}}
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "trainer.task", *flags,
         "--strategy=multi_worker"],
        cwd=REPO, env={**os.environ, "TF_CONFIG": json.dumps(tf_config)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  return procs, logs


def trained_variables(model_dir):
  """{name: value} of the weights and optimizer state of the last checkpoint."""
  path = tf.train.latest_checkpoint(model_dir)
  reader = tf.train.load_checkpoint(path)
  return path, {name: reader.get_tensor(name)
                for name, _ in tf.train.list_variables(path)
                if name.startswith(("model/embedding", "model/global_bias",
                                    "optimizer/"))}


class DemoTest(tf.test.TestCase):
  """The embedded demo, run once, as `make demo` runs it."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.work = os.path.join(cls.get_temp_dir(cls()), "demo")
    cls.code, cls.log = run_task(f"--work_dir={cls.work}")
    cls.model_dir = os.path.join(cls.work, "model")
    cls.export_dir = export.latest_version(os.path.join(cls.work, "export"))

  def test_demo_learns_the_planted_signal(self):
    self.assertEqual(self.code, 0, self.log[-3000:])
    with open(os.path.join(self.model_dir, "metrics.json")) as f:
      metrics = json.load(f)
    self.assertGreaterEqual(metrics["eval"]["auc"], 0.80)
    self.assertEqual(metrics["eval_rows"], 20000)
    self.assertIn("Summary:", self.log)
    self.assertRegex(self.log, r"step \d+/\d+ .*examples/s")

  def test_config_json_reproduces_the_run(self):
    config = config_lib.load(os.path.join(self.model_dir, "config.json"))
    # The run's settings as validated: automatic ones resolved (one thread
    # per op for MF).
    self.assertEqual(config,
                     config_lib.validate(config_lib.demo_preset(self.work)))
    self.assertEqual(config.runtime.intra_op_threads, 1)

  def test_reloaded_export_scores_exactly_as_the_model(self):
    users, items = [0, 1, 2, 1999, 123456789], [5, 6, 7, 999, 987654321]
    # The last pair was never seen: it still gets a score (hash buckets).
    reloaded = score_saved_model(self.export_dir, users, items)
    self.assertAllClose(reloaded,
                        scores_from_checkpoint(self.model_dir, users, items),
                        rtol=1e-6, atol=1e-7)
    self.assertAllInRange(reloaded, 0.0, 1.0)

  def test_exports_are_new_versions_never_overwritten(self):
    versions = os.path.join(self.work, "export")
    self.assertEqual(os.listdir(versions),
                     [os.path.basename(self.export_dir)])  # No temp folder.
    with open(os.path.join(self.model_dir, "metrics.json")) as f:
      self.assertEqual(json.load(f)["export_dir"], self.export_dir)
    model = load_model(self.model_dir)
    data = config_lib.load(os.path.join(self.model_dir, "config.json")).data
    again = export.export_version(model, data, versions)
    self.assertGreater(int(os.path.basename(again)),
                       int(os.path.basename(self.export_dir)))
    self.assertEqual(export.latest_version(versions), again)
    self.assertCountEqual(os.listdir(versions),
                          [os.path.basename(self.export_dir),
                           os.path.basename(again)])

  def test_embedding_tables_are_exported(self):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    table = pq.read_table(os.path.join(self.export_dir,
                                       "item_embeddings.parquet"))
    self.assertEqual(table.column_names, ["id", "embedding", "bias"])
    self.assertEqual(table.num_rows, 100_000)  # One row per hash bucket.
    self.assertLen(table.column("embedding")[0].as_py(), 32)


class StrategyAndFailureTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.get_temp_dir()
    self.data = os.path.join(self.dir, "data")
    synthetic.write_log(self.data, num_rows=60_000, num_users=500,
                        num_items=200, num_shards=4)
    self.common = [f"--train_files={self.data}/train-*",
                   f"--eval_files={self.data}/eval-*", "--num_bins=20000"]

  def test_mirrored_on_two_logical_cpus_matches_one_device(self):
    metrics, logs = {}, {}
    for strategy in ("mirrored", "default"):
      code, logs[strategy] = run_task(*self.common, f"--strategy={strategy}",
                                      "--num_cpu_devices=2", "--epochs=6",
                                      f"--model_dir={self.dir}/{strategy}")
      self.assertEqual(code, 0, logs[strategy][-3000:])
      with open(f"{self.dir}/{strategy}/metrics.json") as f:
        metrics[strategy] = json.load(f)
    self.assertIn("MirroredStrategy with 2 replica(s)", logs["mirrored"])
    self.assertGreater(metrics["mirrored"]["eval"]["auc"], 0.75)
    # Same data, same seed: the global-batch loss and its gradients do not
    # depend on how a batch is split across replicas.
    self.assertAllClose(metrics["mirrored"]["train_loss"],
                        metrics["default"]["train_loss"], rtol=1e-4)
    self.assertAllClose(metrics["mirrored"]["eval"]["auc"],
                        metrics["default"]["eval"]["auc"], rtol=1e-4)

  def test_multi_worker_on_two_local_processes(self):
    procs, logs = run_multi_worker(
        *self.common, "--train_steps=60", "--batch_size=1024",
        f"--model_dir={self.dir}/mw", f"--export_dir={self.dir}/mw_export")
    for p, log in zip(procs, logs):
      self.assertEqual(p.returncode, 0, log[-3000:])
      self.assertIn("with 2 replica(s)", log)
    self.assertIn("Input pipeline 2: 2 files", logs[1])
    # Only the chief's outputs are kept.
    self.assertEqual(tf.train.latest_checkpoint(f"{self.dir}/mw"),
                     f"{self.dir}/mw/ckpt-60")
    self.assertEmpty(tf.io.gfile.glob(f"{self.dir}/mw/workers/*"))
    with open(f"{self.dir}/mw/metrics.json") as f:
      metrics = json.load(f)
    self.assertGreater(metrics["eval"]["auc"], 0.6)
    self.assertLess(metrics["train_loss"], 0.7)

  def test_resumes_after_sigkill(self):
    flags = [*self.common, "--batch_size=128", "--epochs=40",
             "--checkpoint_every_steps=200", "--steps_per_execution=8",
             f"--model_dir={self.dir}/r"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer.task", *flags],
                            cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Wait for a whole checkpoint: its .index file lands before the
    # `checkpoint` file that names it, and a kill between the two leaves none.
    deadline = time.time() + 300
    while time.time() < deadline and not tf.train.latest_checkpoint(
        f"{self.dir}/r"):
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = tf.train.latest_checkpoint(f"{self.dir}/r")
    self.assertIsNotNone(saved, "no checkpoint before the kill")
    self.assertFalse(os.path.exists(f"{self.dir}/r/metrics.json"))
    code, log = run_task(*flags)
    self.assertEqual(code, 0, log[-3000:])
    step = int(re.search(r"Resumed from \S+ at step (\d+)", log).group(1))
    self.assertGreater(step, 0)
    with open(f"{self.dir}/r/metrics.json") as f:
      metrics = json.load(f)
    self.assertEqual(metrics["resumed_from_step"], step)
    self.assertGreater(metrics["steps"], step)
    self.assertEqual(tf.train.latest_checkpoint(f"{self.dir}/r"),
                     f"{self.dir}/r/ckpt-{metrics['steps']}")

  def test_malformed_rows_fail_or_are_skipped_and_counted(self):
    shard = f"{self.data}/train-00001-of-00004.csv.gz"
    with gzip.open(shard, "rt") as f:
      lines = f.read().splitlines()
    # Three planted malformed rows: too few fields, text IDs, text label.
    lines[10] = "1,2,1"
    lines[500] = "abc,7,1,1600000000"
    lines[900] = "3,4,yes,1600000000"
    with gzip.open(shard, "wt") as f:
      f.write("\n".join(lines) + "\n")
    code, log = run_task(*self.common, f"--model_dir={self.dir}/e")
    self.assertNotEqual(code, 0)
    self.assertIn("train-00001-of-00004.csv.gz", log)
    self.assertIn("line 11", log)  # The first bad row, counted from 1.
    code, log = run_task(*self.common, "--bad_rows=skip",
                         f"--model_dir={self.dir}/s")
    self.assertEqual(code, 0, log[-3000:])
    with open(f"{self.dir}/s/metrics.json") as f:
      self.assertEqual(json.load(f)["train_rows_skipped"], 3)
    self.assertIn("Skipped 3 malformed rows", log)

  def test_vocab_mode_builds_its_vocabulary_in_the_counting_pass(self):
    model_dir = f"{self.dir}/v"
    flags = [*self.common, "--id_mode=vocab", "--min_count=100",
             f"--model_dir={model_dir}"]
    code, log = run_task(*flags, "--train_steps=20")
    self.assertEqual(code, 0, log[-3000:])
    self.assertIn("Built vocabularies in the counting pass (min_count 100)",
                  log)
    users, items = [], []
    for path in tf.io.gfile.glob(f"{self.data}/train-*"):
      with gzip.open(path, "rt") as f:
        for line in f:
          u, i = line.split(",")[:2]
          users.append(int(u))
          items.append(int(i))
    for column, ids in (("user_id", users), ("item_id", items)):
      counts = np.bincount(ids)
      kept = np.flatnonzero(counts >= 100)
      with open(f"{model_dir}/vocab/{column}.txt") as f:
        vocab = [int(x) for x in f.read().split()]
      self.assertCountEqual(vocab, kept)
      # Most frequent first.
      self.assertTrue(np.all(np.diff(counts[vocab]) <= 0))
      self.assertIn(f"{column}: vocabulary of {len(kept)} IDs", log)
    # Item counts are Zipf-like: some items fall under min_count.
    self.assertLess(len(np.flatnonzero(np.bincount(items) >= 100)),
                    len(np.unique(items)))
    code, log = run_task(*flags, "--train_steps=40")
    self.assertEqual(code, 0, log[-3000:])
    self.assertIn("Resumed from", log)
    self.assertIn("Reusing the vocabularies this run built", log)
    code, log = run_task(*self.common, "--id_mode=vocab", "--min_count=1000000",
                         f"--model_dir={self.dir}/v0")
    self.assertNotEqual(code, 0)
    self.assertIn("keeps none of the 500 user_id IDs; lower it", log)

  def test_changed_model_settings_refuse_to_resume(self):
    code, _ = run_task(*self.common, "--train_steps=5",
                       f"--model_dir={self.dir}/c")
    self.assertEqual(code, 0)
    code, log = run_task(*self.common, "--train_steps=5", "--embedding_dim=8",
                         f"--model_dir={self.dir}/c")
    self.assertNotEqual(code, 0)
    self.assertIn("embedding_dim: 32 -> 8", log)


class ExactResumeTest(tf.test.TestCase, parameterized.TestCase):
  """Stopped after a checkpoint and resumed = the same run uninterrupted."""

  @parameterized.named_parameters(("default", "default"),
                                  ("mirrored", "mirrored"),
                                  ("multi_worker", "multi_worker"))
  def test_resumed_run_ends_with_the_same_weights(self, strategy):
    folder = self.get_temp_dir()
    data = os.path.join(folder, "data")
    synthetic.write_log(data, num_rows=60_000, num_users=500, num_items=200,
                        num_shards=4)
    # Implicit negatives from the buffer's items, a buffer smaller than the
    # log, 2 replicas per pipeline under mirrored: all of it must replay.
    flags = [f"--train_files={data}/train-*", "--num_bins=5000",
             "--label_mode=implicit", "--num_negatives=4",
             "--shuffle_buffer_rows=20000", "--batch_size=500",
             "--steps_per_execution=8", "--checkpoint_every_steps=1000"]
    if strategy == "mirrored":
      flags += ["--strategy=mirrored", "--num_cpu_devices=2"]

    def train(model_dir, steps):
      args = [*flags, f"--model_dir={model_dir}", f"--train_steps={steps}"]
      if strategy == "multi_worker":
        procs, logs = run_multi_worker(*args)
        for p, log in zip(procs, logs):
          self.assertEqual(p.returncode, 0, log[-3000:])
        return logs[0]
      code, log = run_task(*args)
      self.assertEqual(code, 0, log[-3000:])
      return log

    train(f"{folder}/whole", 48)
    train(f"{folder}/resumed", 24)
    log = train(f"{folder}/resumed", 48)
    self.assertIn("at step 24 of 48", log)
    path, whole = trained_variables(f"{folder}/whole")
    resumed_path, resumed = trained_variables(f"{folder}/resumed")
    self.assertEqual(os.path.basename(path), "ckpt-48")
    self.assertEqual(os.path.basename(resumed_path), "ckpt-48")
    self.assertEqual(sorted(whole), sorted(resumed))
    for name in whole:
      self.assertAllClose(whole[name], resumed[name], rtol=1e-5, atol=1e-7,
                          msg=name)


if __name__ == "__main__":
  tf.test.main()
