"""The two-tower retrieval model: features, logQ, global negatives, learning, exports."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import tensorflow as tf

from input import synthetic
from trainer import config as config_lib
from trainer import export
from trainer import train
from trainer.metrics import ranking as ranking_metrics
from trainer.models import features
from trainer.models import presets
from trainer.models import two_tower

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FeatureTest(tf.test.TestCase):

  def test_cyclical_by_hand(self):
    # 06:00 is a quarter of the day; 1970-01-05 was a Monday (weekday 0),
    # 1970-01-08 a Thursday (3/7); 2021-03-15 is in March (month 2 of 12).
    t = tf.constant([6 * 3600, 4 * 86400, 7 * 86400, 1615766400], tf.int64)
    hour = features.cyclical(t, "hour").numpy()
    self.assertAllClose(hour[0], [1.0, 0.0], atol=1e-6)
    weekday = features.cyclical(t, "weekday").numpy()
    self.assertAllClose(weekday[1], [0.0, 1.0], atol=1e-6)
    angle = 2 * np.pi * 3 / 7
    self.assertAllClose(weekday[2], [np.sin(angle), np.cos(angle)], atol=1e-6)
    month = features.cyclical(t, "month").numpy()
    angle = 2 * np.pi * 2 / 12
    self.assertAllClose(month[3], [np.sin(angle), np.cos(angle)], atol=1e-6)

  def test_recency_weights_by_hand(self):
    # Histories of 3 and 1 items, oldest first; log-weights by age 0, -1, -2.
    w = features.recency_weights(tf.constant([3, 1], tf.int64),
                                 tf.constant([0.0, -1.0, -2.0]), 3)
    e = np.exp([-2.0, -1.0, 0.0])
    self.assertAllClose(w[0], e / e.sum())
    self.assertAllClose(w[1], [1.0])

  def test_text_tokens_and_vectors_by_hand(self):
    tokens = features.text_tokens(tf.constant(["Toy Story (1995)", ""]))
    self.assertAllEqual(tokens.to_list(), [[b"toy", b"story", b"1995"], []])
    self.assertAllClose(features.parse_vectors(["1 2", "", "0.5 -1"], " "),
                        [[1, 2], [0, 0], [0.5, -1]])
    with self.assertRaisesRegex(ValueError, "different lengths"):
      features.parse_vectors(["1 2", "3"], " ")

  def test_bad_configurations_are_named(self):
    with self.assertRaisesRegex(ValueError, "type must be one of"):
      features.parse('{"query": [{"name": "a", "type": "image"}], '
                     '"candidate": [{"name": "item_id", "type": "id"}]}',
                     "user_id", "item_id")
    with self.assertRaisesRegex(ValueError, "side file"):
      features.parse('{"query": [{"name": "age", "type": "numeric", '
                     '"source": "user"}], "candidate": [{"name": "item_id", '
                     '"type": "id"}]}', "user_id", "item_id")
    with self.assertRaisesRegex(ValueError, "item id feature"):
      features.parse('{"query": [{"name": "user_id", "type": "id"}], '
                     '"candidate": [{"name": "g", "type": "categorical"}]}',
                     "user_id", "item_id")


class StreamingFrequencyTest(tf.test.TestCase):

  def test_gaps_by_hand(self):
    f = two_tower.StreamingFrequency(buckets=1 << 16, alpha=0.5)
    ids = lambda *x: tf.constant(x, tf.int64)
    # Before any step every item looks rare: gap 1/alpha = 2 steps.
    self.assertAllClose(f.probability(ids(7)), [0.5])
    f.update(ids(7), tf.constant(0))   # Seen at step 0: no gap yet.
    f.update(ids(7), tf.constant(4))   # Gap 4: B = 0.5 * 2 + 0.5 * 4 = 3.
    self.assertAllClose(f.probability(ids(7)), [1 / 3])
    f.update(ids(7), tf.constant(5))   # Gap 1: B = 0.5 * 3 + 0.5 * 1 = 2.
    self.assertAllClose(f.probability(ids(7)), [1 / 2])
    self.assertAllClose(f.probability(ids(8)), [0.5])  # Never seen.


def _write_csv(path, columns):
  with pa.CompressedOutputStream(path, "gzip") as out:
    pcsv.write_csv(pa.table(columns), out)


def _leave_last_out(cols):
  """A synthetic log of choices -> (train rows, held-out rows), each user's
  latest row held out, with the history column of each row."""
  keep = np.ones(len(cols["user_id"]), bool)
  users, items, times = (cols["user_id"][keep], cols["item_id"][keep],
                         cols["timestamp"][keep])
  order = np.lexsort((times, users))
  users, items, times = users[order], items[order], times[order]
  last = np.r_[users[1:] != users[:-1], True]
  history, prev = [], []
  for i in range(len(users)):
    if i and users[i] != users[i - 1]:
      prev = []
    history.append("|".join(map(str, prev[-20:])))
    prev.append(items[i])
  history = np.array(history, dtype=object)
  rows = dict(user_id=users, item_id=items, timestamp=times, history=history)
  train_rows = {k: v[~last] for k, v in rows.items()}
  held = {k: v[last] for k, v in rows.items()}
  shuffle = np.random.default_rng(0).permutation(len(train_rows["user_id"]))
  return {k: v[shuffle] for k, v in train_rows.items()}, held


COLUMNS = ("user_id", "item_id", "timestamp", "history")
TYPES = ("int64", "int64", "int64", "string")


def _config(tmp, features_json, **retrieval):
  return config_lib.Config(
      data=config_lib.DataConfig(
          train_files=(f"{tmp}/train-*.csv.gz",),
          eval_files=(f"{tmp}/held-*.csv.gz",), columns=COLUMNS,
          column_types=TYPES, header=True, label_mode="implicit",
          num_negatives=0),
      model=config_lib.ModelConfig(
          kind="two_tower", id_mode="hash", embedding_dim=32, tables=(
              config_lib.TableConfig("user_id", salt=1, num_bins=4000,
                                     optimizer="lazy_adam",
                                     learning_rate=0.003),
              config_lib.TableConfig("item_id", salt=2, num_bins=4000,
                                     optimizer="lazy_adam",
                                     learning_rate=0.003))),
      train=config_lib.TrainConfig(batch_size=256, epochs=8, optimizer="adam",
                                   learning_rate=0.003, log_every_steps=500,
                                   checkpoint_every_steps=100000),
      runtime=config_lib.RuntimeConfig(model_dir=f"{tmp}/model",
                                       export_dir=f"{tmp}/export"),
      retrieval=config_lib.RetrievalConfig(features=features_json,
                                           output_dim=32, **retrieval))


def _file_vectors(path):
  return pcsv.read_csv(path).column("vector").to_pylist()


class LearnsAndExportsTest(tf.test.TestCase):
  """A planted log: the model must beat popularity, and its exports agree."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tmp = os.path.join(
        os.environ.get("TEST_TMPDIR", "/tmp"), f"two_tower_{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    # Flat popularity, personal choices: an oracle scoring the planted
    # affinities gets Recall@10 0.43, popularity 0.10.
    cols = synthetic.choices(30_000, 1_000, 300, zipf=0.0, sharpness=4.0,
                             seed=3)
    cls.train_rows, cls.held = _leave_last_out(cols)
    n = len(cls.train_rows["user_id"])
    for k in range(3):  # Several shards, more rows than a read block.
      _write_csv(f"{tmp}/train-{k}.csv.gz",
                 {c: cls.train_rows[c][k * n // 3:(k + 1) * n // 3]
                  for c in COLUMNS})
    _write_csv(f"{tmp}/held-0.csv.gz", {c: cls.held[c] for c in COLUMNS})
    rng = np.random.default_rng(0)
    _write_csv(f"{tmp}/users.csv.gz", {
        "user_id": np.arange(1000), "age": rng.integers(18, 70, 1000),
        "occupation": rng.choice(["a", "b", "c"], 1000)})
    _write_csv(f"{tmp}/items.csv.gz", {
        "item_id": np.arange(300),
        "genres": ["|".join(rng.choice(["x", "y", "z"], 2)) for _ in range(300)],
        "year": rng.integers(1950, 2000, 300),
        "title": [f"The {w} of item {i}" for i, w in
                  enumerate(rng.choice(["Night", "Day", "Sea"], 300))],
        "vector": [" ".join(f"{x:.3f}" for x in v)
                   for v in rng.normal(size=(300, 5))]})

  def _popularity_recall(self):
    items = np.arange(300)
    counts = np.bincount(self.train_rows["item_id"], minlength=300)
    scores = counts[None, :].astype(float)
    return ranking_metrics.full_catalog_metrics(
        lambda u: np.repeat(scores, len(u), axis=0),
        self.train_rows["user_id"], self.train_rows["item_id"],
        self.held["user_id"], ranking_metrics.index_of(items,
                                                       self.held["item_id"]),
        300, ks=(10,))["hr@10"]

  def test_learns_three_times_popularity(self):
    spec = json.dumps({"query": [{"name": "user_id", "type": "id"}],
                       "candidate": [{"name": "item_id", "type": "id"}]})
    tmp = os.path.join(self.tmp, "ids")
    os.makedirs(tmp, exist_ok=True)
    for f in glob.glob(f"{self.tmp}/*.csv.gz"):
      os.symlink(f, os.path.join(tmp, os.path.basename(f)))
    config = _config(tmp, spec, logq="streaming", temperature=0.1)
    config = config_lib.replace(config, runtime={"export_dir": ""})
    summary = train.train_and_evaluate(config)
    popularity = self._popularity_recall()
    recall = summary["eval"]["recall@10"]
    print(f"two-tower recall@10 {recall:.4f}, popularity {popularity:.4f}")
    self.assertEqual(summary["eval"]["num_eval"], 1000)
    self.assertGreater(recall, 3 * popularity)

  def test_mixed_negatives_come_from_the_catalog_reproducibly(self):
    spec = json.dumps({
        "side_files": {"item": {"path": f"{self.tmp}/items.csv.gz"}},
        "query": [{"name": "user_id", "type": "id"}],
        "candidate": [{"name": "item_id", "type": "id"}]})
    config = _config(self.tmp, spec, logq="streaming", mixed_negatives=7)
    model = two_tower.TwoTower(config)
    model.compile(optimizer="sgd")
    cands, ids = tf.zeros([4, 32]), tf.constant([1, 2, 3, 4], tf.int64)
    prob = tf.fill([4], 0.5)
    out, out_ids, out_prob = model._with_mixed_negatives(cands, ids, prob,
                                                         False)
    again = model._with_mixed_negatives(cands, ids, prob, False)[1]
    self.assertEqual(out.shape, (11, 32))
    self.assertAllEqual(out_ids[:4], ids)
    self.assertAllInSet(out_ids[4:].numpy(), set(range(300)))
    self.assertAllEqual(out_ids, again)  # Same step: the same draws.
    self.assertAllClose(out_prob[4:], [7 / 300] * 7)
    model.optimizer.iterations.assign(1)
    self.assertNotAllEqual(
        model._with_mixed_negatives(cands, ids, prob, False)[1][4:],
        out_ids[4:])
    # Training with them runs.
    config = config_lib.replace(config, train={"epochs": 1},
                                runtime={"export_dir": "",
                                         "model_dir": f"{self.tmp}/mixed"})
    summary = train.train_and_evaluate(config)
    self.assertGreater(summary["eval"]["recall@10"], 0.1)

  def test_every_feature_type_and_exports_reload_exactly(self):
    tmp = self.tmp
    spec = {"side_files": {"user": {"path": f"{tmp}/users.csv.gz"},
                           "item": {"path": f"{tmp}/items.csv.gz"}},
            "query": [{"name": "user_id", "type": "id", "dim": 16},
                      {"name": "age", "type": "numeric", "source": "user"},
                      {"name": "occupation", "type": "categorical",
                       "source": "user", "dim": 4},
                      {"name": "hour", "type": "cyclical",
                       "column": "timestamp", "period": "hour"},
                      {"name": "time", "type": "numeric",
                       "column": "timestamp"}],
            "candidate": [{"name": "item_id", "type": "id"},
                          {"name": "genres", "type": "categorical",
                           "source": "item", "separator": "|", "dim": 4},
                          {"name": "year", "type": "numeric",
                           "source": "item", "batch_norm": True},
                          {"name": "title", "type": "text", "source": "item",
                           "dim": 4, "num_bins": 64},
                          {"name": "vector", "type": "pretrained",
                           "source": "item"}]}
    text, fields = presets.apply("history", json.dumps(spec))
    config = _config(tmp, text, scann=True, **fields)
    # MLflow's file store is in maintenance mode; it still serves tests.
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    config = config_lib.replace(
        config, train={"epochs": 1},
        runtime={"mlflow_uri": f"file://{tmp}/mlruns",
                 "mlflow_experiment": "test"})
    summary = train.train_and_evaluate(config)
    import mlflow  # pylint: disable=g-import-not-at-top
    client = mlflow.tracking.MlflowClient(f"file://{tmp}/mlruns")
    run = client.get_run(summary["mlflow_run_id"])
    self.assertEqual(run.data.params["model.kind"], "two_tower")
    self.assertAlmostEqual(run.data.metrics["eval.recall_at_10"],
                           summary["eval"]["recall@10"], places=6)
    self.assertEqual({a.path for a in client.list_artifacts(run.info.run_id)},
                     {"config.json", "metrics.json", "item_embeddings.parquet"})
    version = summary["export_dir"]
    # The row numeric feature was standardised with the log's own moments,
    # measured in the counting pass and kept in config.json.
    saved = config_lib.load(f"{tmp}/model/config.json")
    time_feature = [f for f in json.loads(saved.retrieval.features)["query"]
                    if f["name"] == "time"][0]
    self.assertAllClose([time_feature["mean"], time_feature["std"]],
                        [self.train_rows["timestamp"].mean(),
                         self.train_rows["timestamp"].std()], rtol=1e-6)
    model = train.load_model(f"{tmp}/model")
    # Frozen pretrained vectors come back exactly as the file gives them.
    self.assertAllClose(model.pretrained["vector"].numpy()[:300],
                        features.parse_vectors(
                            _file_vectors(f"{tmp}/items.csv.gz"), " "))
    model.set_catalog(np.arange(300))
    queries = {c: self.held[c][:20] for c in ("user_id", "timestamp",
                                               "history")}
    q = model.query_embedding({c: tf.constant(v) for c, v in queries.items()})
    c = model.candidate_embedding(tf.constant(np.arange(300)))
    scores = (q @ tf.transpose(c)).numpy()
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    code = (
        "import json, sys, numpy as np, tensorflow as tf\n"
        "d = json.loads(sys.argv[2])\n"
        "m = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "out = m(user_id=tf.constant(d['user_id'], tf.int64),"
        " timestamp=tf.constant(d['timestamp'], tf.int64),"
        " history=tf.constant(d['history']), k=tf.constant(10),"
        " exclude=tf.constant([[-1]] * len(d['user_id']), tf.int64))\n"
        "q = tf.saved_model.load(sys.argv[1] + '/query_tower')"
        ".signatures['serving_default']\n"
        "e = q(user_id=tf.constant(d['user_id'], tf.int64),"
        " timestamp=tf.constant(d['timestamp'], tf.int64),"
        " history=tf.constant(d['history']))['embedding']\n"
        "print(json.dumps({'ids': out['item_ids'].numpy().tolist(),"
        " 'scores': out['scores'].numpy().tolist(),"
        " 'q': e.numpy().tolist()}))\n")
    args = json.dumps({k: v.tolist() for k, v in queries.items()})
    proc = subprocess.run([sys.executable, "-c", code, version, args],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertAllEqual(out["ids"], expected)
    self.assertAllClose(out["scores"],
                        np.take_along_axis(scores, expected, 1), atol=1e-5)
    # The query tower and the Parquet item embeddings give the same scores.
    table = pq.read_table(os.path.join(version, "item_embeddings.parquet"))
    ids = np.array(table.column("id").to_pylist())
    emb = np.array(table.column("embedding").to_pylist())
    self.assertAllEqual(ids, np.arange(300))
    self.assertAllClose(np.array(out["q"]) @ emb.T, scores, atol=1e-5)
    # Excluded items are never returned.
    history = glob.glob(f"{tmp}/export/embeddings/run_date=*/run_id=*/"
                        "items.parquet")
    self.assertLen(history, 1)
    meta = pq.read_table(history[0])
    self.assertEqual(set(meta.column_names),
                     {"id", "embedding", "run_id", "run_time", "config_hash"})
    self.assertGreater(summary["eval"]["recall@10"], 0.0)
    # A ScaNN index of the same embeddings (17 leaves of 300 items, 3
    # searched), its recall measured on the 1,000 held-out queries.
    self.assertTrue(tf.io.gfile.exists(f"{version}/scann/scann_config.pb"))
    self.assertEqual(summary["scann_queries"], 1000)
    print(f"ScaNN over the catalog: recall@10 {summary['scann_recall@10']}")
    self.assertGreater(summary["scann_recall@10"], 0.5)


class ScannIndexTest(tf.test.TestCase):
  """The ScaNN index: its recall as measured by hand, reloaded elsewhere."""

  def test_recall_against_brute_force_and_reload(self):
    rng = np.random.default_rng(0)
    # 1,000 clusters, wide: ScaNN measured recall@10 0.886 here.
    centers = rng.normal(size=(1000, 32))
    items = centers[rng.integers(0, 1000, 20_000)] + rng.normal(
        size=(20_000, 32))
    queries = centers[rng.integers(0, 1000, 500)] + rng.normal(size=(500, 32))
    path = os.path.join(self.get_temp_dir(), "scann")
    info = export.write_scann_index(items, queries, path)
    self.assertEqual((info["scann_items"], info["scann_queries"]),
                     (20_000, 500))
    # A fresh process loads the index; its neighbours give, by hand, the
    # recall the export reported.
    code = ("import sys, numpy as np\n"
            "from scann.scann_ops.py import scann_ops_pybind\n"
            "s = scann_ops_pybind.load_searcher(sys.argv[1])\n"
            "q = np.load(sys.argv[2])\n"
            "np.save(sys.argv[3], s.search_batched(q)[0])\n")
    np.save(f"{path}-q.npy", queries.astype(np.float32))
    subprocess.run([sys.executable, "-c", code, path, f"{path}-q.npy",
                    f"{path}-found.npy"], check=True, capture_output=True)
    found = np.load(f"{path}-found.npy")
    scores = queries.astype(np.float32) @ items.astype(np.float32).T
    exact = np.argsort(-scores, axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10
                      for a, b in zip(found, exact)])
    print(f"ScaNN recall@10 {info['scann_recall@10']:.4f} (by hand "
          f"{recall:.4f}), {info['scann_search_ms_per_query']:.3f} ms/query")
    self.assertAlmostEqual(recall, info["scann_recall@10"], places=6)
    self.assertGreater(recall, 0.8)
    self.assertLess(recall, 1.0)  # Approximate: a fifth of the leaves.


class GlobalNegativesTest(tf.test.TestCase):
  """On 2 mirrored CPU devices each query sees the whole global batch."""

  def test_mirrored_loss_equals_the_single_device_loss(self):
    code = r'''
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import config as config_lib
from trainer import export
from trainer.models import two_tower
spec = json.dumps({"query": [{"name": "user_id", "type": "id"}],
                   "candidate": [{"name": "item_id", "type": "id"}]})
def build(global_negatives):
  config = config_lib.Config(
      data=config_lib.DataConfig(label_mode="implicit"),
      model=config_lib.ModelConfig(kind="two_tower", embedding_dim=8, tables=(
          config_lib.TableConfig("user_id", num_bins=50),
          config_lib.TableConfig("item_id", num_bins=50, salt=2))),
      retrieval=config_lib.RetrievalConfig(
          features=spec, output_dim=4, global_negatives=global_negatives,
          remove_accidental_hits=False))
  return two_tower.TwoTower(config)
rng = np.random.default_rng(0)
feats = {"user_id": tf.constant(rng.integers(0, 40, 8)),
         "item_id": tf.constant(np.arange(8) * 3)}
labels = tf.ones([8])
single = build(True)
loss_single = float(single.compute_loss((feats, labels)))
out = {"single": loss_single}
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for name, flag in (("global", True), ("local", False)):
  with strategy.scope():
    m = build(flag)
  ds = strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors((feats, labels)))
  batch = next(iter(ds))
  strategy.run(lambda b: m.compute_loss(b), args=(batch,))  # Builds it.
  m.set_weights(single.get_weights())
  per_replica = strategy.run(lambda b: m.compute_loss(b), args=(batch,))
  out[name] = float(strategy.reduce("SUM", per_replica, axis=None))
print(json.dumps(out))
'''
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Global negatives: each replica's 4 queries are scored against all 8
    # candidates, exactly as on one device. Per replica, only against 4.
    self.assertAllClose(out["global"], out["single"], rtol=1e-5)
    self.assertNotAllClose(out["local"], out["single"], rtol=1e-3)


if __name__ == "__main__":
  tf.test.main()
