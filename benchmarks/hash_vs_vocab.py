r"""Hashing vs vocabulary lookup: quality against table memory, one command.

  python -m benchmarks.hash_vs_vocab --data=../shared/data/ml-100k --out=work/hvv
  python -m benchmarks.hash_vs_vocab --data=synthetic --out=work/hvv-synthetic \
      --mf_params='{"embedding_dim": 128}'

(On the synthetic log the default 32-dimensional model stays below
popularity, so the README's figures use 128 dimensions there.)

On the leave-last-out split (benchmarks.protocol; fitted on train +
validation, scored on the test item) the trainer's MF is run in
  hash    num_bins = m x the distinct IDs of each table, m in --multiples;
  hash2   the same num_bins with --num_hashes=2: each ID sums two rows from
          two salted hashes, so two IDs share *all* their rows far more
          rarely than one row under plain hashing -- at the same bytes;
  vocab   vocabularies with each --min_counts value (rarer IDs share the
          OOV row);
each over --seeds seeds, with the flags of STUDY_PARAMS over
protocol.MF_DEFAULTS (plus --mf_params): a smaller, faster model than the
quality benchmark's, since the study compares ID modes against each other
over ~45 runs (on ML-100K its vocab test NDCG@10, 0.0777 ± 0.0034, is within
noise of the quality benchmark's 0.0762 ± 0.0036, at a tenth of the train
time). For each it reports full-catalog HR@10 and NDCG@10 (and the
sampled ones), held-out AUC against the trainer's sampled negatives, table
bytes, collision rate (the fraction of distinct users and items whose rows
are exactly another's) and train time, mean ± std.

Writes OUT/results.json (the benchmarks' contract plus the study's fields),
OUT/results.md and OUT/quality_vs_memory.png.
"""

import json
import os
import time
from fractions import Fraction
from typing import Any, Dict, List

from absl import app, flags, logging
import numpy as np

from benchmarks import protocol

STUDY_PARAMS = {"embedding_dim": 32, "num_negatives": 8, "epochs": 10,
                "batch_size": 2048}
# num_hashes=2 is run where collisions are common, at up to 1x the IDs.
HASH2_MULTIPLES = ("1/16", "1/8", "1/4", "1/2", "1")
DEFAULT_MULTIPLES = ["1/16", "1/8", "1/4", "1/2", "1", "2", "4"]
DEFAULT_MIN_COUNTS = ["1", "5", "20"]
METRICS = ("hr@10", "ndcg@10", "sampled_hr@10", "sampled_ndcg@10", "auc",
           "table_bytes", "collision_rate", "user_collision_rate",
           "item_collision_rate", "train_seconds")
MODES = ("hash", "hash2", "vocab")


def settings(split: protocol.Split, multiples: List[str],
             min_counts: List[int], out: str) -> List[Dict[str, Any]]:
  """The study's runs: name, mode, label, trainer params."""
  runs = []
  for num_hashes, mode in ((1, "hash"), (2, "hash2")):
    for m in multiples:
      if num_hashes == 2 and m not in HASH2_MULTIPLES:
        continue
      frac = Fraction(m)
      runs.append({
          "name": f"{mode}_{m}x", "mode": mode, "setting": f"{m}x",
          "id_mode": "hash",
          "params": {"num_hashes": num_hashes,
                     "user_num_bins": max(1, round(frac * split.num_users)),
                     "item_num_bins": max(1, round(frac * split.num_items))}})
  for c in min_counts:
    vocab_dir = os.path.join(out, f"vocab-{split.name}-min{c}")
    summary = protocol.build_vocab(split.train_files, vocab_dir, c)
    runs.append({
        "name": f"vocab_min{c}", "mode": "vocab", "setting": f"min_count {c}",
        "id_mode": "vocab", "params": {"vocab_dir": vocab_dir},
        "vocab_sizes": {k: v["size"] for k, v in summary.items()}})
  return runs


def run(data: str, out: str, seeds: int = 3, multiples=None, min_counts=None,
        mf_params: Dict[str, Any] = None) -> Dict[str, Any]:
  """Runs the study; returns (and writes) the results dict."""
  os.makedirs(out, exist_ok=True)
  split = protocol.prepare(data, out)["test"]
  multiples = list(multiples or DEFAULT_MULTIPLES)
  min_counts = [int(c) for c in (min_counts or DEFAULT_MIN_COUNTS)]
  models = {}
  start = time.time()
  all_runs = settings(split, multiples, min_counts, out)
  for n, spec in enumerate(all_runs, 1):
    params = {**protocol.MF_DEFAULTS, **STUDY_PARAMS, **(mf_params or {}),
              **spec["params"]}
    rows = [protocol.run_mf(split, params, spec["id_mode"], seed,
                            os.path.join(out, "runs", spec["name"],
                                         f"seed{seed}"), extra=True)
            for seed in range(1, seeds + 1)]
    summary = protocol.mean_std(rows, METRICS)
    models[spec["name"]] = {
        **summary, "mode": spec["mode"], "setting": spec["setting"],
        "params": {"id_mode": spec["id_mode"], **params},
        **({"vocab_sizes": spec["vocab_sizes"]} if "vocab_sizes" in spec
           else {})}
    logging.info("[%d/%d] %-14s ndcg@10 %.4f ± %.4f  %9d bytes  collisions "
                 "%.3f  (%.0fs so far)", n, len(all_runs), spec["name"],
                 summary["ndcg@10"], summary["ndcg@10_std"],
                 summary["table_bytes"], summary["collision_rate"],
                 time.time() - start)
    _write(out, data, split, models, multiples, partial=True)
  return _write(out, data, split, models, multiples, partial=False)


def _hash2_vs_hash(models, multiples) -> Dict[str, Any]:
  """NDCG@10 of hash2 over hash per multiple; None where hash scored 0."""
  out = {}
  for m in multiples:
    if f"hash2_{m}x" in models and f"hash_{m}x" in models:
      base = models[f"hash_{m}x"]["ndcg@10"]
      out[f"{m}x"] = (models[f"hash2_{m}x"]["ndcg@10"] / base if base > 0
                      else None)
  return out


def _write(out, data, split, models, multiples, partial) -> Dict[str, Any]:
  results = {"dataset": protocol.dataset_name(data),
             "protocol": "leave-last-out",
             "num_users": split.num_users, "num_items": split.num_items,
             "complete": not partial, "models": models,
             "hash2_over_hash_ndcg@10": _hash2_vs_hash(models, multiples)}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  table = markdown(results)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
  if not partial:
    plot(results, os.path.join(out, "quality_vs_memory.png"))
    print(table)
  return results


def _pm(m, key, fmt):
  return f"{m[key]:{fmt}} ± {m[key + '_std']:{fmt}}"


def markdown(results: Dict[str, Any]) -> str:
  lines = [
      f"{results['dataset']} ({results['num_users']} users, "
      f"{results['num_items']} items), leave-last-out test item, full "
      "catalog; mean ± std over seeds. Collisions: share of distinct users "
      "and items whose rows are exactly another's.", "",
      "| mode | setting | table bytes | collision rate | HR@10 | NDCG@10 | "
      "AUC | train s |", "|---|---|---|---|---|---|---|---|"]
  for m in results["models"].values():
    lines.append(
        f"| {m['mode']} | {m['setting']} | {int(m['table_bytes']):,} | "
        f"{m['collision_rate']:.3f} | {_pm(m, 'hr@10', '.4f')} | "
        f"{_pm(m, 'ndcg@10', '.4f')} | {_pm(m, 'auc', '.4f')} | "
        f"{m['train_seconds']:.1f} |")
  ratios = results["hash2_over_hash_ndcg@10"]
  if ratios:
    lines += ["", "NDCG@10 of hash2 / hash at equal bytes: " + ", ".join(
        f"{k} {v:.2f}" if v is not None else f"{k} n/a (hash 0)"
        for k, v in ratios.items())]
  return "\n".join(lines) + "\n"


def plot(results: Dict[str, Any], path: str) -> None:
  """NDCG@10 against table bytes, one line per mode, with std error bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  labels = {"hash": "hash (1 row per ID)",
            "hash2": "hash, 2 hashes summed (same bytes)",
            "vocab": "vocabulary (min_count sweep)"}
  for mode, style in zip(MODES, ("o-", "s-", "^-")):
    ms = sorted((m for m in results["models"].values() if m["mode"] == mode),
                key=lambda m: m["table_bytes"])
    if not ms:
      continue
    ax.errorbar([m["table_bytes"] for m in ms], [m["ndcg@10"] for m in ms],
                yerr=[m["ndcg@10_std"] for m in ms], fmt=style, capsize=3,
                label=labels[mode])
    for i, m in enumerate(ms):
      # hash2 labels above its points (hash's sit below, at the same bytes);
      # vocabulary points sit close together: short labels, alternating.
      text = m["setting"].replace("min_count ", "min ")
      dy = 7 if mode == "hash2" or (mode == "vocab" and i % 2) else -10
      ax.annotate(text, (m["table_bytes"], m["ndcg@10"]),
                  textcoords="offset points", xytext=(4, dy), fontsize=7)
  ax.set_xscale("log")
  ax.set_xlabel("embedding table bytes (users + items, float32)")
  ax.set_ylabel("NDCG@10 (full catalog, test item)")
  ax.set_title(f"{results['dataset']}: quality against memory")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _define_flags():
  """Flags exist only when this runs as a program (tests import the module)."""
  return {
      "data": flags.DEFINE_string("data", None, "MovieLens folder or "
                                  "'synthetic'.", required=True),
      "out": flags.DEFINE_string("out", "work/hash_vs_vocab", "Output folder."),
      "seeds": flags.DEFINE_integer("seeds", 3, "Seeds per setting."),
      "multiples": flags.DEFINE_list(
          "multiples", DEFAULT_MULTIPLES,
          "Hash num_bins as multiples of each table's distinct IDs."),
      "min_counts": flags.DEFINE_list("min_counts", DEFAULT_MIN_COUNTS,
                                      "Vocabulary min_count values."),
      "mf_params": flags.DEFINE_string(
          "mf_params", "{}", "JSON overrides of protocol.MF_DEFAULTS."),
  }


def main(argv, args):
  del argv
  run(args["data"].value, args["out"].value, args["seeds"].value,
      args["multiples"].value, args["min_counts"].value,
      json.loads(args["mf_params"].value))


if __name__ == "__main__":
  _args = _define_flags()
  app.run(lambda argv: main(argv, _args))
