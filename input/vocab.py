"""Builds ID vocabularies in one streaming pass over the same shards training reads.

  python -m input.vocab --files='data/train-*.csv.gz' --out=vocab/ \
      [--min_count=2] [--max_size=1000000]

Writes OUT/<column>.txt (one ID per line, most frequent first, ties by ID) for
the user and item columns, and OUT/vocab.json with sizes and coverage.
"""

import dataclasses
import json
import os
import threading
import time
from typing import Dict, Sequence, Tuple

from absl import app, flags, logging
import numpy as np
import tensorflow as tf

from input import csv_dataset


class _Counter:
  """Exact ID counts, merged in vectorised batches to keep memory bounded."""

  def __init__(self):
    self.ids = None
    self.counts = np.zeros(0, np.int64)
    self._pending = []

  def add(self, ids: np.ndarray) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    self._pending.append((uniq, counts))
    if len(self._pending) >= 16:
      self._merge()

  def _merge(self) -> None:
    parts = self._pending + ([(self.ids, self.counts)]
                             if self.ids is not None else [])
    self._pending = []
    ids = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    self.ids, inverse = np.unique(ids, return_inverse=True)
    self.counts = np.bincount(inverse, weights=counts).astype(np.int64)

  def result(self) -> Tuple[np.ndarray, np.ndarray]:
    self._merge()
    if self.ids is None:
      return np.zeros(0, np.int64), self.counts
    return self.ids, self.counts


class IdCounts:
  """Counts of the user and item IDs of parsed blocks; safe across threads.

  Pass `add` to `csv_dataset.scan_files` so that the vocabulary comes from
  the same pass that counts rows.
  """

  def __init__(self, columns: Sequence[str]):
    self._lock = threading.Lock()
    self.counters = {c: _Counter() for c in columns}

  def add(self, block: Dict[str, np.ndarray]) -> None:
    with self._lock:
      for c, counter in self.counters.items():
        counter.add(block[c])


def build(data, files: Sequence[str], out_dir: str, *, min_count: int = 1,
          max_size: int = 0, threads: int = 2) -> Dict[str, dict]:
  """Counts user and item IDs in `files` and writes the vocabulary files.

  Args:
    data: A DataConfig (schema and bad-row policy).
    files: Shards, as from `csv_dataset.resolve_files`.
    out_dir: Output folder (local or gs://).
    min_count: IDs seen fewer times are left out (they share OOV rows).
    max_size: Keep at most this many IDs per column (0: no limit).
    threads: Files parsed at once.

  Returns:
    {column: summary}, also written to out_dir/vocab.json.
  """
  stats = csv_dataset.RowStats()
  counts = IdCounts(data.id_columns)
  # Only the ID columns are read: the files need no label column.
  data = dataclasses.replace(data, label_mode="implicit")
  t0 = time.time()
  csv_dataset.scan_files(data, files, stats, threads, observe=counts.add)
  logging.info("Vocabulary: %d files, %d rows, %.0f rows/s.", len(files),
               stats.rows, stats.rows / max(time.time() - t0, 1e-9))
  if stats.skipped:
    logging.warning("Skipped %d malformed rows.", stats.skipped)
  return write(counts, out_dir, min_count=min_count, max_size=max_size)


def write(counts: IdCounts, out_dir: str, *, min_count: int = 1,
          max_size: int = 0) -> Dict[str, dict]:
  """Writes OUT/<column>.txt (most frequent first), <column>.counts.txt and
  OUT/vocab.json.

  Args:
    counts: The IDs counted.
    out_dir: Output folder (local or gs://).
    min_count: IDs seen fewer times are left out (they share OOV rows).
    max_size: Keep at most this many IDs per column (0: no limit).

  Returns:
    {column: summary}, also written to out_dir/vocab.json.
  """
  tf.io.gfile.makedirs(out_dir)
  summary = {}
  for c, counter in counts.counters.items():
    ids, counts_ = counter.result()
    order = np.lexsort((ids, -counts_))  # Most frequent first, ties by ID.
    ids, counts_ = ids[order], counts_[order]
    keep = counts_ >= min_count
    if max_size:
      keep &= np.arange(len(ids)) < max_size
    path = os.path.join(out_dir, f"{c}.txt")
    with tf.io.gfile.GFile(path, "w") as f:
      f.write("".join(f"{x}\n" for x in ids[keep].tolist()))
    # Counts line by line, e.g. for a retrieval model's log(q) correction.
    with tf.io.gfile.GFile(os.path.join(out_dir, f"{c}.counts.txt"), "w") as f:
      f.write("".join(f"{x}\n" for x in counts_[keep].tolist()))
    total = int(counts_.sum())
    summary[c] = {
        "file": path, "size": int(keep.sum()), "distinct": int(len(ids)),
        "rows": total, "min_count": min_count, "max_size": max_size,
        "coverage": float(counts_[keep].sum() / total) if total else 0.0}
    logging.info("%s: %d of %d distinct IDs kept, covering %.2f%% of rows -> %s",
                 c, summary[c]["size"], len(ids), 100 * summary[c]["coverage"],
                 path)
  with tf.io.gfile.GFile(os.path.join(out_dir, "vocab.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv, args):
  del argv
  from trainer import config as config_lib  # pylint: disable=g-import-not-at-top
  fields = {k: args[k].value for k in ("columns", "column_types")
            if args[k].value}
  fields = {k: tuple(v) for k, v in fields.items()}
  fields.update({k: args[k].value for k in ("header", "delimiter",
                                            "user_column", "item_column",
                                            "bad_rows")})
  data = config_lib.DataConfig(**fields)
  files = csv_dataset.resolve_files(args["files"].value)
  build(data, files, args["out"].value, min_count=args["min_count"].value,
        max_size=args["max_size"].value)


if __name__ == "__main__":
  # Flags exist only when this runs as a program (the trainer imports it).
  _args = {
      "files": flags.DEFINE_list("files", None, "Shard patterns.",
                                 required=True),
      "out": flags.DEFINE_string("out", None, "Output folder.", required=True),
      "min_count": flags.DEFINE_integer("min_count", 1, "Minimum count."),
      "max_size": flags.DEFINE_integer("max_size", 0, "Maximum IDs (0: all)."),
      "columns": flags.DEFINE_list("columns", None, "Column names."),
      "column_types": flags.DEFINE_list("column_types", None, "Column types."),
      "header": flags.DEFINE_bool("header", False, "Shards have a header."),
      "delimiter": flags.DEFINE_string("delimiter", ",", "Field separator."),
      "user_column": flags.DEFINE_string("user_column", "user_id", "User IDs."),
      "item_column": flags.DEFINE_string("item_column", "item_id", "Item IDs."),
      "bad_rows": flags.DEFINE_enum("bad_rows", "error", ["error", "skip"],
                                    "Malformed rows: error or skip."),
  }
  app.run(lambda argv: main(argv, _args))
