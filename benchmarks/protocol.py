"""The leave-last-out protocol the quality benchmarks share.

Data: a MovieLens folder (ml-100k, ml-1m, ml-latest*) or "synthetic" (the
positives of input.synthetic's planted log) is written as gz CSV shards
train-*, validation-*, test-* by input.movielens.write_splits: per user the
latest interaction is the test item, the one before the validation item.

Two fits are defined on it, each a `Split`:
  "validation": fit on train-*, evaluate on validation-* (for tuning);
  "test": fit on train-* + validation-*, evaluate on test-* (reported).
The catalog of a split is the items of its training files; held-out items
outside it count as misses. Every model -- the baselines and the trainer's
matrix factorization -- is scored by the same full-catalog and sampled
metrics (trainer.ranking_metrics) on the same dense indices.

The trainer is run as `python -m trainer.task` in a subprocess, one per run,
with its log kept beside its model_dir; the scores come from its checkpoint.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import logging
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from input import movielens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = movielens.COLUMNS
# Synthetic log: input.synthetic's planted model (8 latent factors); its
# positives are the interactions. With the demo's settings (Zipf 1.0
# popularity, sharpness 10) popularity alone ranks the held-out item as well
# as any model (NDCG@10 0.311 against MF's 0.315), so the benchmarks use
# flatter popularity and a sharper personal affinity.
SYNTHETIC = dict(num_rows=150_000, num_users=5_000, num_items=1_000,
                 zipf=0.5, sharpness=20.0, seed=0)
SAMPLED_NEGATIVES = 99


@dataclasses.dataclass
class Split:
  """One fit/evaluate pair, with raw IDs mapped to dense indices.

  Attributes:
    name: "validation" or "test".
    train_files: Shards the models are fitted on.
    eval_files: Shards of the held-out items.
    vocab_dir: Vocabularies (min_count 1) of train_files, from input.vocab.
    user_ids: Raw user ID of each user index (every user of the dataset).
    item_ids: Raw item ID of each item index: the catalog, the items of
      train_files.
    train_users, train_items: Dense indices of every training interaction.
    eval_users, eval_items: Dense indices of the held-out pairs; -1 for an item
      outside the catalog (always a miss).
  """
  name: str
  train_files: List[str]
  eval_files: List[str]
  vocab_dir: str
  user_ids: np.ndarray
  item_ids: np.ndarray
  train_users: np.ndarray
  train_items: np.ndarray
  eval_users: np.ndarray
  eval_items: np.ndarray

  @property
  def num_users(self) -> int:
    return len(self.user_ids)

  @property
  def num_items(self) -> int:
    return len(self.item_ids)


def detect_format(src: str) -> str:
  for fmt, (name, _, _) in movielens.FORMATS.items():
    if os.path.exists(os.path.join(src, name)):
      return fmt
  raise FileNotFoundError(
      f"{src} holds none of {[v[0] for v in movielens.FORMATS.values()]}; "
      "pass an unpacked MovieLens folder or --data=synthetic.")


def dataset_name(data: str) -> str:
  return "synthetic" if data == "synthetic" else os.path.basename(
      os.path.normpath(data))


def _synthetic_table() -> pa.Table:
  """The positives of the planted synthetic log, as MovieLens-shaped columns."""
  from input import synthetic  # pylint: disable=g-import-not-at-top
  cols = synthetic.interactions(**SYNTHETIC)
  keep = cols["label"] == 1
  return pa.table({"user_id": cols["user_id"][keep],
                   "item_id": cols["item_id"][keep],
                   "rating": cols["label"][keep],
                   "timestamp": cols["timestamp"][keep]})


def _read(files: Sequence[str]) -> Dict[str, np.ndarray]:
  tables = [pcsv.read_csv(
      f, read_options=pcsv.ReadOptions(column_names=COLUMNS),
      convert_options=pcsv.ConvertOptions(
          column_types={"user_id": pa.int64(), "item_id": pa.int64()},
          include_columns=["user_id", "item_id"])) for f in files]
  table = pa.concat_tables(tables)
  return {c: table.column(c).to_numpy() for c in ("user_id", "item_id")}


def _glob(folder: str, prefix: str) -> List[str]:
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.startswith(prefix + "-") and f.endswith(".csv.gz"))


def data_config(files: Sequence[str]):
  from trainer import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.DataConfig(train_files=tuple(files), columns=tuple(COLUMNS))


def build_vocab(files: Sequence[str], out_dir: str, min_count: int = 1) -> Dict:
  """input.vocab over `files` (once; reused when out_dir has vocab.json)."""
  from input import vocab  # pylint: disable=g-import-not-at-top
  summary_path = os.path.join(out_dir, "vocab.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    if all(s["min_count"] == min_count for s in summary.values()):
      return summary
  return vocab.build(data_config(files), list(files), out_dir,
                     min_count=min_count)


def prepare(data: str, out_dir: str, order: str = "shuffled") -> Dict[str, Split]:
  """Writes the leave-last-out shards and vocabularies; returns both splits.

  Args:
    data: An unpacked MovieLens folder, or "synthetic".
    out_dir: Where data/ (data-<order>/ for another order) and vocab-<split>/
      go (reused if present).
    order: Row order of the shards (input.movielens.ORDERS).

  Returns:
    {"validation": Split, "test": Split}.
  """
  folder = os.path.join(out_dir,
                        "data" if order == "shuffled" else f"data-{order}")
  if _written_order(folder) != order:
    if os.path.exists(folder):
      shutil.rmtree(folder)
    if data == "synthetic":
      movielens.write_splits(_synthetic_table(), folder, 4, "leave_last_out",
                             {"format": "synthetic", "source": SYNTHETIC},
                             order=order)
    else:
      movielens.convert(detect_format(data), data, folder, 4,
                        "leave_last_out", order=order)
  files = {p: _glob(folder, p) for p in ("train", "validation", "test")}
  rows = {p: _read(f) for p, f in files.items()}
  user_ids = np.unique(np.concatenate([r["user_id"] for r in rows.values()]))
  splits = {}
  for name, fit_parts, held in (("validation", ["train"], "validation"),
                                ("test", ["train", "validation"], "test")):
    users = np.concatenate([rows[p]["user_id"] for p in fit_parts])
    items = np.concatenate([rows[p]["item_id"] for p in fit_parts])
    item_ids = np.unique(items)
    train_files = sum((files[p] for p in fit_parts), [])
    vocab_dir = os.path.join(out_dir, f"vocab-{name}")
    build_vocab(train_files, vocab_dir)
    splits[name] = Split(
        name=name, train_files=train_files, eval_files=files[held],
        vocab_dir=vocab_dir, user_ids=user_ids, item_ids=item_ids,
        train_users=np.searchsorted(user_ids, users),
        train_items=np.searchsorted(item_ids, items),
        eval_users=np.searchsorted(user_ids, rows[held]["user_id"]),
        eval_items=index_of(item_ids, rows[held]["item_id"]))
    logging.info("Split %s: %d training interactions, %d users, %d items; "
                 "%d held-out pairs (%d with items outside the catalog).",
                 name, len(users), len(user_ids), len(item_ids),
                 len(splits[name].eval_items),
                 int((splits[name].eval_items < 0).sum()))
  return splits


def _written_order(folder: str) -> Optional[str]:
  """The row order of the shards in folder; None if absent or unknown."""
  path = os.path.join(folder, "dataset.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("order")


def index_of(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Position of each of `ids` in `sorted_ids`, -1 where absent."""
  from trainer.metrics import ranking as ranking_metrics  # pylint: disable=g-import-not-at-top
  return ranking_metrics.index_of(sorted_ids, ids)


def evaluate(score_fn: Callable[[np.ndarray], np.ndarray], split: Split,
             sampled: bool = True) -> Dict[str, float]:
  """Full-catalog HR/NDCG@10,20,50 (and the sampled @10) of a scorer."""
  from trainer.metrics import ranking as ranking_metrics  # pylint: disable=g-import-not-at-top
  args = (split.train_users, split.train_items, split.eval_users,
          split.eval_items, split.num_items)
  out = ranking_metrics.full_catalog_metrics(score_fn, *args, ks=(10, 20, 50))
  if sampled:
    out.update(ranking_metrics.sampled_metrics(
        score_fn, *args, num_negatives=SAMPLED_NEGATIVES, ks=(10,), seed=0))
  return out


# The matrix-factorization model, trained by trainer.task.

# Trainer flags the quality benchmark uses, chosen on the validation item of
# ML-100K by benchmarks.tune_mf. Re-tuned when batches became fair (every
# batch exactly its share of positives, rows mixed across the log): the old
# defaults (lr 0.2, 20 epochs, 32 negatives; tuned under batches of which
# 68% held no positive) scored 0.0760 on validation; lr 0.1: 0.0770 (0.05:
# 0.0726; l2 3e-4: 0.0744, 3e-3: 0.0668); 30 epochs: 0.0812; 64 negatives:
# 0.0828 (16: 0.0794).
MF_DEFAULTS = {
    "embedding_dim": 128, "num_negatives": 64, "epochs": 30,
    "batch_size": 2048, "embedding_learning_rate": 0.1, "l2": 1e-3,
    "lr_schedule": "constant",
}


def mf_flags(split: Split, params: Dict[str, Any], id_mode: str,
             seed: int, model_dir: str) -> List[str]:
  """trainer.task flags for one run of MF on `split`.

  params may hold any trainer flag (without --) plus, in hash mode,
  num_bins and num_hashes, and in vocab mode vocab_dir (default: the split's).
  Negatives always come from the full item vocabulary, so hash and vocab
  runs (and vocabularies with min_count > 1) see the same training examples.
  """
  flags = {**MF_DEFAULTS, **params}
  flags.setdefault("vocab_dir", split.vocab_dir)
  if id_mode == "hash":
    flags.pop("vocab_dir")
  else:
    flags.pop("num_bins", None)
    flags.pop("num_hashes", None)
  out = [f"--train_files={','.join(split.train_files)}",
         f"--eval_files={','.join(split.eval_files)}",
         f"--columns={','.join(COLUMNS)}",
         f"--negative_catalog={os.path.join(split.vocab_dir, 'item_id.txt')}",
         f"--id_mode={id_mode}", f"--seed={seed}", f"--model_dir={model_dir}",
         "--log_every_steps=1000000", "--checkpoint_every_steps=1000000"]
  out += [f"--{k}={v}" for k, v in sorted(flags.items())]
  return out


def run_trainer(flags: Sequence[str], model_dir: str) -> Dict[str, Any]:
  """Runs `python -m trainer.task` (reusing a finished run); returns metrics.json.

  A finished run in model_dir is reused only if it was made with the same
  flags (kept in model_dir/benchmark_flags.json); a run with other flags, or
  an unfinished one, is deleted and trained afresh. The log goes to
  model_dir/train.log; a failed run raises with its tail.
  """
  metrics_path = os.path.join(model_dir, "metrics.json")
  flags_path = os.path.join(model_dir, "benchmark_flags.json")
  if os.path.exists(metrics_path) and os.path.exists(flags_path):
    with open(flags_path) as f:
      same = json.load(f) == list(flags)
    if same:
      with open(metrics_path) as f:
        return json.load(f)
  if os.path.exists(model_dir):
    logging.info("Discarding %s: trained with other flags or unfinished.",
                 model_dir)
    shutil.rmtree(model_dir)
  os.makedirs(model_dir)
  with open(flags_path, "w") as f:
    json.dump(list(flags), f, indent=1)
  log_path = os.path.join(model_dir, "train.log")
  start = time.time()
  with open(log_path, "w") as log:
    code = subprocess.run([sys.executable, "-m", "trainer.task", *flags],
                          cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          check=False).returncode
  if code:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"trainer.task exited {code}; {log_path} ends:\n{tail}")
  with open(metrics_path) as f:
    metrics = json.load(f)
  metrics["wall_seconds"] = round(time.time() - start, 1)
  with open(metrics_path, "w") as f:
    json.dump(metrics, f, indent=2)
  return metrics


def mf_scorer(model_dir: str, split: Split):
  """Loads a run's checkpoint; returns (score_fn, model).

  score(u, i) = <u, v_i> + b_i on the factor slots and the item's bias slot:
  the user bias and the global bias shift a user's whole row, so they cannot
  change its ranking and are left out.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from trainer import train  # pylint: disable=g-import-not-at-top
  model = train.load_model(model_dir)
  users = model.vectors(model.user_feature,
                        tf.constant(split.user_ids)).numpy()
  items = model.vectors(model.item_feature,
                        tf.constant(split.item_ids)).numpy()
  user_factors = users[:, :-1]
  item_factors_t = np.ascontiguousarray(items[:, :-1].T)
  item_bias = items[:, -1]

  def score_fn(user_idx: np.ndarray) -> np.ndarray:
    return user_factors[user_idx] @ item_factors_t + item_bias[None, :]

  return score_fn, model


def collision_rate(model, ids: np.ndarray, feature: str) -> float:
  """Fraction of `ids` whose rows are exactly those of another of `ids`.

  With k hashes an ID's rows are a multiset of k rows; two IDs collide when
  the multisets are equal. In vocab mode, IDs outside the vocabulary share
  the OOV rows.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rows = np.stack([r.numpy() for r in model.lookups[feature](
      tf.constant(ids))], axis=1)
  rows.sort(axis=1)
  _, inverse, counts = np.unique(rows, axis=0, return_inverse=True,
                                 return_counts=True)
  return float(np.mean(counts[inverse.reshape(-1)] > 1))


def table_bytes(model) -> int:
  """Bytes of the embedding tables (float32 factors + bias slot)."""
  return int(sum(np.prod(t.shape) * 4
                 for t in model.embedding.tables().values()))


def run_mf(split: Split, params: Dict[str, Any], id_mode: str, seed: int,
           run_dir: str, sampled: bool = True,
           extra: bool = False) -> Dict[str, Any]:
  """Trains MF with trainer.task on `split` and scores it; returns a row.

  The row has the full-catalog (and sampled) metrics, the held-out AUC
  against the trainer's own sampled negatives, train_seconds, and with
  extra=True the table bytes and collision rates.
  """
  metrics = run_trainer(mf_flags(split, params, id_mode, seed, run_dir),
                        run_dir)
  score_fn, model = mf_scorer(run_dir, split)
  row = evaluate(score_fn, split, sampled=sampled)
  row["auc"] = metrics.get("eval", {}).get("auc")
  row["train_seconds"] = metrics["train_seconds"]
  if extra:
    row["table_bytes"] = table_bytes(model)
    row["user_collision_rate"] = collision_rate(model, split.user_ids,
                                                model.user_feature)
    row["item_collision_rate"] = collision_rate(model, split.item_ids,
                                                model.item_feature)
    n_u, n_i = split.num_users, split.num_items
    row["collision_rate"] = ((row["user_collision_rate"] * n_u +
                              row["item_collision_rate"] * n_i) / (n_u + n_i))
  return row


def mean_std(rows: Sequence[Dict[str, Any]],
             keys: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """{key: mean, key_std: population std} over rows of numbers."""
  keys = keys or [k for k, v in rows[0].items()
                  if isinstance(v, (int, float)) and v is not None]
  out = {}
  for k in keys:
    values = np.array([r[k] for r in rows], dtype=np.float64)
    out[k] = float(values.mean())
    out[f"{k}_std"] = float(values.std())
  out["seeds"] = len(rows)
  return out
