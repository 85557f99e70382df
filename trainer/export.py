"""Exports: a SavedModel that scores raw IDs, and the tables as Parquet files.

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


def export_version(model, data, export_dir: str) -> str:
  """Writes the SavedModel and the tables as a new version of export_dir.

  Args:
    model: A trained MatrixFactorization.
    data: The DataConfig (ID column names and types).
    export_dir: The folder of versions (local or gs://).

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
    factors = pa.FixedSizeListArray.from_arrays(
        pa.array(values[:, :-1].reshape(-1).astype(np.float32)), dim)
    arrow = pa.table({"id": pa.array(ids.tolist()), "embedding": factors,
                      "bias": pa.array(values[:, -1].astype(np.float32))})
    kind = "user" if feature == model.user_feature else "item"
    path = os.path.join(export_dir, f"{kind}_embeddings.parquet")
    buffer = pa.BufferOutputStream()  # gfile objects are not seekable for pyarrow.
    pq.write_table(arrow, buffer)
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(buffer.getvalue().to_pybytes())
    logging.info("%s: %d rows x %d factors + bias -> %s", feature,
                 values.shape[0], dim, path)
    paths[feature] = path
  return paths
