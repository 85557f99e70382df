"""Preemption: SIGKILL at 5 random points, restarted each time, ends as if never stopped."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import tensorflow as tf

from input import synthetic
from trainer import export
from tests.test_train import REPO, run_task


def checkpoint_steps(model_dir):
  """Steps of the whole checkpoints: those the `checkpoint` file names (it is
  written after a checkpoint's files)."""
  state = tf.train.get_checkpoint_state(model_dir)
  if state is None:
    return []
  return sorted(int(p.rsplit("-", 1)[1])
                for p in state.all_model_checkpoint_paths)


class PreemptionTest(tf.test.TestCase):

  def test_five_sigkills_end_like_an_uninterrupted_run(self):
    folder = self.get_temp_dir()
    data = os.path.join(folder, "data")
    synthetic.write_log(data, num_rows=60_000, num_users=500, num_items=200,
                        num_shards=4)
    common = [f"--train_files={data}/train-*", f"--eval_files={data}/eval-*",
              "--num_bins=20000", "--batch_size=256", "--epochs=30",
              "--steps_per_execution=10", "--checkpoint_every_steps=50"]
    killed = [*common, f"--model_dir={folder}/killed",
              f"--export_dir={folder}/killed_export"]
    rng = random.Random(13)
    kills = 0
    while kills < 5:
      before = checkpoint_steps(f"{folder}/killed")
      proc = subprocess.Popen([sys.executable, "-m", "trainer.task", *killed],
                              cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
      # Wait for a checkpoint newer than those before this start, then kill
      # at a random moment after it.
      deadline = time.time() + 300
      while (time.time() < deadline and proc.poll() is None and
             checkpoint_steps(f"{folder}/killed")[-1:] == before[-1:]):
        time.sleep(0.05)
      # A random moment within a few hundred steps (0.3 s; steps of 256
      # take 0.4-1 ms here): five kills fit in the run's ~7,000 steps with
      # room to spare.
      time.sleep(rng.uniform(0.0, 0.3))
      if proc.poll() is not None:
        self.fail(f"The run ended before kill {kills + 1}; make it longer.")
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      kills += 1
      # Whatever the moment, the latest checkpoint is a whole one.
      latest = tf.train.latest_checkpoint(f"{folder}/killed")
      self.assertIsNotNone(latest)
      reader = tf.train.load_checkpoint(latest)
      self.assertNotEmpty(reader.get_variable_to_shape_map())
      version = export.latest_version(f"{folder}/killed_export")
      if version is not None:
        self.assertTrue(tf.io.gfile.exists(f"{version}/saved_model.pb"))
    code, log = run_task(*killed)
    self.assertEqual(code, 0, log[-3000:])
    self.assertIn("Resumed from", log)
    code, log = run_task(*common, f"--model_dir={folder}/whole")
    self.assertEqual(code, 0, log[-3000:])
    with open(f"{folder}/killed/metrics.json") as f:
      interrupted = json.load(f)
    with open(f"{folder}/whole/metrics.json") as f:
      whole = json.load(f)
    self.assertEqual(interrupted["steps"], whole["steps"])
    self.assertGreater(interrupted["resumed_from_step"], 0)
    print(f"AUC after 5 SIGKILLs {interrupted['eval']['auc']:.6f}, "
          f"uninterrupted {whole['eval']['auc']:.6f}")
    self.assertAllClose(interrupted["eval"]["auc"], whole["eval"]["auc"],
                        atol=0.002)
    self.assertEqual(export.latest_version(f"{folder}/killed_export"),
                     interrupted["export_dir"])


if __name__ == "__main__":
  tf.test.main()
