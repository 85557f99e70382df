"""--strategy=parameter_server: a chief, 2 workers and 2 parameter servers as processes."""

import json
import os
import socket
import subprocess
import sys

import tensorflow as tf

from input import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ports(n):
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


class ParameterServerTest(tf.test.TestCase):

  def test_sharded_tables_reach_the_single_process_auc(self):
    tmp = self.get_temp_dir()
    data = os.path.join(tmp, "data")
    synthetic.write_log(data, num_rows=60_000, num_users=500, num_items=200,
                        num_shards=4)
    # 20,000 bins x 33 floats = 2.6 MB per table: two shards of >= 256 KiB.
    common = [f"--train_files={data}/train-*", f"--eval_files={data}/eval-*",
              "--num_bins=20000", "--epochs=6", "--batch_size=512",
              "--log_every_steps=50", "--checkpoint_every_steps=100"]
    single = subprocess.run(
        [sys.executable, "-m", "trainer.task", *common,
         f"--model_dir={tmp}/single"], cwd=REPO, capture_output=True,
        text=True, timeout=600)
    self.assertEqual(single.returncode, 0, single.stderr[-3000:])

    ports = _ports(5)
    cluster = {"chief": [f"127.0.0.1:{ports[0]}"],
               "worker": [f"127.0.0.1:{p}" for p in ports[1:3]],
               "ps": [f"127.0.0.1:{p}" for p in ports[3:5]]}
    tasks = [("chief", 0), ("worker", 0), ("worker", 1), ("ps", 0), ("ps", 1)]
    procs = []
    for kind, index in tasks:
      env = {**os.environ, "TF_CONFIG": json.dumps(
          {"cluster": cluster, "task": {"type": kind, "index": index}})}
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "trainer.task", *common,
           "--strategy=parameter_server", f"--model_dir={tmp}/ps",
           f"--export_dir={tmp}/ps_export"], cwd=REPO, env=env,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
      chief_log = procs[0].communicate(timeout=600)[0]
    finally:
      for p in procs[1:]:  # Workers and parameter servers serve until stopped.
        p.kill()
      server_logs = [p.communicate()[0] for p in procs[1:]]
    self.assertEqual(procs[0].returncode, 0, chief_log[-4000:])
    for log in server_logs:
      self.assertIn("Serving as", log)
    with open(f"{tmp}/single/metrics.json") as f:
      auc_single = json.load(f)["eval"]["auc"]
    with open(f"{tmp}/ps/metrics.json") as f:
      ps_metrics = json.load(f)
    auc_ps = ps_metrics["eval"]["auc"]
    print(f"AUC single process {auc_single:.6f}, parameter servers "
          f"{auc_ps:.6f}; log-loss {ps_metrics['eval']['log_loss']:.6f}")
    print(chief_log[-2500:])
    self.assertGreater(auc_single, 0.8)
    self.assertAlmostEqual(auc_ps, auc_single, delta=0.01)
    # Same number of steps; each table split over both parameter servers.
    with open(f"{tmp}/single/metrics.json") as f:
      self.assertEqual(ps_metrics["steps"], json.load(f)["steps"])
    # The tables are updated on the servers, with TensorFlow's ops (the
    # servers need not have built the fused ones); a single process fuses.
    self.assertIn("Sparse table updates: TensorFlow's gather/scatter ops",
                  chief_log)
    if os.environ.get("CI"):
      self.assertIn("Sparse table updates: fused row updates", single.stderr)
    self.assertIn("user_id_table: 2 shards on /job:ps/replica:0/task:0, "
                  "/job:ps/replica:0/task:1", chief_log)
    self.assertIn("item_id_table: 2 shards", chief_log)
    # The export is whole and serves.
    self.assertLen(tf.io.gfile.glob(f"{tmp}/ps_export/*/saved_model.pb"), 1)


if __name__ == "__main__":
  tf.test.main()
