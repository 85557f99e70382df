"""Builds ID vocabularies in one streaming pass over the same shards training reads.

  python -m input.vocab --files='data/train-*.csv.gz' --out=vocab/ \
      [--min_count=2] [--max_size=1000000]

Writes OUT/<column>.txt (one ID per line, most frequent first, ties by ID) for
the user and item columns, and OUT/vocab.json with sizes and coverage.
"""

import json
import os
import time
from concurrent import futures
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
  columns = list(data.id_columns)
  stats = csv_dataset.RowStats()
  reader = csv_dataset.ShardReader(
      data.columns, data.column_types, columns, data.delimiter, data.header,
      data.bad_rows, data.block_bytes, stats)
  counters = {c: _Counter() for c in columns}
  t0 = time.time()

  def read(path):
    return list(reader.read(path))

  with futures.ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
    # map() keeps file order, so the output does not depend on timing.
    for done, blocks in enumerate(pool.map(read, files), 1):
      for block in blocks:
        for c, values in zip(columns, block):
          counters[c].add(values)
      logging.info("Vocabulary: %d/%d files, %d rows, %.0f rows/s.", done,
                   len(files), stats.rows, stats.rows / (time.time() - t0))

  tf.io.gfile.makedirs(out_dir)
  summary = {}
  for c in columns:
    ids, counts = counters[c].result()
    order = np.lexsort((ids, -counts))  # Most frequent first, ties by ID.
    ids, counts = ids[order], counts[order]
    keep = counts >= min_count
    if max_size:
      keep &= np.arange(len(ids)) < max_size
    path = os.path.join(out_dir, f"{c}.txt")
    with tf.io.gfile.GFile(path, "w") as f:
      f.write("".join(f"{x}\n" for x in ids[keep].tolist()))
    total = int(counts.sum())
    summary[c] = {
        "file": path, "size": int(keep.sum()), "distinct": int(len(ids)),
        "rows": total, "min_count": min_count, "max_size": max_size,
        "coverage": float(counts[keep].sum() / total) if total else 0.0}
    logging.info("%s: %d of %d distinct IDs kept, covering %.2f%% of rows -> %s",
                 c, summary[c]["size"], len(ids), 100 * summary[c]["coverage"],
                 path)
  if stats.skipped:
    logging.warning("Skipped %d malformed rows.", stats.skipped)
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
