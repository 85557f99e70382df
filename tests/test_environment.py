"""The trainer under Vertex AI: AIP_* folders, CLUSTER_SPEC -> TF_CONFIG."""

import gzip
import json
import os
import subprocess
import sys
from unittest import mock

from absl import flags
from absl.testing import flagsaver
import tensorflow as tf

from trainer import config as config_lib
from trainer import environment
from trainer import export
from trainer import strategy as strategy_lib
from trainer import task  # Defines the trainer's flags.

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What Vertex AI sets for a job with base output directory gs://b/job.
VERTEX_ENV = {
    "AIP_MODEL_DIR": "gs://b/job/model/",
    "AIP_CHECKPOINT_DIR": "gs://b/job/checkpoints/",
    "AIP_TENSORBOARD_LOG_DIR": "gs://b/job/logs/",
}
# Chief + 2 workers, as Vertex AI writes it on the second worker.
CLUSTER_SPEC = json.dumps({
    "cluster": {"workerpool0": ["cmle-training-workerpool0-0:2222"],
                "workerpool1": ["cmle-training-workerpool1-0:2222",
                                "cmle-training-workerpool1-1:2222"]},
    "environment": "cloud",
    "task": {"type": "workerpool1", "index": 1, "trial": ""},
    "job": "{\"python_module\": \"trainer.task\"}"})


class EnvironmentTest(tf.test.TestCase):

  def test_default_dirs_from_vertex_variables(self):
    self.assertEqual(environment.default_dirs(VERTEX_ENV), {
        "model_dir": "gs://b/job/checkpoints",
        "export_dir": "gs://b/job/model",
        "tensorboard_dir": "gs://b/job/logs"})
    # Unset or empty variables give no default.
    self.assertEqual(environment.default_dirs({"AIP_MODEL_DIR": ""}), {})
    self.assertEqual(environment.default_dirs({"HOME": "/root"}), {})

  def test_flags_win_over_the_platform(self):
    fields = environment.apply_defaults({"model_dir": "gs://mine"}, VERTEX_ENV)
    self.assertEqual(fields["model_dir"], "gs://mine")
    self.assertEqual(fields["export_dir"], "gs://b/job/model")

  def test_cluster_spec_becomes_tf_config(self):
    self.assertEqual(
        json.loads(environment.tf_config_from_cluster_spec(CLUSTER_SPEC)),
        {"cluster": {"chief": ["cmle-training-workerpool0-0:2222"],
                     "worker": ["cmle-training-workerpool1-0:2222",
                                "cmle-training-workerpool1-1:2222"]},
         "task": {"type": "worker", "index": 1}})
    spec = json.dumps({"cluster": {"workerpool0": ["a:1"],
                                   "workerpool2": ["p:1", "q:1"]},
                       "task": {"type": "workerpool2", "index": 0}})
    self.assertEqual(
        json.loads(environment.tf_config_from_cluster_spec(spec)),
        {"cluster": {"chief": ["a:1"], "ps": ["p:1", "q:1"]},
         "task": {"type": "ps", "index": 0}})
    with self.assertRaisesRegex(ValueError, "workerpool9"):
      environment.tf_config_from_cluster_spec(
          json.dumps({"cluster": {"workerpool9": ["x:1"]}}))

  def test_tf_config_wins_over_cluster_spec(self):
    env = {"CLUSTER_SPEC": CLUSTER_SPEC}
    self.assertEqual(json.loads(environment.export_tf_config(env))["task"],
                     {"type": "worker", "index": 1})
    self.assertIn("TF_CONFIG", env)
    env = {"CLUSTER_SPEC": CLUSTER_SPEC, "TF_CONFIG": "{\"given\": 1}"}
    self.assertEqual(environment.export_tf_config(env), "{\"given\": 1}")
    self.assertIsNone(environment.export_tf_config({}))

  def test_summary_dir_only_on_the_chief(self):
    runtime = config_lib.RuntimeConfig(model_dir="m", tensorboard_dir="tb")
    self.assertEqual(environment.summary_dir(runtime, "m"), "tb")
    self.assertEqual(environment.summary_dir(runtime, "m/workers/worker-1"),
                     "m/workers/worker-1")
    self.assertEqual(environment.summary_dir(
        config_lib.RuntimeConfig(model_dir="m"), "m"), "m")


class StrategyEnvironmentTest(tf.test.TestCase):

  @mock.patch.dict(os.environ, {"CLUSTER_SPEC": CLUSTER_SPEC}, clear=False)
  def test_multi_worker_reads_cluster_spec(self):
    os.environ.pop("TF_CONFIG", None)
    seen = {}
    def fake_strategy():
      seen["tf_config"] = json.loads(os.environ["TF_CONFIG"])
      return mock.Mock(num_replicas_in_sync=3)
    with mock.patch.object(tf.distribute, "MultiWorkerMirroredStrategy",
                           fake_strategy):
      strategy_lib.make_strategy(
          config_lib.RuntimeConfig(strategy="multi_worker"))
    self.assertEqual(seen["tf_config"]["task"], {"type": "worker", "index": 1})
    self.assertEqual(len(seen["tf_config"]["cluster"]["worker"]), 2)

  def test_parameter_server_needs_parameter_servers(self):
    cluster = {"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]},
               "task": {"type": "chief", "index": 0}}
    with mock.patch.dict(os.environ, {"TF_CONFIG": json.dumps(cluster)}):
      with self.assertRaisesRegex(ValueError, "needs parameter servers"):
        strategy_lib.make_strategy(
            config_lib.RuntimeConfig(strategy="parameter_server"))


class FlagsEnvironmentTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    FLAGS(["task"])

  @flagsaver.flagsaver
  def test_config_from_flags_takes_vertex_dirs(self):
    FLAGS.train_files = ["gs://b/data/train-*"]
    with mock.patch.dict(os.environ, VERTEX_ENV):
      config = config_lib.validate(task.config_from_flags())
    self.assertEqual(config.runtime.model_dir, "gs://b/job/checkpoints")
    self.assertEqual(config.runtime.export_dir, "gs://b/job/model")
    self.assertEqual(config.runtime.tensorboard_dir, "gs://b/job/logs")

  @flagsaver.flagsaver
  def test_given_flags_win_and_no_platform_means_no_change(self):
    FLAGS.train_files = ["a*"]
    FLAGS.model_dir = "m"
    with mock.patch.dict(os.environ, VERTEX_ENV):
      config = task.config_from_flags()
    self.assertEqual(config.runtime.model_dir, "m")
    self.assertEqual(config.runtime.export_dir, "gs://b/job/model")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIP_")}
    with mock.patch.dict(os.environ, clean, clear=True):
      config = task.config_from_flags()
    self.assertEqual((config.runtime.export_dir,
                      config.runtime.tensorboard_dir), ("", ""))


class VertexRunTest(tf.test.TestCase):
  """A real `python -m trainer.task` run with AIP_* set to temp folders."""

  def test_run_writes_where_vertex_says(self):
    d = self.get_temp_dir()
    shard = os.path.join(d, "train-0.csv.gz")
    with gzip.open(shard, "wt") as f:
      for i in range(256):
        f.write(f"{i % 16},{i % 8},{i % 2},{i}\n")
    dirs = {v: os.path.join(d, name) for v, name in (
        ("AIP_CHECKPOINT_DIR", "checkpoints"), ("AIP_MODEL_DIR", "model"),
        ("AIP_TENSORBOARD_LOG_DIR", "logs"))}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.task", f"--train_files={shard}",
         f"--eval_files={shard}", "--train_steps=4", "--batch_size=32",
         "--steps_per_execution=2", "--num_bins=64", "--embedding_dim=4"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, **dirs})
    self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
    ckpt, model, logs = (dirs[v] for v in (
        "AIP_CHECKPOINT_DIR", "AIP_MODEL_DIR", "AIP_TENSORBOARD_LOG_DIR"))
    self.assertTrue(tf.io.gfile.exists(os.path.join(ckpt, "metrics.json")))
    self.assertIsNotNone(tf.train.latest_checkpoint(ckpt))
    # A version folder, as TF Serving expects.
    version = export.latest_version(model)
    self.assertTrue(tf.io.gfile.exists(os.path.join(version, "saved_model.pb")))
    self.assertNotEmpty(tf.io.gfile.listdir(os.path.join(logs, "train")))
    self.assertNotEmpty(tf.io.gfile.listdir(os.path.join(logs, "eval")))
    self.assertFalse(tf.io.gfile.exists(os.path.join(ckpt, "train")))
