"""One writer per model_dir: the lease, alone and between real trainer runs."""

import json
import os
import signal
import subprocess
import sys
import time

import tensorflow as tf

from input import synthetic
from trainer import run_lock
from tests.test_train import REPO, run_task


class RunLockTest(tf.test.TestCase):

  def test_a_live_lease_is_refused_naming_its_holder(self):
    folder = self.get_temp_dir()
    first = run_lock.RunLock(folder, timeout_secs=30)
    first.acquire()
    with self.assertRaisesRegex(
        run_lock.RunLockHeld,
        rf"held by a live run: host \S+, pid {os.getpid()}, since .* taken "
        r"over after 30s"):
      run_lock.RunLock(folder, timeout_secs=30).acquire()
    first.release()
    self.assertFalse(os.path.exists(first.path))
    with run_lock.RunLock(folder):
      self.assertTrue(os.path.exists(first.path))

  def test_a_silent_or_dead_holder_is_taken_over(self):
    folder = self.get_temp_dir()
    path = os.path.join(folder, run_lock.LOCK_NAME)
    for holder in (
        # Another host, silent for longer than the timeout.
        {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 100},
        # This host, fresh heartbeat, but its process is gone.
        {"host": os.uname().nodename, "pid": 2 ** 22 + 7,
         "heartbeat": time.time()}):
      with open(path, "w") as f:
        json.dump({**holder, "token": "x", "started": "then"}, f)
      with run_lock.RunLock(folder, timeout_secs=30) as lease:
        with open(path) as f:
          self.assertEqual(json.load(f)["pid"], os.getpid())
      self.assertFalse(os.path.exists(lease.path))
    # Another host, renewing: refused.
    with open(path, "w") as f:
      json.dump({"host": "elsewhere", "pid": 1, "heartbeat": time.time(),
                 "token": "x", "started": "then"}, f)
    with self.assertRaisesRegex(run_lock.RunLockHeld, "host elsewhere, pid 1"):
      run_lock.RunLock(folder, timeout_secs=30).acquire()

  def test_a_run_that_loses_its_lease_stops_before_its_next_checkpoint(self):
    # Two starts within the same instant on gs:// can both pass acquire (no
    # atomic create there); the one whose record was overwritten must stop.
    folder = self.get_temp_dir()
    data = os.path.join(folder, "data")
    synthetic.write_log(data, num_rows=40_000, num_users=300, num_items=100,
                        num_shards=2)
    flags = [f"--train_files={data}/train-*", "--num_bins=5000",
             "--batch_size=64", "--epochs=200", "--steps_per_execution=1",
             "--checkpoint_every_steps=50", "--lock_timeout_secs=2",
             f"--model_dir={folder}/run"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer.task", *flags],
                            cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    path = os.path.join(folder, "run", run_lock.LOCK_NAME)
    deadline = time.time() + 120
    while not tf.train.latest_checkpoint(f"{folder}/run"):
      self.assertLess(time.time(), deadline, "no checkpoint in 120 s")
      time.sleep(0.2)
    with open(path, "w") as f:  # The other run's record lands.
      json.dump({"host": "elsewhere", "pid": 1, "heartbeat": time.time(),
                 "token": "theirs", "started": "now"}, f)
    taken = time.time()
    log = proc.communicate(timeout=120)[0]
    self.assertEqual(proc.returncode, 1, log[-2000:])
    self.assertIn("lost", log)
    self.assertIn("host elsewhere pid 1", log)
    self.assertLess(time.time() - taken, 60)
    # It wrote nothing after the loss and left the other run's record.
    with open(path) as f:
      self.assertEqual(json.load(f)["token"], "theirs")
    last = int(tf.train.latest_checkpoint(f"{folder}/run").split("-")[-1])
    self.assertLess(last, 200 * 40_000 * 0.9 // 64)

  def test_second_trainer_is_refused_and_a_killed_one_does_not_block(self):
    folder = self.get_temp_dir()
    data = os.path.join(folder, "data")
    synthetic.write_log(data, num_rows=40_000, num_users=300, num_items=100,
                        num_shards=2)
    flags = [f"--train_files={data}/train-*", "--num_bins=5000",
             "--batch_size=128", "--epochs=100", "--steps_per_execution=4",
             "--checkpoint_every_steps=100", f"--model_dir={folder}/m"]
    first = subprocess.Popen([sys.executable, "-m", "trainer.task", *flags],
                             cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
      deadline = time.time() + 300
      while time.time() < deadline and not tf.io.gfile.glob(
          f"{folder}/m/ckpt-*.index"):
        time.sleep(0.2)
      code, log = run_task(*flags)
      self.assertEqual(code, 1, log[-3000:])
      self.assertRegex(log, rf"is held by a live run: host \S+, pid "
                            rf"{first.pid}, since ")
      self.assertIsNone(first.poll(), "the first run must still be going")
    finally:
      first.send_signal(signal.SIGKILL)
      first.wait()
    # Same host, holder gone: the next start takes over at once and resumes.
    code, log = run_task(*flags, "--train_steps=300")
    self.assertEqual(code, 0, log[-3000:])
    self.assertIn("Taking over", log)
    self.assertIn("Resumed from", log)
    self.assertFalse(os.path.exists(f"{folder}/m/{run_lock.LOCK_NAME}"))


if __name__ == "__main__":
  tf.test.main()
