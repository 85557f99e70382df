r"""Two-tower presets beside the baselines, leave-last-out, full catalog: one command.

  python -m benchmarks.retrieval --data=../shared/data/ml-100k \
      --out=work/retrieval [--seeds=3] [--presets=bn,bn_logq,bn_logq_l2,history]

Any MovieLens folder the converter reads works (ml-100k, ml-1m, ml-latest*);
the side features are those it provides (input.movielens.read_side_features:
user age, gender, occupation; item genres and release year). The split is
benchmarks.protocol's: each user's latest interaction is the test item, the
one before the validation item. Every row of the retrieval shards carries its
history (the user's previous --history_len items, input.history: no
look-ahead); a held-out row's history is its user's latest training items.

Rows of the table: popularity, EASE and iALS (tuned on validation as in
benchmarks.quality), the sequence-aware RecencyEASE (EASE scored from a
profile weighted by decay^(position from the end), decay tuned on
validation), MF (benchmarks.quality's flags; --mf_seeds runs), and each
two-tower preset over --seeds seeds, trained by `python -m trainer.task
--model=two_tower` and scored on the same dense indices by
benchmarks.protocol.evaluate. `top1%_share@10` is the share of the top-10
recommendations that are among the 1% most popular training items.

Writes OUT/results.json and OUT/results.md; prints the table.
"""

import json
import os
import time
from typing import Any, Dict, List

from absl import app, flags, logging
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from benchmarks import baselines
from benchmarks import protocol
from input import history as history_lib
from input import movielens

PRESETS = ("bn", "bn_logq", "bn_logq_l2", "history")
RECENCY_GRID = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)
COLUMNS = ("user_id", "item_id", "rating", "timestamp", "history")
TYPES = ("int64", "int64", "string", "int64", "string")
# Trainer flags of the two-tower runs, chosen on the validation item of
# ML-100K (history preset): see the README's retrieval section.
TWO_TOWER_DEFAULTS = {
    "embedding_dim": 64, "output_dim": 64, "batch_size": 512, "epochs": 10,
    "embedding_optimizer": "lazy_adam", "embedding_learning_rate": 1e-3,
    "optimizer": "adam", "learning_rate": 1e-3,
}


def _read_rows(files: List[str]) -> Dict[str, np.ndarray]:
  table = pa.concat_tables([pcsv.read_csv(
      f, read_options=pcsv.ReadOptions(column_names=list(protocol.COLUMNS)),
      convert_options=pcsv.ConvertOptions(column_types={
          "user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.string(),
          "timestamp": pa.int64()})) for f in files])
  return {c: table.column(c).to_numpy(zero_copy_only=False)
          for c in protocol.COLUMNS}


def _write(rows: Dict[str, np.ndarray], path: str) -> None:
  with pa.CompressedOutputStream(path, "gzip") as out:
    pcsv.write_csv(pa.table({c: rows[c] for c in COLUMNS}), out,
                   pcsv.WriteOptions(include_header=False))


def retrieval_files(split, out: str, history_len: int) -> Dict[str, Any]:
  """Writes the split's rows with their histories; returns files and rows.

  Training rows get the history before each of them; the held-out rows the
  user's latest training items. Training rows are written shuffled in 4
  shards.
  """
  folder = os.path.join(out, f"retrieval-{split.name}")
  train = _read_rows(split.train_files)
  held = _read_rows(split.eval_files)
  marker = os.path.join(folder, "_COMPLETE")
  files = {"train": [os.path.join(folder, f"train-{k}.csv.gz")
                     for k in range(4)],
           "held": [os.path.join(folder, "held-0.csv.gz")]}
  if not os.path.exists(marker):
    os.makedirs(folder, exist_ok=True)
    train["history"] = history_lib.add_history(
        train["user_id"], train["item_id"], train["timestamp"], history_len)
    held["history"] = _held_history(train, held, history_len)
    order = np.random.default_rng(0).permutation(len(train["user_id"]))
    shuffled = {c: v[order] for c, v in train.items()}
    for k, path in enumerate(files["train"]):
      _write({c: v[k::4] for c, v in shuffled.items()}, path)
    _write(held, files["held"][0])
    with open(marker, "w") as f:
      f.write("ok")
  else:
    held["history"] = _held_history(train, held, history_len)
  return {"files": files, "held": held}


def _held_history(train, held, history_len: int) -> np.ndarray:
  """Each held-out row's history: its user's latest training items."""
  users, last = history_lib.last_items(
      train["user_id"], train["item_id"], train["timestamp"], history_len)
  pos = np.minimum(np.searchsorted(users, held["user_id"]), len(users) - 1)
  return np.where(users[pos] == held["user_id"], last[pos], "")


def features_json(side: Dict[str, str]) -> str:
  """The feature configuration of the MovieLens side files that exist."""
  query = [{"name": "user_id", "type": "id"}]
  candidate = [{"name": "item_id", "type": "id"}]
  side_files = {}
  if "user" in side:
    side_files["user"] = {"path": side["user"], "key": "user_id"}
    query += [{"name": "age", "type": "numeric", "source": "user"},
              {"name": "gender", "type": "categorical", "source": "user",
               "dim": 4},
              {"name": "occupation", "type": "categorical", "source": "user",
               "dim": 8}]
  if "item" in side:
    side_files["item"] = {"path": side["item"], "key": "item_id"}
    candidate += [{"name": "genres", "type": "categorical", "source": "item",
                   "separator": "|", "dim": 8},
                  {"name": "year", "type": "numeric", "source": "item"}]
  return json.dumps({"side_files": side_files, "query": query,
                     "candidate": candidate})


def two_tower_flags(split, files, features_path: str, preset: str, seed: int,
                    model_dir: str, params: Dict[str, Any]) -> List[str]:
  flags_ = {**TWO_TOWER_DEFAULTS, **params}
  out = [f"--train_files={','.join(files['train'])}",
         f"--columns={','.join(COLUMNS)}", f"--column_types={','.join(TYPES)}",
         "--model=two_tower", f"--features={features_path}",
         f"--preset={preset}", "--id_mode=vocab",
         f"--vocab_dir={split.vocab_dir}", f"--seed={seed}",
         f"--model_dir={model_dir}", "--log_every_steps=1000000",
         "--checkpoint_every_steps=1000000"]
  return out + [f"--{k}={v}" for k, v in sorted(flags_.items())]


def two_tower_scorer(model_dir: str, split, held_rows: Dict[str, np.ndarray]):
  """score_fn over the split's dense indices from a run's checkpoint.

  Each user's query is built from their held-out row (features, history).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from trainer import train  # pylint: disable=g-import-not-at-top
  model = train.load_model(model_dir)
  candidates = model.candidate_embedding(tf.constant(split.item_ids)).numpy()
  users = np.searchsorted(split.user_ids, held_rows["user_id"])
  inputs = {c: tf.constant(held_rows[c]) for c in
            ("user_id", "timestamp", "history")}
  queries = np.zeros((split.num_users, candidates.shape[1]), np.float32)
  queries[users] = model.query_embedding(inputs).numpy()
  return lambda u: queries[u] @ candidates.T


def popular_share(score_fn, split, k: int = 10, top: float = 0.01) -> float:
  """Share of each eval user's top-k (seen items excluded) that are among
  the `top` most popular training items."""
  counts = np.bincount(split.train_items, minlength=split.num_items)
  popular = np.zeros(split.num_items, bool)
  popular[np.argsort(-counts, kind="stable")[:max(1, int(top *
                                                         split.num_items))]] = 1
  users = np.unique(split.eval_users[split.eval_users >= 0])
  seen = {}
  for u, i in zip(split.train_users, split.train_items):
    seen.setdefault(u, []).append(i)
  hits, total = 0, 0
  for start in range(0, len(users), 512):
    chunk = users[start:start + 512]
    scores = np.array(score_fn(chunk), np.float64)
    for row, u in enumerate(chunk):
      scores[row, seen.get(u, [])] = -np.inf
    top_k = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits += int(popular[top_k].sum())
    total += top_k.size
  return hits / max(total, 1)


def _row(name, metrics, extra=None) -> Dict[str, Any]:
  return {"model": name, **metrics, **(extra or {})}


def run(data: str, out: str, seeds: int, presets: List[str], mf_seeds: int,
        history_len: int, params: Dict[str, Any],
        split_name: str = "test") -> Dict[str, Any]:
  """The whole comparison; returns results.json's contents.

  With split_name "validation" every model is fitted on train-* and scored on
  the validation item (for choosing settings); "test" is the reported table.
  """
  t0 = time.time()
  splits = protocol.prepare(data, out)
  fmt = protocol.detect_format(data)
  side = movielens.write_side_features(fmt, data, os.path.join(out, "side"))
  features_path = os.path.join(out, "features.json")
  with open(features_path, "w") as f:
    f.write(features_json(side))
  val, test = splits["validation"], splits[split_name]
  rows = []

  def evaluate(name, score_fn, split, extra=None):
    metrics = protocol.evaluate(score_fn, split, sampled=False)
    metrics["top1%_share@10"] = popular_share(score_fn, split)
    rows.append(_row(name, metrics, extra))
    logging.info("%s: NDCG@10 %.4f, HR@10 %.4f, top-1%% share %.3f", name,
                 metrics["ndcg@10"], metrics["hr@10"],
                 metrics["top1%_share@10"])
    return metrics

  fit = lambda m, s: m.fit(s.train_users, s.train_items, s.num_users,
                           s.num_items)
  evaluate("popularity", fit(baselines.Popularity(), test).score_fn, test)
  args = lambda s: (s.train_users, s.train_items, s.eval_users, s.eval_items,
                    s.num_users, s.num_items)
  l2, _ = baselines.tune_on_validation(baselines.EASE, (50., 100., 200., 500.),
                                       *args(val))
  evaluate("EASE", fit(baselines.EASE(l2), test).score_fn, test, {"l2": l2})
  ials, _ = baselines.tune_on_validation(
      lambda p: baselines.IALS(**p),
      [{"factors": 128, "regularization": r, "alpha": 1.0}
       for r in (1.0, 10.0)], *args(val))
  evaluate("iALS", fit(baselines.IALS(**ials), test).score_fn, test, ials)
  # Sequence-aware: EASE from a recency-weighted profile.
  times = {s.name: _read_rows(s.train_files)["timestamp"]
           for s in splits.values()}
  decay, _ = baselines.tune_on_validation(
      lambda d: baselines.RecencyEASE(l2, d, times["validation"]),
      RECENCY_GRID, *args(val))
  evaluate("RecencyEASE", fit(baselines.RecencyEASE(l2, decay, times[test.name]),
                              test).score_fn, test,
           {"l2": l2, "decay": decay})
  for seed in range(1, mf_seeds + 1):
    model_dir = os.path.join(out, "runs", f"mf-seed{seed}")
    protocol.run_trainer(protocol.mf_flags(test, {}, "vocab", seed, model_dir),
                         model_dir)
    evaluate("MF", protocol.mf_scorer(model_dir, test)[0], test,
             {"seed": seed})
  retrieval = retrieval_files(test, out, history_len)
  for preset in presets:
    for seed in range(1, seeds + 1):
      model_dir = os.path.join(out, "runs", f"{preset}-{test.name}-seed{seed}")
      metrics = protocol.run_trainer(
          two_tower_flags(test, retrieval["files"], features_path, preset,
                          seed, model_dir, params), model_dir)
      evaluate(f"two_tower:{preset}",
               two_tower_scorer(model_dir, test, retrieval["held"]), test,
               {"seed": seed, "train_seconds": metrics.get("train_seconds")})
  summary = _summarise(rows)
  results = {"dataset": protocol.dataset_name(data),
             "protocol": f"leave-last-out, full catalog, {test.name} item",
             "two_tower_flags": {**TWO_TOWER_DEFAULTS, **params},
             "history_len": history_len, "runs": rows, "table": summary,
             "seconds": round(time.time() - t0, 1)}
  ease = next(r for r in summary if r["model"] == "EASE")["ndcg@10"]
  for r in summary:
    r["ndcg@10_over_ease"] = round(r["ndcg@10"] / ease, 3)
  return results


def _summarise(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Mean and std per model over its runs (seeds)."""
  out = []
  for name in dict.fromkeys(r["model"] for r in rows):
    runs = [r for r in rows if r["model"] == name]
    entry = {"model": name, "runs": len(runs)}
    for key in ("ndcg@10", "hr@10", "ndcg@50", "hr@50", "top1%_share@10"):
      values = np.array([r[key] for r in runs])
      entry[key] = round(float(values.mean()), 4)
      entry[f"{key}_std"] = round(float(values.std()), 4)
    out.append(entry)
  return out


def table_md(results: Dict[str, Any]) -> str:
  lines = [f"Dataset {results['dataset']}, {results['protocol']}.", "",
           "| model | runs | NDCG@10 | HR@10 | NDCG@50 | top-1% share@10 |"
           " NDCG@10 / EASE |", "|---|---|---|---|---|---|---|"]
  for r in results["table"]:
    pm = lambda k: (f"{r[k]:.4f} ± {r[k + '_std']:.4f}" if r["runs"] > 1
                    else f"{r[k]:.4f}")
    lines.append(f"| {r['model']} | {r['runs']} | {pm('ndcg@10')} | "
                 f"{pm('hr@10')} | {pm('ndcg@50')} | "
                 f"{r['top1%_share@10']:.3f} | {r['ndcg@10_over_ease']:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv, args):
  del argv
  out = args["out"].value
  os.makedirs(out, exist_ok=True)
  results = run(args["data"].value, out, args["seeds"].value,
                args["presets"].value, args["mf_seeds"].value,
                args["history_len"].value,
                json.loads(args["params"].value or "{}"),
                args["split"].value)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  md = table_md(results)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  _args = {
      "data": flags.DEFINE_string("data", None, "A MovieLens folder.",
                                  required=True),
      "out": flags.DEFINE_string("out", None, "Output folder.", required=True),
      "seeds": flags.DEFINE_integer("seeds", 3, "Runs per preset."),
      "presets": flags.DEFINE_list("presets", list(PRESETS), "Presets."),
      "mf_seeds": flags.DEFINE_integer("mf_seeds", 1, "MF runs (0: none)."),
      "history_len": flags.DEFINE_integer("history_len", 50,
                                          "Items kept in a history."),
      "split": flags.DEFINE_enum("split", "test", ["validation", "test"],
                                 "Score on the validation item (to choose "
                                 "settings) or the test item (reported)."),
      "params": flags.DEFINE_string("params", "", "JSON of trainer flags "
                                    "overriding TWO_TOWER_DEFAULTS."),
  }
  app.run(lambda argv: main(argv, _args))
