"""Exports: SavedModels that score or retrieve from raw IDs, and embeddings as Parquet.

Matrix factorization: a SavedModel scoring (user, item) pairs, and the
tables as Parquet. Two-tower retrieval: a top-K SavedModel (raw query
features and k in, item IDs and scores out, seen items excludable), the query
tower alone as a SavedModel, and the catalog's item embeddings as Parquet.

Each export is a version, `EXPORT_DIR/<version>/` as TF Serving expects: an
integer (Unix seconds, so the newest run is served), written under a
temporary name and renamed only when complete. An existing version is never
overwritten.
"""

import os
import re
import time
import uuid
from typing import Dict, Optional

from absl import logging
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

_TF_TYPES = {"int64": tf.int64, "string": tf.string}


class _Scorer(tf.Module):
  """The serving module: raw user and item IDs in, probabilities out."""

  def __init__(self, model, user_dtype, item_dtype):
    super().__init__()
    self.model = model
    self._user, self._item = model.user_feature, model.item_feature
    self.serve = tf.function(self._serve, input_signature=[
        tf.TensorSpec([None], user_dtype, name=self._user),
        tf.TensorSpec([None], item_dtype, name=self._item)])

  def _serve(self, user_ids, item_ids):
    logits = self.model({self._user: user_ids, self._item: item_ids})
    return {"score": tf.sigmoid(logits)}


def export_saved_model(model, data, export_dir: str) -> str:
  """Writes a SavedModel whose serving_default takes raw IDs, returns `score`.

  Args:
    model: A trained MatrixFactorization.
    data: The DataConfig (ID column names and types).
    export_dir: Destination folder (local or gs://).

  Returns:
    export_dir.
  """
  scorer = _Scorer(model, _TF_TYPES[data.column_type(data.user_column)],
                   _TF_TYPES[data.column_type(data.item_column)])
  tf.saved_model.save(scorer, export_dir,
                      signatures={"serving_default": scorer.serve})
  logging.info("SavedModel written to %s (serving_default: %s, %s -> score).",
               export_dir, data.user_column, data.item_column)
  return export_dir


def export_version(model, data, export_dir: str, scann: bool = False,
                   scann_queries=None, info: Optional[Dict] = None) -> str:
  """Writes the SavedModel and the tables as a new version of export_dir.

  Args:
    model: A trained MatrixFactorization or TwoTower.
    data: The DataConfig (ID column names and types).
    export_dir: The folder of versions (local or gs://).
    scann: Two-tower only: the version also holds a ScaNN index (see
      write_scann_index).
    scann_queries: Query embeddings [Q, d] to measure the index's recall on.
    info: If given, receives what the export measured (ScaNN's recall).

  Returns:
    The new version's folder, EXPORT_DIR/<version>.
  """
  tf.io.gfile.makedirs(export_dir)
  version = int(time.time())
  latest = latest_version(export_dir)
  if latest is not None and int(os.path.basename(latest)) >= version:
    version = int(os.path.basename(latest)) + 1
  # TF Serving ignores folders whose names are not integers, so nothing
  # reads the export before the rename makes it a version.
  tmp = os.path.join(export_dir, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
  if hasattr(model, "query_embedding"):
    measured = export_retrieval(model, data, tmp, scann=scann,
                                scann_queries=scann_queries)
    if info is not None:
      info.update(measured)
  else:
    export_saved_model(model, data, tmp)
    export_tables(model, tmp)
  final = os.path.join(export_dir, str(version))
  if tf.io.gfile.exists(final):
    raise FileExistsError(f"{final} appeared while exporting; not "
                          f"overwritten (the export is left in {tmp}).")
  tf.io.gfile.rename(tmp, final)
  logging.info("Export version %d: %s", version, final)
  return final


def latest_version(export_dir: str) -> Optional[str]:
  """The newest complete version folder of export_dir, None if there is none."""
  if not tf.io.gfile.isdir(export_dir):
    return None
  versions = [int(name.rstrip("/")) for name in tf.io.gfile.listdir(export_dir)
              if re.fullmatch(r"\d+/?", name)]
  return os.path.join(export_dir, str(max(versions))) if versions else None


def table_ids(lookup, num_rows: int) -> np.ndarray:
  """The ID each table row stands for: vocabulary entries, or bucket numbers.

  In vocab mode the first rows are OOV rows, named by the lookup's OOV token.
  """
  if getattr(lookup, "_vocab", None) is None:
    return np.arange(num_rows, dtype=np.int64)
  vocab = lookup._vocab.get_vocabulary()  # pylint: disable=protected-access
  return np.array(vocab)


def export_tables(model, export_dir: str) -> Dict[str, str]:
  """Writes `{user,item}_embeddings.parquet`: columns id, embedding, bias.

  Returns:
    {feature: parquet path}.
  """
  paths = {}
  for feature, table in model.embedding.tables().items():
    values = table.numpy()
    ids = table_ids(model.lookups[feature], values.shape[0])
    dim = values.shape[1] - 1
    arrow = pa.table({"id": pa.array(ids.tolist()),
                      "embedding": _fixed_lists(values[:, :-1]),
                      "bias": pa.array(values[:, -1].astype(np.float32))})
    kind = "user" if feature == model.user_feature else "item"
    path = os.path.join(export_dir, f"{kind}_embeddings.parquet")
    _write_parquet(arrow, path)
    logging.info("%s: %d rows x %d factors + bias -> %s", feature,
                 values.shape[0], dim, path)
    paths[feature] = path
  return paths


def query_inputs(model, data) -> Dict[str, tf.DType]:
  """Raw inputs of a two-tower model's query tower: {column: dtype}."""
  spec = model.spec
  cols = []
  if any(f.type == "id" or f.source == "user" for f in spec.query):
    cols.append(data.user_column)
  cols += [f.col for f in spec.query if f.source == "row" and f.type != "id"]
  types = {"int64": tf.int64, "string": tf.string, "float32": tf.float32}
  return {c: types[data.column_type(c)] for c in dict.fromkeys(cols)}


class _QueryTower(tf.Module):
  """Raw query features -> query embedding."""

  def __init__(self, model, inputs: Dict[str, tf.DType]):
    super().__init__()
    self.model = model
    self._names = list(inputs)
    self.serve = tf.function(
        lambda *args: {"embedding": model.query_embedding(
            dict(zip(self._names, args)))},
        input_signature=[tf.TensorSpec([None], t, name=c)
                         for c, t in inputs.items()])


class _TopK(tf.Module):
  """Raw query features, k and items to exclude -> top-k item IDs and scores.

  Brute force over the catalog's candidate embeddings, computed at export.
  `exclude` [B, None] holds item IDs (padded with any ID outside the catalog)
  that may not be returned, e.g. the items a user has seen.
  """

  def __init__(self, model, inputs: Dict[str, tf.DType], item_ids: np.ndarray,
               candidates: np.ndarray, item_dtype: tf.DType):
    super().__init__()
    self.model = model
    self._names = list(inputs)
    self.item_ids = tf.Variable(tf.constant(item_ids, item_dtype),
                                trainable=False)
    self.candidates = tf.Variable(candidates, trainable=False)
    signature = [tf.TensorSpec([None], t, name=c) for c, t in inputs.items()]
    signature += [tf.TensorSpec([], tf.int32, name="k"),
                  tf.TensorSpec([None, None], item_dtype, name="exclude")]
    self.serve = tf.function(self._serve, input_signature=signature)

  def _serve(self, *args):
    *values, k, exclude = args
    query = self.model.query_embedding(dict(zip(self._names, values)))
    scores = tf.matmul(query, self.candidates, transpose_b=True)
    excluded = tf.reduce_any(
        tf.equal(exclude[:, :, None], self.item_ids[None, None, :]), axis=1)
    scores = tf.where(excluded, tf.float32.min, scores)
    top = tf.math.top_k(scores, k=tf.minimum(k, tf.shape(scores)[1]))
    return {"item_ids": tf.gather(self.item_ids, top.indices),
            "scores": top.values}


def export_retrieval(model, data, export_dir: str, catalog=None,
                     scann: bool = False,
                     scann_queries=None) -> Dict[str, float]:
  """Writes a two-tower model's top-K SavedModel, query tower and embeddings.

  Args:
    model: A trained TwoTower.
    data: The DataConfig (column names and types).
    export_dir: The version folder: serving_default there is the top-K model;
      query_tower/ holds the query tower; item_embeddings.parquet the catalog;
      with scann, scann/ a ScaNN index over the same embeddings.
    catalog: Item IDs to retrieve from (default: the model's catalog).
    scann: Whether to write the ScaNN index.
    scann_queries: Query embeddings [Q, d] to measure its recall@10 on.

  Returns:
    What was measured: {} or the ScaNN index's figures.
  """
  inputs = query_inputs(model, data)
  item_dtype = _TF_TYPES[data.column_type(data.item_column)]
  ids = model.catalog() if catalog is None else catalog
  candidates = model.candidate_embedding(tf.constant(ids)).numpy()
  topk = _TopK(model, inputs, ids, candidates, item_dtype)
  tf.saved_model.save(topk, export_dir,
                      signatures={"serving_default": topk.serve})
  query = _QueryTower(model, inputs)
  tf.saved_model.save(query, os.path.join(export_dir, "query_tower"),
                      signatures={"serving_default": query.serve})
  _write_parquet(pa.table({
      "id": pa.array(ids.tolist()),
      "embedding": _fixed_lists(candidates)}),
      os.path.join(export_dir, "item_embeddings.parquet"))
  logging.info("Retrieval export in %s: top-K model (%s, k, exclude -> "
               "item_ids, scores) over %d items; query_tower/; "
               "item_embeddings.parquet.", export_dir, ", ".join(inputs),
               len(ids))
  if not scann:
    return {}
  return write_scann_index(candidates, scann_queries,
                           os.path.join(export_dir, "scann"))


def write_scann_index(candidates: np.ndarray, queries: Optional[np.ndarray],
                      path: str, k: int = 10) -> Dict[str, float]:
  """Builds a ScaNN index of `candidates` (dot product), writes it to `path`.

  Rows of the index are rows of item_embeddings.parquet (same order), so a
  neighbour's position is its item's row there. The index partitions the
  catalog into about sqrt(N) leaves, searches a fifth of them (at least 8),
  scores with anisotropic hashing and re-scores the best 100 exactly;
  catalogs under 256 items are searched by brute force. Its recall@k is
  measured against exact top-k on `queries` (not measured without any).

  Returns:
    {"scann_recall@k": ..., "scann_items", "scann_queries",
     "scann_build_seconds", "scann_search_ms_per_query"}.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  try:
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("--scann needs the scann package: pip install "
                      "'.[scann]'.") from e
  db = np.ascontiguousarray(candidates, np.float32)
  if queries is None:
    logging.warning("ScaNN: no held-out queries (--eval_files) to measure the "
                    "index's recall on; it is built, its recall not measured.")
    queries = np.zeros((0, db.shape[1]), np.float32)
  queries = np.ascontiguousarray(queries, np.float32)
  n, k = len(db), min(k, len(db))
  t0 = time.time()
  builder = scann_ops_pybind.builder(db, k, "dot_product")
  if n < 256:
    searcher = builder.score_brute_force().build()
  else:
    leaves = int(round(np.sqrt(n)))
    searcher = builder.tree(
        num_leaves=leaves,
        num_leaves_to_search=min(leaves, max(8, leaves // 5)),
        training_sample_size=n).score_ah(
            2, anisotropic_quantization_threshold=0.2).reorder(
                min(n, 100)).build()
  build_s = time.time() - t0
  recall = search_ms = None  # Not measured without queries.
  if len(queries):
    t0 = time.time()
    found, _ = searcher.search_batched(queries, final_num_neighbors=k)
    search_ms = round((time.time() - t0) * 1e3 / len(queries), 4)
    hits = 0
    for start in range(0, len(queries), 4096):  # Exact top-k, in chunks.
      scores = queries[start:start + 4096] @ db.T
      exact = np.argpartition(-scores, k - 1, axis=1)[:, :k]
      for got, want in zip(found[start:start + 4096], exact):
        hits += len(set(got.tolist()) & set(want.tolist()))
    recall = round(hits / (k * len(queries)), 6)
  # ScaNN writes to local files; gs:// gets a copy.
  with tempfile.TemporaryDirectory() as local:
    searcher.serialize(local, relative_path=True)
    tf.io.gfile.makedirs(path)
    for name in os.listdir(local):
      tf.io.gfile.copy(os.path.join(local, name), os.path.join(path, name),
                       overwrite=True)
  logging.info("ScaNN index of %d items in %s (%.1fs): recall@%d %s "
               "against brute force over %d queries, %s ms per query.",
               n, path, build_s, k, recall, len(queries), search_ms)
  return {f"scann_recall@{k}": recall, "scann_items": n,
          "scann_queries": len(queries),
          "scann_build_seconds": round(build_s, 3),
          "scann_search_ms_per_query": search_ms}


def export_embedding_history(model, config, root: str) -> str:
  """Appends this run's item embeddings under root/run_date=.../run_id=.../.

  Every run adds a partition, so the embeddings of successive runs can be
  compared (drift, ANN rebuilds). Columns: id, embedding, run_id, run_time,
  config_hash.

  Returns:
    The Parquet file written.
  """
  import datetime  # pylint: disable=g-import-not-at-top
  import hashlib  # pylint: disable=g-import-not-at-top
  now = datetime.datetime.now(datetime.timezone.utc)
  config_hash = hashlib.sha256(config.to_json().encode()).hexdigest()[:16]
  run_id = f"{now:%Y%m%dT%H%M%S}-{config_hash[:8]}-{uuid.uuid4().hex[:6]}"
  ids = model.catalog()
  emb = model.candidate_embedding(tf.constant(ids)).numpy()
  n = len(ids)
  path = os.path.join(root, f"run_date={now:%Y-%m-%d}", f"run_id={run_id}",
                      "items.parquet")
  _write_parquet(pa.table({
      "id": pa.array(ids.tolist()), "embedding": _fixed_lists(emb),
      "run_id": pa.array([run_id] * n),
      "run_time": pa.array([now.isoformat()] * n),
      "config_hash": pa.array([config_hash] * n)}), path)
  logging.info("Item embeddings of run %s appended: %s", run_id, path)
  return path


def _fixed_lists(values: np.ndarray) -> pa.Array:
  return pa.FixedSizeListArray.from_arrays(
      pa.array(values.reshape(-1).astype(np.float32)), values.shape[1])


def _write_parquet(table: pa.Table, path: str) -> None:
  tf.io.gfile.makedirs(os.path.dirname(path))
  buffer = pa.BufferOutputStream()  # gfile objects are not seekable for pyarrow.
  pq.write_table(table, buffer)
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buffer.getvalue().to_pybytes())
