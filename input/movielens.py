"""MovieLens ratings -> headerless gzipped CSV shards `user_id,item_id,rating,timestamp`.

  python -m input.movielens --format=ml-100k --src=path/ml-100k --dst=data/ml100k \
      [--num_shards=4] [--split=none|leave_last_out] [--order=shuffled|user|time]

ml-100k reads u.data, ml-1m ratings.dat, ml-latest (also ml-latest-small,
ml-20m, ml-25m) ratings.csv. With --split=leave_last_out each user's latest
interaction goes to test-*, the one before to validation-*, the rest to
train-*; otherwise everything goes to ratings-*. Rows are written in a seeded
random order unless --order asks for user or time order (to test how training
copes with sorted logs). DST/dataset.json records counts and files. MovieLens is GroupLens' data: research use, acknowledge it.
"""

import json
import os
import time
from typing import Dict

from absl import app, flags, logging
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import tensorflow as tf

COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
FORMATS = {
    # format: (file, delimiter, header)
    "ml-100k": ("u.data", "\t", False),
    "ml-1m": ("ratings.dat", "::", False),
    "ml-latest": ("ratings.csv", ",", True),
}
TRAIN, VALIDATION, TEST = 0, 1, 2
_SPLIT_NAMES = {TRAIN: "train", VALIDATION: "validation", TEST: "test"}
ORDERS = ("shuffled", "user", "time")


def read_ratings(fmt: str, src: str) -> pa.Table:
  """Reads a MovieLens ratings file into columns COLUMNS, in file order.

  Raises:
    ValueError: For an unknown format.
    FileNotFoundError: If the ratings file is not where the format keeps it.
  """
  if fmt not in FORMATS:
    raise ValueError(f"Unknown format {fmt!r}; use one of {sorted(FORMATS)}.")
  name, delimiter, header = FORMATS[fmt]
  path = os.path.join(src, name)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{fmt} keeps its ratings in {path}, which does "
                            "not exist.")
  with tf.io.gfile.GFile(path, "rb") as f:
    raw = f.read()
  if len(delimiter) > 1:  # pyarrow takes one-character delimiters.
    raw = raw.replace(delimiter.encode(), b"\t")
    delimiter = "\t"
  types = {"user_id": pa.int64(), "item_id": pa.int64(),
           "rating": pa.string(), "timestamp": pa.int64()}
  return pcsv.read_csv(
      pa.py_buffer(raw),
      read_options=pcsv.ReadOptions(column_names=COLUMNS,
                                    skip_rows=1 if header else 0),
      parse_options=pcsv.ParseOptions(delimiter=delimiter),
      # Ratings stay as written (4, 3.5) so the shards round-trip the source.
      convert_options=pcsv.ConvertOptions(column_types=types))


def leave_last_out(user_ids: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
  """Per-row split codes: each user's latest row TEST, the one before VALIDATION.

  Rows are ordered by timestamp within a user; equal timestamps keep file
  order (the later row counts as later). Users with fewer than 3 rows keep
  all of them in TRAIN, so every evaluated user has training history.

  Args:
    user_ids: [N] user of each row.
    timestamps: [N] time of each row.

  Returns:
    int8 [N] with TRAIN (0), VALIDATION (1) or TEST (2).
  """
  n = len(user_ids)
  order = np.lexsort((np.arange(n), timestamps, user_ids))
  users = user_ids[order]
  last = np.r_[users[1:] != users[:-1], True]  # Last row of each user.
  second = np.r_[last[1:], False] & ~last
  counts = np.bincount(np.unique(users, return_inverse=True)[1])
  big = np.repeat(counts >= 3, counts)
  codes = np.full(n, TRAIN, np.int8)
  codes[order[last & big]] = TEST
  codes[order[second & big]] = VALIDATION
  return codes


def _reorder(table: pa.Table, order: str, seed: int) -> pa.Table:
  """The rows of `table` in the given ORDERS order (ties keep log order)."""
  if order == "shuffled":
    index = np.random.default_rng(seed).permutation(table.num_rows)
  else:
    n = np.arange(table.num_rows)
    time_ = table.column("timestamp").to_numpy()
    index = (np.lexsort((n, time_, table.column("user_id").to_numpy()))
             if order == "user" else np.lexsort((n, time_)))
  return table.take(pa.array(index))


def _write(table: pa.Table, prefix: str, num_shards: int) -> list:
  """Writes contiguous row ranges of `table` as PREFIX-0000i-of-0000N.csv.gz."""
  bounds = np.linspace(0, table.num_rows, num_shards + 1).astype(int)
  paths = []
  for i in range(num_shards):
    path = f"{prefix}-{i:05d}-of-{num_shards:05d}.csv.gz"
    part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
    buffer = pa.BufferOutputStream()
    with pa.CompressedOutputStream(buffer, "gzip") as out:
      pcsv.write_csv(part, out, pcsv.WriteOptions(include_header=False,
                                                  quoting_style="none"))
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(buffer.getvalue().to_pybytes())
    paths.append(path)
  return paths


# Genre flags of ml-100k's u.item, in column order (its u.genre).
_GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children",
                "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
                "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
                "Sci-Fi", "Thriller", "War", "Western")


def _lines(path: str, encoding: str = "latin-1"):
  with tf.io.gfile.GFile(path, "rb") as f:
    return [line for line in f.read().decode(encoding).splitlines() if line]


def _year(text: str) -> int:
  """The year in "(1995)" at the end of a title, or in a date "01-Jan-1995"."""
  import re  # pylint: disable=g-import-not-at-top
  found = re.findall(r"(1[89]\d\d|20\d\d)", text)
  return int(found[-1]) if found else 0


def read_side_features(fmt: str, src: str) -> Dict[str, pa.Table]:
  """The user and item features a MovieLens folder provides.

  ml-100k: u.user (age, gender, occupation) and u.item (genres, release
  year); ml-1m: users.dat and movies.dat (year from the title); ml-latest:
  movies.csv only (no user features).

  Returns:
    {"user": table user_id, age, gender, occupation (if given),
     "item": table item_id, title, genres ("|"-joined), year (0: unknown)}.
  """
  out = {}
  if fmt == "ml-100k":
    users = [l.split("|") for l in _lines(os.path.join(src, "u.user"))]
    items = [l.split("|") for l in _lines(os.path.join(src, "u.item"))]
    out["user"] = pa.table({
        "user_id": [int(u[0]) for u in users], "age": [int(u[1]) for u in users],
        "gender": [u[2] for u in users], "occupation": [u[3] for u in users]})
    out["item"] = pa.table({
        "item_id": [int(i[0]) for i in items], "title": [i[1] for i in items],
        "genres": ["|".join(g for g, flag in zip(_GENRES_100K, i[5:24])
                            if flag == "1") for i in items],
        "year": [_year(i[2]) for i in items]})
  elif fmt == "ml-1m":
    users = [l.split("::") for l in _lines(os.path.join(src, "users.dat"))]
    items = [l.split("::") for l in _lines(os.path.join(src, "movies.dat"))]
    out["user"] = pa.table({
        "user_id": [int(u[0]) for u in users], "age": [int(u[2]) for u in users],
        "gender": [u[1] for u in users], "occupation": [u[3] for u in users]})
    out["item"] = pa.table({
        "item_id": [int(i[0]) for i in items], "title": [i[1] for i in items],
        "genres": [i[2] for i in items], "year": [_year(i[1]) for i in items]})
  elif fmt == "ml-latest":
    path = os.path.join(src, "movies.csv")
    with tf.io.gfile.GFile(path, "rb") as f:
      movies = pcsv.read_csv(pa.py_buffer(f.read()))
    titles = movies.column("title").to_pylist()
    out["item"] = pa.table({
        "item_id": movies.column("movieId").cast(pa.int64()),
        "title": titles,
        "genres": [g if g != "(no genres listed)" else "" for g in
                   movies.column("genres").to_pylist()],
        "year": [_year(t) for t in titles]})
  return out


def write_side_features(fmt: str, src: str, dst: str) -> Dict[str, str]:
  """Writes DST/users.csv.gz and DST/items.csv.gz (with a header).

  Returns:
    {"user": path, "item": path}, for the files the folder provides.
  """
  tf.io.gfile.makedirs(dst)
  paths = {}
  for kind, table in read_side_features(fmt, src).items():
    path = os.path.join(dst, f"{kind}s.csv.gz")
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "gzip") as out:
      pcsv.write_csv(table, out)
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(sink.getvalue().to_pybytes())
    paths[kind] = path
  return paths


def convert(fmt: str, src: str, dst: str, num_shards: int = 4,
            split: str = "none", order: str = "shuffled", seed: int = 0) -> Dict:
  """Converts a MovieLens download into gz CSV shards; returns dataset.json.

  Args:
    fmt: "ml-100k", "ml-1m" or "ml-latest".
    src: Folder of the unpacked download.
    dst: Output folder (local or gs://).
    num_shards: Shards of the training (or whole) set.
    split: "none" or "leave_last_out".
    order: Row order of the shards: "shuffled" (seeded), "user" or "time".
    seed: Seed of the shuffled order.
  """
  if split not in ("none", "leave_last_out"):
    raise ValueError("--split must be none or leave_last_out.")
  t0 = time.time()
  table = read_ratings(fmt, src)
  logging.info("Read %d ratings from %s (%.1fs).", table.num_rows, src,
               time.time() - t0)
  return write_splits(table, dst, num_shards, split,
                      {"format": fmt, "source": src}, order=order, seed=seed)


def write_splits(table: pa.Table, dst: str, num_shards: int = 4,
                 split: str = "none", info: Dict = None,
                 order: str = "shuffled", seed: int = 0) -> Dict:
  """Writes an interaction table (columns COLUMNS) as gz CSV shards.

  Args:
    table: Rows with COLUMNS, in log order.
    dst: Output folder (local or gs://).
    num_shards: Shards of the training (or whole) set.
    split: "none" (everything in ratings-*) or "leave_last_out" (train-*,
      validation-*, test-*; see leave_last_out).
    info: Extra entries for dataset.json (e.g. the source).
    order: Row order of the training (or whole) set, within and across
      shards: "shuffled" (a seeded random
      order, so that a reader that mixes rows over a window still sees the
      whole log mixed), "user" (by user, then time) or "time".
    seed: Seed of the shuffled order.

  Returns:
    The contents of dst/dataset.json.
  """
  if split not in ("none", "leave_last_out"):
    raise ValueError("--split must be none or leave_last_out.")
  if order not in ORDERS:
    raise ValueError(f"--order must be one of {ORDERS}.")
  t0 = time.time()
  users = table.column("user_id").to_numpy()
  logging.info("%d interactions of %d users and %d items.", table.num_rows,
               len(np.unique(users)),
               len(np.unique(table.column("item_id").to_numpy())))
  tf.io.gfile.makedirs(dst)
  splits = {}
  if split == "none":
    parts = {"ratings": (table, num_shards)}
  else:
    codes = leave_last_out(users, table.column("timestamp").to_numpy())
    small = len(np.unique(users)) - int((codes == TEST).sum())
    if small:
      logging.info("%d users have fewer than 3 ratings: all kept in train.",
                   small)
    parts = {_SPLIT_NAMES[c]: (table.filter(pa.array(codes == c)),
                               num_shards if c == TRAIN else 1)
             for c in (TRAIN, VALIDATION, TEST)}
  for name, (part, shards) in parts.items():
    if name in ("train", "ratings"):  # Held-out files keep log order.
      part = _reorder(part, order, seed)
    paths = _write(part, os.path.join(dst, name), shards)
    splits[name] = {"rows": part.num_rows,
                    "files": [os.path.basename(p) for p in paths]}
    logging.info("%s: %d rows in %d shards.", name, part.num_rows, shards)
  info = {**(info or {}), "columns": COLUMNS,
          "num_users": int(len(np.unique(users))),
          "num_items": int(len(np.unique(table.column("item_id").to_numpy()))),
          "num_rows": table.num_rows, "split": split, "order": order,
          "seed": seed, "splits": splits}
  with tf.io.gfile.GFile(os.path.join(dst, "dataset.json"), "w") as f:
    json.dump(info, f, indent=2)
  logging.info("Wrote %s in %.1fs.", dst, time.time() - t0)
  return info


def main(argv, args):
  del argv
  fmt = args["format"].value
  fmt = "ml-latest" if fmt.startswith(("ml-latest", "ml-20m", "ml-25m")) else fmt
  convert(fmt, args["src"].value, args["dst"].value,
          args["num_shards"].value, args["split"].value, args["order"].value,
          args["seed"].value)


if __name__ == "__main__":
  # Flags exist only when this runs as a program.
  _args = {
      "format": flags.DEFINE_string(
          "format", None, "ml-100k, ml-1m or ml-latest (ml-latest-small, "
          "ml-20m and ml-25m share ml-latest's format).", required=True),
      "src": flags.DEFINE_string("src", None, "Unpacked download.",
                                 required=True),
      "dst": flags.DEFINE_string("dst", None, "Output folder.", required=True),
      "num_shards": flags.DEFINE_integer("num_shards", 4, "Training shards."),
      "split": flags.DEFINE_enum("split", "none", ["none", "leave_last_out"],
                                 "Hold out each user's last two ratings."),
      "order": flags.DEFINE_enum("order", "shuffled", list(ORDERS),
                                 "Row order of the shards: shuffled (seeded), "
                                 "by user, or by time."),
      "seed": flags.DEFINE_integer("seed", 0, "Seed of the shuffled order."),
  }
  app.run(lambda argv: main(argv, _args))
