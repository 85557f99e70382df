"""gs:// end to end against a local emulator: shards, vocabulary, training,
resume, one-writer lease, versioned export reloaded, and the launcher's upload.

Every TensorFlow step runs in its own process with the emulator's
environment (TF's GCS filesystem reads it when it starts). Skipped if the
emulator cannot start, except in CI (CI=true), where that is a failure.
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import numpy as np
import tensorflow as tf

from input import synthetic
from tests import gcs_emulator
from tests.test_train import REPO

BUCKET = "gs://test-bucket"


def _snippet(code, env, *args, timeout=300):
  """Runs Python code in a fresh process with `env`; returns its last line."""
  out = subprocess.run(
      [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
      text=True, timeout=timeout,
      env={**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": "3",
           "TF_USE_LEGACY_KERAS": "1"})
  if out.returncode:
    raise AssertionError(out.stdout[-2000:] + out.stderr[-4000:])
  return out.stdout.strip().splitlines()[-1]


_SCORES = """
import json, sys
import tensorflow as tf
from trainer import export, train
users, items = json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = train.load_model(sys.argv[1])
logits = model({"user_id": tf.constant(users, tf.int64),
                "item_id": tf.constant(items, tf.int64)})
version = export.latest_version(sys.argv[2])
served = tf.saved_model.load(version).signatures["serving_default"](
    user_id=tf.constant(users, tf.int64), item_id=tf.constant(items, tf.int64))
print(json.dumps({"version": version,
                  "checkpoint": tf.sigmoid(logits).numpy().tolist(),
                  "export": served["score"].numpy().tolist()}))
"""

_LOCK = """
import sys
from trainer import run_lock
first = run_lock.RunLock(sys.argv[1], timeout_secs=30)
first.acquire()
try:
  run_lock.RunLock(sys.argv[1], timeout_secs=30).acquire()
  print("not refused")
except run_lock.RunLockHeld as e:
  first.release()
  run_lock.RunLock(sys.argv[1]).acquire()
  print("refused: " + str(e).replace("\\n", " "))
"""


class GcsEndToEndTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.emulator = gcs_emulator.GcsEmulator()
    try:
      cls.emulator.start()
    except (RuntimeError, OSError, ImportError) as e:
      if os.environ.get("CI"):
        raise
      raise unittest.SkipTest(f"GCS emulator unavailable: {e}")

  @classmethod
  def tearDownClass(cls):
    cls.emulator.stop()
    super().tearDownClass()

  def run_trainer(self, *flags):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.task", *flags], cwd=REPO,
        capture_output=True, text=True, timeout=600,
        env={**os.environ, **self.emulator.env})
    return proc.returncode, proc.stdout + proc.stderr

  def test_train_resume_and_export_on_gcs(self):
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    local = os.path.join(self.get_temp_dir(), "data")
    synthetic.write_log(local, num_rows=30_000, num_users=300, num_items=100,
                        num_shards=3)
    with mock.patch.dict(os.environ, self.emulator.env):
      bucket = storage.Client(project="test").bucket("test-bucket")
      for name in sorted(os.listdir(local)):
        bucket.blob(f"data/{name}").upload_from_filename(
            os.path.join(local, name))
    vocab = _snippet(
        "import sys\nfrom input import csv_dataset, vocab\n"
        "from trainer import config\n"
        "data = config.DataConfig()\n"
        "files = csv_dataset.resolve_files([sys.argv[1]])\n"
        "print(vocab.build(data, files, sys.argv[2])['item_id']['size'])",
        self.emulator.env, f"{BUCKET}/data/train-*", f"{BUCKET}/vocab")
    self.assertEqual(int(vocab), 100)
    flags = [f"--train_files={BUCKET}/data/train-*",
             f"--eval_files={BUCKET}/data/eval-*", "--id_mode=vocab",
             f"--vocab_dir={BUCKET}/vocab", "--batch_size=512",
             "--checkpoint_every_steps=10", "--steps_per_execution=5",
             f"--model_dir={BUCKET}/run", f"--export_dir={BUCKET}/export"]
    code, log = self.run_trainer(*flags, "--train_steps=20")
    self.assertEqual(code, 0, log[-3000:])
    code, log = self.run_trainer(*flags, "--train_steps=40")
    self.assertEqual(code, 0, log[-3000:])
    self.assertIn(f"Resumed from {BUCKET}/run/ckpt-20 at step 20 of 40", log)
    self.assertIn("Holding gs://test-bucket/run/RUN_LOCK", log)
    with mock.patch.dict(os.environ, self.emulator.env):
      names = {b.name for b in bucket.list_blobs(prefix="run/")}
      metrics = json.loads(bucket.blob("run/metrics.json").download_as_text())
    self.assertIn("run/ckpt-40.index", names)
    self.assertNotIn("run/RUN_LOCK", names)  # Released at the end.
    self.assertGreater(metrics["eval"]["auc"], 0.55)
    users, items = [0, 5, 299, 123456], [0, 7, 99, 654321]
    scores = json.loads(_snippet(_SCORES, self.emulator.env, f"{BUCKET}/run",
                                 f"{BUCKET}/export", json.dumps(users),
                                 json.dumps(items)))
    self.assertEqual(scores["version"], metrics["export_dir"])
    self.assertRegex(scores["version"], rf"^{BUCKET}/export/\d+$")
    self.assertAllClose(scores["export"], scores["checkpoint"], rtol=1e-6)
    self.assertTrue(np.all(np.isfinite(scores["export"])))

  def test_one_writer_lease_on_gcs(self):
    out = _snippet(_LOCK, self.emulator.env, f"{BUCKET}/locked")
    self.assertRegex(out, rf"refused: {BUCKET}/locked is held by a live run: "
                          rf"host \S+, pid \d+")

  def test_launcher_uploads_the_package(self):
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    from launch import vertex  # pylint: disable=g-import-not-at-top
    request = vertex.JobRequest(project="test", region="us-central1",
                                staging_bucket=f"{BUCKET}/staging",
                                machine="cpu", job_name="job-1")
    with tempfile.NamedTemporaryFile(suffix=".tar.gz") as sdist:
      sdist.write(b"not really a package")
      sdist.flush()
      with mock.patch.dict(os.environ, self.emulator.env):
        uri = vertex.upload_package(request, sdist.name)
        blob = storage.Client(project="test").bucket("test-bucket").blob(
            uri[len(f"{BUCKET}/"):])
        self.assertEqual(blob.download_as_bytes(), b"not really a package")
    self.assertEqual(uri, f"{BUCKET}/staging/cf-trainer/job-1/package/"
                          f"{os.path.basename(sdist.name)}")


if __name__ == "__main__":
  tf.test.main()
