"""Deterministic synthetic interaction logs with planted latent structure.

Users and items get random latent vectors; items are drawn with Zipf-like
popularity; a row's label is 1 with probability sigmoid(sharpness * <u, v> +
item bias). A model that recovers the vectors can score well above chance, so
the log doubles as the demo data and as a planted signal for tests.

  python -m input.synthetic --dst=DIR --rows=200000
"""

import os
from typing import Dict

from absl import app, flags, logging
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv


def interactions(num_rows: int, num_users: int, num_items: int, *,
                 dim: int = 8, zipf: float = 1.0, sharpness: float = 10.0,
                 seed: int = 0) -> Dict[str, np.ndarray]:
  """Samples an interaction log.

  Args:
    num_rows: Rows to sample.
    num_users: Distinct users (IDs 0..num_users-1, uniformly active).
    num_items: Distinct items (IDs 0..num_items-1, popularity ~ 1/rank^zipf).
    dim: Latent dimension of the planted structure.
    zipf: Popularity exponent.
    sharpness: Scale of the latent affinity inside the sigmoid; larger makes
      labels more predictable.
    seed: Seeds everything.

  Returns:
    Columns user_id, item_id (int64), label (int64 0/1), timestamp (int64).
  """
  rng = np.random.default_rng(seed)
  user_vec = rng.normal(size=(num_users, dim)) / np.sqrt(dim)
  item_vec = rng.normal(size=(num_items, dim)) / np.sqrt(dim)
  item_bias = rng.normal(scale=0.5, size=num_items)
  # Item IDs are shuffled against popularity so ID order leaks nothing.
  popularity = 1.0 / np.arange(1, num_items + 1) ** zipf
  item_of_rank = rng.permutation(num_items)
  users = rng.integers(0, num_users, num_rows)
  items = item_of_rank[rng.choice(num_items, num_rows,
                                  p=popularity / popularity.sum())]
  affinity = np.einsum("nd,nd->n", user_vec[users], item_vec[items])
  p = 1.0 / (1.0 + np.exp(-(sharpness * affinity + item_bias[items])))
  labels = (rng.random(num_rows) < p).astype(np.int64)
  return {"user_id": users.astype(np.int64), "item_id": items.astype(np.int64),
          "label": labels,
          "timestamp": 1_600_000_000 + np.arange(num_rows, dtype=np.int64)}


def choices(num_rows: int, num_users: int, num_items: int, *, dim: int = 8,
            zipf: float = 1.0, sharpness: float = 4.0,
            seed: int = 0) -> Dict[str, np.ndarray]:
  """Samples an implicit-feedback log: every row is an item a user chose.

  A user picks item i with probability ~ popularity(i) * exp(sharpness *
  <u, v_i>) (a softmax choice over the catalog), so which items a user
  takes is personal, as a retrieval model assumes; `interactions` instead
  draws items by popularity alone and plants the signal in the labels.

  Args:
    num_rows: Rows to sample (users uniformly active).
    num_users: Distinct users (IDs 0..num_users-1).
    num_items: Distinct items (IDs 0..num_items-1).
    dim: Latent dimension of the planted structure.
    zipf: Popularity exponent.
    sharpness: Weight of the personal affinity against popularity.
    seed: Seeds everything.

  Returns:
    Columns user_id, item_id, timestamp (int64), in time order.
  """
  rng = np.random.default_rng(seed)
  user_vec = rng.normal(size=(num_users, dim)) / np.sqrt(dim)
  item_vec = rng.normal(size=(num_items, dim)) / np.sqrt(dim)
  log_pop = np.log(1.0 / np.arange(1, num_items + 1) ** zipf)[
      np.argsort(rng.permutation(num_items))]
  users = rng.integers(0, num_users, num_rows)
  items = np.empty(num_rows, np.int64)
  for u in np.unique(users):  # Gumbel-max: one softmax draw per row.
    rows = np.flatnonzero(users == u)
    logits = log_pop + sharpness * item_vec @ user_vec[u]
    gumbel = rng.gumbel(size=(len(rows), num_items))
    items[rows] = np.argmax(logits[None, :] + gumbel, axis=1)
  return {"user_id": users.astype(np.int64), "item_id": items,
          "timestamp": 1_600_000_000 + np.arange(num_rows, dtype=np.int64)}


def write_shards(columns: Dict[str, np.ndarray], path_prefix: str,
                 num_shards: int) -> list:
  """Writes columns as headerless gzipped CSV shards PREFIX-0000i-of-0000N."""
  num_rows = len(next(iter(columns.values())))
  bounds = np.linspace(0, num_rows, num_shards + 1).astype(int)
  paths = []
  for i in range(num_shards):
    part = pa.table({k: v[bounds[i]:bounds[i + 1]] for k, v in columns.items()})
    path = f"{path_prefix}-{i:05d}-of-{num_shards:05d}.csv.gz"
    with pa.CompressedOutputStream(path, "gzip") as out:
      pcsv.write_csv(part, out, pcsv.WriteOptions(include_header=False))
    paths.append(path)
  return paths


def write_log(dst: str, *, num_rows: int = 200_000, num_users: int = 2000,
              num_items: int = 1000, eval_fraction: float = 0.1,
              num_shards: int = 4, seed: int = 0) -> Dict[str, list]:
  """Writes train-* and eval-* shards under `dst`, unless already there.

  Returns:
    {"train": [paths], "eval": [paths]}.
  """
  os.makedirs(dst, exist_ok=True)
  marker = os.path.join(dst, "_COMPLETE")
  spec = f"v2 {num_rows} {num_users} {num_items} {eval_fraction} {num_shards} {seed}"
  names = {"train": f"{dst}/train", "eval": f"{dst}/eval"}
  if os.path.exists(marker) and open(marker).read() == spec:
    logging.info("Synthetic log already in %s.", dst)
    return {k: sorted(f"{dst}/{f}" for f in os.listdir(dst)
                      if f.startswith(k + "-")) for k in names}
  logging.info("Writing a synthetic log of %d rows (%d users, %d items) to %s.",
               num_rows, num_users, num_items, dst)
  cols = interactions(num_rows, num_users, num_items, seed=seed)
  n_eval = int(num_rows * eval_fraction)
  # The latest rows are held out, as a time split would do.
  train = {k: v[:num_rows - n_eval] for k, v in cols.items()}
  held = {k: v[num_rows - n_eval:] for k, v in cols.items()}
  paths = {"train": write_shards(train, names["train"], num_shards),
           "eval": write_shards(held, names["eval"], max(1, num_shards // 4))}
  with open(marker, "w") as f:
    f.write(spec)
  return paths


def main(argv, args):
  del argv
  paths = write_log(args["dst"].value, num_rows=args["rows"].value,
                    num_users=args["users"].value, num_items=args["items"].value,
                    num_shards=args["shards"].value, seed=args["seed"].value)
  for k, v in paths.items():
    logging.info("%s: %d shards", k, len(v))


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module
  # (the trainer does, for its demo) defines none.
  _args = {
      "dst": flags.DEFINE_string("dst", None, "Output folder.", required=True),
      "rows": flags.DEFINE_integer("rows", 200_000, "Rows in all."),
      "users": flags.DEFINE_integer("users", 2000, "Distinct users."),
      "items": flags.DEFINE_integer("items", 1000, "Distinct items."),
      "shards": flags.DEFINE_integer("shards", 4, "Training shards."),
      "seed": flags.DEFINE_integer("seed", 0, "Random seed."),
  }
  app.run(lambda argv: main(argv, _args))
