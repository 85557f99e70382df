r"""Tunes the trainer's MF on the validation item: a coordinate search.

  python -m benchmarks.tune_mf --data=../shared/data/ml-100k --out=work/tune \
      [--id_mode=vocab] [--space='{"l2": [0, 1e-5, 1e-4], "epochs": [10, 20]}']

Starting from benchmarks.protocol.MF_DEFAULTS (or --start), each parameter of
--space in turn is set to each of its values, the others held at the best so
far; a value is kept if it raises validation NDCG@10 (full catalog). Every
run trains with `python -m trainer.task` on train-* and is scored on the
validation item only; the test item is never read. Runs are cached by their
flags under OUT, so a search can be resumed or extended. Writes OUT/tune.json
(every run) and prints the table and the best parameters.
"""

import hashlib
import json
import os
import time

from absl import app, flags, logging

from benchmarks import protocol

_DATA = flags.DEFINE_string("data", None, "MovieLens folder or 'synthetic'.",
                            required=True)
_OUT = flags.DEFINE_string("out", "work/tune", "Output folder.")
_ID_MODE = flags.DEFINE_enum("id_mode", "vocab", ["vocab", "hash"], "ID mode.")
_NUM_BINS = flags.DEFINE_integer("num_bins", 4096, "Hash mode: rows per table.")
_SEED = flags.DEFINE_integer("seed", 1, "Trainer seed.")
_START = flags.DEFINE_string("start", "{}", "JSON: overrides of MF_DEFAULTS.")
_SPACE = flags.DEFINE_string(
    "space",
    json.dumps({"l2": [0.0, 1e-5, 3e-5, 1e-4],
                "epochs": [10, 20, 40],
                "embedding_learning_rate": [0.05, 0.1, 0.2],
                "num_negatives": [4, 8, 16],
                "embedding_dim": [32, 64, 128],
                "lr_schedule": ["constant", "cosine"]}),
    "JSON {flag: [values]}, searched in this order.")


def _key(params):
  return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def main(argv):
  del argv
  out = _OUT.value
  split = protocol.prepare(_DATA.value, out)["validation"]
  space = json.loads(_SPACE.value)
  best = {**protocol.MF_DEFAULTS, **json.loads(_START.value)}
  if _ID_MODE.value == "hash":
    best.setdefault("num_bins", _NUM_BINS.value)
  table = []
  scores = {}

  def score(params):
    key = _key(params)
    if key not in scores:
      t0 = time.time()
      row = protocol.run_mf(split, params, _ID_MODE.value, _SEED.value,
                            os.path.join(out, "runs", _ID_MODE.value, key),
                            sampled=False)
      table.append({"params": params, **row})
      scores[key] = row["ndcg@10"]
      logging.info("%-70s ndcg@10 %.4f hr@10 %.4f (%.0fs)",
                   json.dumps({k: params[k] for k in space if k in params}),
                   row["ndcg@10"], row["hr@10"], time.time() - t0)
      with open(os.path.join(out, f"tune-{_ID_MODE.value}.json"), "w") as f:
        json.dump({"best": best, "runs": table}, f, indent=2)
    return scores[key]

  best_score = score(best)
  for name, values in space.items():
    for value in values:
      trial = {**best, name: value}
      s = score(trial)
      if s > best_score:
        best, best_score = trial, s
    logging.info("after %s: best %s = %.4f", name, best[name], best_score)
  print(json.dumps({"best": best, "validation_ndcg@10": best_score}, indent=2))


if __name__ == "__main__":
  app.run(main)
