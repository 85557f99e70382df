r"""Model quality on leave-last-out: classical baselines and the trainer's MF, one run.

  python -m benchmarks.quality --data=../shared/data/ml-100k --out=work/quality \
      [--seeds=3] [--id_modes=vocab,hash]

Protocol (benchmarks.protocol): each user's latest interaction is the test
item, the one before the validation item. Every hyperparameter is chosen on
the validation item: EASE's lambda and iALS's factors/regularization/alpha
by grid search here; the MF flags by benchmarks.tune_mf (their validation
score is re-measured here and recorded). The chosen models are then refitted
on train + validation and scored on the test item, full catalog (and, beside
it, the sampled NCF protocol with 99 negatives, labelled sampled_).

MF is `python -m trainer.task` (TPUEmbedding tables, dot product + bias
slots), in vocab mode and in hash mode with num_bins --bins_multiple times
the distinct IDs, over --seeds seeds (mean and std reported). The multiple,
64, was chosen on the validation item like every other setting: with 16x,
6% of IDs still share a row with another and validation NDCG@10 was 0.0740;
with 64x, 1%, and 0.0768 (vocab: 0.0799).

Writes OUT/results.json:
  {"dataset", "protocol": "leave-last-out", "models": {NAME: {"hr@10",
   "ndcg@10", "sampled_hr@10", "sampled_ndcg@10", "params", ...}}}
and OUT/results.md (the table), and prints the table.
"""

import json
import os
import time
from typing import Any, Dict

from absl import app, flags, logging
import numpy as np

from benchmarks import baselines
from benchmarks import protocol


EASE_GRID = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 3000.0)
IALS_GRID = tuple({"factors": f, "regularization": r, "alpha": a}
                  for f in (64, 128) for r in (1.0, 10.0, 100.0)
                  for a in (1.0, 10.0))
TABLE_KEYS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "sampled_hr@10",
              "sampled_ndcg@10")


def hash_bins(distinct: int, multiple: int) -> int:
  """Smallest power of two >= multiple * distinct."""
  return 1 << int(np.ceil(np.log2(max(1, multiple * distinct))))


def _fit_eval(model, split, sampled) -> Dict[str, float]:
  model.fit(split.train_users, split.train_items, split.num_users,
            split.num_items)
  return protocol.evaluate(model.score_fn, split, sampled=sampled)


def _tune(name, make, grid, val) -> Any:
  start = time.time()
  best, table = baselines.tune_on_validation(
      make, grid, val.train_users, val.train_items, val.eval_users,
      val.eval_items, val.num_users, val.num_items)
  for row in table:
    logging.info("%s %s: validation ndcg@10 %.4f", name, row["param"],
                 row["ndcg@10"])
  logging.info("%s: chose %s on validation (%.0fs).", name, best,
               time.time() - start)
  return best, max(r["ndcg@10"] for r in table)


def run(data: str, out: str, seeds: int = 3, id_modes=("vocab", "hash"),
        bins_multiple: int = 64, mf_params: Dict[str, Any] = None,
        sampled: bool = True, sorted_orders=("user",)) -> Dict[str, Any]:
  """Runs the whole benchmark; returns (and writes) the results dict.

  With sorted_orders, MF (vocab mode) is also trained on the same training
  rows written sorted in each of those orders (input.movielens.ORDERS), as
  mf_vocab_sorted_by_<order>: the input pipeline's mixing should make it
  score like the shuffled shards.
  """
  os.makedirs(out, exist_ok=True)
  splits = protocol.prepare(data, out)
  val, test = splits["validation"], splits["test"]
  models = {}

  def record(name, rows, params, validation_ndcg):
    summary = protocol.mean_std(rows) if len(rows) > 1 else dict(rows[0])
    summary.pop("num_eval", None)
    summary.pop("num_eval_std", None)
    models[name] = {**summary, "params": params,
                    "validation_ndcg@10": validation_ndcg}
    logging.info("%s: test ndcg@10 %.4f hr@10 %.4f", name,
                 summary["ndcg@10"], summary["hr@10"])

  t0 = time.time()
  pop_val = _fit_eval(baselines.Popularity(), val, False)["ndcg@10"]
  record("popularity", [_fit_eval(baselines.Popularity(), test, sampled)], {},
         pop_val)

  l2, ease_val = _tune("EASE", baselines.EASE, EASE_GRID, val)
  record("ease", [_fit_eval(baselines.EASE(l2), test, sampled)],
         {"l2": l2, "grid": list(EASE_GRID)}, ease_val)

  ials, ials_val = _tune("iALS", lambda p: baselines.IALS(**p, seed=0),
                         IALS_GRID, val)
  record("ials", [_fit_eval(baselines.IALS(**ials, seed=s), test, sampled)
                  for s in range(seeds)],
         {**ials, "iterations": 15, "grid": list(IALS_GRID)}, ials_val)
  logging.info("Baselines done in %.0fs.", time.time() - t0)

  params = {**protocol.MF_DEFAULTS, **(mf_params or {})}
  for mode in id_modes:
    p = dict(params)
    if mode == "hash":
      p.setdefault("num_hashes", 1)
      p["user_num_bins"] = hash_bins(test.num_users, bins_multiple)
      p["item_num_bins"] = hash_bins(test.num_items, bins_multiple)
    name = f"mf_{mode}"
    run_dir = os.path.join(out, "runs", name)
    t0 = time.time()
    val_row = protocol.run_mf(val, p, mode, 1, f"{run_dir}/validation",
                              sampled=False)
    rows = [protocol.run_mf(test, p, mode, s, f"{run_dir}/test-seed{s}",
                            sampled=sampled) for s in range(1, seeds + 1)]
    record(name, rows, {"id_mode": mode, **p}, val_row["ndcg@10"])
    logging.info("%s done in %.0fs.", name, time.time() - t0)
    if mode != "vocab":
      continue
    for order in sorted_orders:
      ordered = protocol.prepare(data, out, order=order)["test"]
      name = f"mf_vocab_sorted_by_{order}"
      rows = [protocol.run_mf(ordered, p, mode, s,
                              os.path.join(out, "runs", name, f"test-seed{s}"),
                              sampled=sampled) for s in range(1, seeds + 1)]
      record(name, rows, {"id_mode": mode, "order": order, **p}, None)

  ease = models["ease"]["ndcg@10"]
  comparison = {f"{n}_ndcg@10_over_ease": models[n]["ndcg@10"] / ease
                for n in models if n.startswith("mf_")}
  for n in models:
    if n.startswith("mf_vocab_sorted_by_") and "mf_vocab" in models:
      comparison[f"{n}_minus_shuffled_ndcg@10"] = (
          models[n]["ndcg@10"] - models["mf_vocab"]["ndcg@10"])
  results = {"dataset": protocol.dataset_name(data),
             "protocol": "leave-last-out",
             "num_users": test.num_users, "num_items": test.num_items,
             "num_train_interactions": int(len(test.train_users)),
             "num_test_pairs": int(len(test.eval_users)),
             "models": models, "comparison": comparison}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  table = markdown(results)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
  print(table)
  return results


def _cell(model: Dict[str, Any], key: str) -> str:
  if key not in model:
    return "-"
  std = model.get(f"{key}_std")
  return f"{model[key]:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def markdown(results: Dict[str, Any]) -> str:
  """The results as a Markdown table (means ± std over seeds where run)."""
  lines = [f"{results['dataset']}, leave-last-out, full catalog "
           f"({results['num_items']} items, {results['num_test_pairs']} test "
           "users); sampled_ = 99 sampled negatives.", "",
           "| model | validation NDCG@10 | " +
           " | ".join(k.upper().replace("SAMPLED_", "sampled ")
                      for k in TABLE_KEYS) + " |",
           "|---" * (len(TABLE_KEYS) + 2) + "|"]
  for name, m in results["models"].items():
    val = m["validation_ndcg@10"]
    lines.append(f"| {name} | {'-' if val is None else f'{val:.4f}'} | " +
                 " | ".join(_cell(m, k) for k in TABLE_KEYS) + " |")
  lines.append("")
  for k, v in results["comparison"].items():
    lines.append(f"- {k}: {v:.3f}")
  return "\n".join(lines) + "\n"


def _define_flags():
  """Flags exist only when this runs as a program (tests import the module)."""
  return {
      "data": flags.DEFINE_string("data", None, "MovieLens folder or "
                                  "'synthetic'.", required=True),
      "out": flags.DEFINE_string("out", "work/quality", "Output folder."),
      "seeds": flags.DEFINE_integer("seeds", 3, "Seeds of MF and iALS."),
      "id_modes": flags.DEFINE_list("id_modes", ["vocab", "hash"],
                                    "MF ID modes."),
      "bins_multiple": flags.DEFINE_integer(
          "bins_multiple", 64, "Hash mode: num_bins per table = this times its "
          "distinct IDs, rounded up to a power of two."),
      "mf_params": flags.DEFINE_string(
          "mf_params", "{}", "JSON overrides of protocol.MF_DEFAULTS."),
      "skip_sampled": flags.DEFINE_bool(
          "skip_sampled", False, "Leave out the sampled metrics (faster)."),
      "sorted_orders": flags.DEFINE_list(
          "sorted_orders", ["user"], "Also train MF (vocab) on the training "
          "rows written in these orders (user, time); empty: none."),
  }


def main(argv, args):
  del argv
  run(args["data"].value, args["out"].value, args["seeds"].value,
      args["id_modes"].value, args["bins_multiple"].value,
      json.loads(args["mf_params"].value), not args["skip_sampled"].value,
      tuple(args["sorted_orders"].value))


if __name__ == "__main__":
  _args = _define_flags()
  app.run(lambda argv: main(argv, _args))
