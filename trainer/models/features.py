"""Feature configuration of the two-tower model: raw columns -> tower inputs.

A feature configuration is JSON (--features=FILE, or a preset):

  {"side_files": {"user": {"path": "users.csv.gz", "key": "user_id"},
                  "item": {"path": "items.csv.gz", "key": "item_id"}},
   "query": [{"name": "user_id", "type": "id"},
             {"name": "history", "type": "history", "max_len": 50,
              "recency": "learned", "decay": 0.8},
             {"name": "age", "type": "numeric", "source": "user"}],
   "candidate": [{"name": "item_id", "type": "id"},
                 {"name": "genres", "type": "categorical", "source": "item",
                  "separator": "|", "dim": 16}]}

Each feature reads `column` (default: its name) from the interaction rows
(`source` "row", the default) or from a side file joined by ID inside the
model ("user": by the row's user ID, "item": by the item ID), so exports take
raw IDs and a catalog is embedded from item IDs alone. Types:

  id: the user or item ID column, through the run's ID mode (hash or vocab)
    and its embedding table (`dim`, default --embedding_dim).
  categorical: string or integer values, several per row with `separator`
    (pooled by mean); a side file's values form a vocabulary, a row column's
    are hashed into `num_bins`. Own table of `dim`.
  text: free text, lower-cased and split on non-alphanumerics, each token
    hashed into `num_bins` rows of its own table of `dim`, pooled by mean.
  numeric: a number, standardised with the mean and deviation of its side
    file or given as `mean`/`std`; `batch_norm` adds batch normalisation.
  cyclical: sin and cos of the `period` ("hour", "weekday", "month") of a
    Unix-seconds column.
  pretrained: a vector given as text ("0.1 0.2 ...", `separator` " " by
    default), e.g. an image or text encoder's output in a side file; frozen
    unless `trainable` (then fine-tuned, starting from the file's values).
  history: the user's previous items, "|"-joined IDs, most recent last (as
    input.history writes them: only events before the row's own), pooled
    through the item table; `max_len` most recent kept; `recency` "none"
    (mean), "fixed" (weights decay^age) or "learned" (one weight per age,
    starting at decay^age).
"""

import dataclasses
import gzip
import io
import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import tensorflow as tf
import tf_keras

TYPES = ("id", "categorical", "text", "numeric", "cyclical", "pretrained",
         "history")
SOURCES = ("row", "user", "item")
PERIODS = {"hour": 86400, "weekday": 7 * 86400}  # Seconds; month: calendar.
RECENCY = ("none", "fixed", "learned")


@dataclasses.dataclass(frozen=True)
class Feature:
  """One tower input; see the module docstring for the fields by type."""
  name: str
  type: str
  column: str = ""
  source: str = "row"
  dim: int = 0
  separator: str = ""
  num_bins: int = 1000
  batch_norm: bool = False
  mean: Optional[float] = None
  std: Optional[float] = None
  period: str = ""
  max_len: int = 50
  recency: str = "none"
  decay: float = 0.8
  trainable: bool = False

  @property
  def col(self) -> str:
    return self.column or self.name


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """Both towers' features and the side files they join."""
  query: Tuple[Feature, ...]
  candidate: Tuple[Feature, ...]
  side_files: Dict[str, Dict[str, str]]

  def row_columns(self) -> List[str]:
    """Columns the towers read from the interaction rows themselves."""
    out = []
    for f in self.query + self.candidate:
      if f.source == "row" and f.type != "id" and f.col not in out:
        out.append(f.col)
    return out


def parse(text: str, user_column: str, item_column: str) -> FeatureSpec:
  """Parses and checks a feature configuration.

  Raises:
    ValueError: Naming the feature and what is wrong with it.
  """
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"--features is not valid JSON: {e}") from None
  towers = {}
  for tower in ("query", "candidate"):
    feats = []
    for entry in raw.get(tower, []):
      unknown = set(entry) - {f.name for f in dataclasses.fields(Feature)}
      if unknown:
        raise ValueError(f"{tower} feature {entry.get('name')!r}: unknown "
                         f"fields {sorted(unknown)}.")
      f = Feature(**entry)
      if f.type not in TYPES:
        raise ValueError(f"{tower} feature {f.name!r}: type must be one of "
                         f"{TYPES}, not {f.type!r}.")
      if f.source not in SOURCES:
        raise ValueError(f"{tower} feature {f.name!r}: source must be one of "
                         f"{SOURCES}.")
      if f.source != "row" and f.source not in raw.get("side_files", {}):
        raise ValueError(f"{tower} feature {f.name!r} reads the {f.source} "
                         "side file, which side_files does not give.")
      if f.type == "id" and f.col != (user_column if tower == "query"
                                      else item_column):
        raise ValueError(
            f"{tower} feature {f.name!r}: an id feature of the {tower} tower "
            f"must be the {'user' if tower == 'query' else 'item'} column.")
      if f.type == "cyclical" and f.period not in (*PERIODS, "month"):
        raise ValueError(f"{tower} feature {f.name!r}: period must be hour, "
                         "weekday or month.")
      if f.type == "pretrained" and f.source == "row" and not f.dim:
        raise ValueError(f"{tower} feature {f.name!r}: a pretrained vector "
                         "read from the rows needs its length as `dim`.")
      if f.type == "history" and f.recency not in RECENCY:
        raise ValueError(f"{tower} feature {f.name!r}: recency must be one "
                         f"of {RECENCY}.")
      feats.append(f)
    towers[tower] = tuple(feats)
  if not towers["query"] or not towers["candidate"]:
    raise ValueError("--features needs query and candidate features.")
  if not any(f.type == "id" for f in towers["candidate"]):
    raise ValueError("The candidate tower needs the item id feature: the "
                     "catalog is embedded from item IDs.")
  return FeatureSpec(towers["query"], towers["candidate"],
                     dict(raw.get("side_files", {})))


class Moments:
  """Mean and deviation of columns, from blocks seen once (thread-safe).

  The trainer's counting pass feeds it, so numeric row features are
  standardised with statistics of the whole training log.
  """

  def __init__(self, columns: Sequence[str]):
    import threading  # pylint: disable=g-import-not-at-top
    self._lock = threading.Lock()
    self.sums = {c: np.zeros(3) for c in columns}  # n, sum, sum of squares.

  def add(self, block: Dict[str, np.ndarray]) -> None:
    for c, acc in self.sums.items():
      v = np.asarray(block[c], np.float64)
      part = np.array([len(v), v.sum(), np.square(v).sum()])
      with self._lock:
        acc += part

  def result(self) -> Dict[str, Tuple[float, float]]:
    out = {}
    for c, (n, s, ss) in self.sums.items():
      mean = s / n if n else 0.0
      var = max(ss / n - mean * mean, 0.0) if n else 0.0
      out[c] = (float(mean), float(math.sqrt(var)) or 1.0)
    return out


def unscaled_row_numerics(spec: "FeatureSpec") -> List[str]:
  """Row columns of numeric features without a given mean and deviation."""
  return sorted({f.col for f in spec.query + spec.candidate
                 if f.type == "numeric" and f.source == "row" and
                 f.mean is None})


def with_moments(text: str, moments: Dict[str, Tuple[float, float]]) -> str:
  """The feature configuration with `mean`/`std` set from `moments`."""
  raw = json.loads(text)
  for tower in ("query", "candidate"):
    for f in raw.get(tower, []):
      col = f.get("column") or f["name"]
      if (f.get("type") == "numeric" and f.get("source", "row") == "row" and
          f.get("mean") is None and col in moments):
        f["mean"], f["std"] = moments[col]
  return json.dumps(raw)


def read_side_file(path: str) -> pa.Table:
  """A side file (CSV with a header, gzipped or not, local or gs://)."""
  with tf.io.gfile.GFile(path, "rb") as f:
    raw = f.read()
  if path.endswith(".gz"):
    raw = gzip.decompress(raw)
  return pcsv.read_csv(io.BytesIO(raw), convert_options=pcsv.ConvertOptions(
      strings_can_be_null=False))


class SideTable(tf_keras.layers.Layer):
  """A side file held in the model: key -> its columns' values.

  The file is read once, when the model is built; its values become
  constants of the model (and of its exports). An unknown key gets the
  column's default: "" for strings, the mean for numbers.

  Args:
    path: The side file.
    key: Its ID column.
    key_dtype: tf.int64 or tf.string, the dtype of the rows' IDs.
    columns: The columns kept.
  """

  def __init__(self, path: str, key: str, key_dtype: tf.DType,
               columns: Sequence[str], **kwargs):
    super().__init__(**kwargs)
    table = read_side_file(path)
    missing = [c for c in [key, *columns] if c not in table.column_names]
    if missing:
      raise ValueError(f"Side file {path} has no column(s) {missing}; it has "
                       f"{table.column_names}.")
    keys = table.column(key).to_numpy(zero_copy_only=False)
    if key_dtype == tf.string:
      keys = keys.astype(str).astype(object)
    else:
      keys = keys.astype(np.int64)
    if len(np.unique(keys)) != len(keys):
      raise ValueError(f"Side file {path}: {key} has duplicate IDs.")
    self.size = len(keys)
    self.keys = keys
    self._index = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, key_dtype), tf.range(len(keys), dtype=tf.int64)),
        default_value=len(keys))
    self.values: Dict[str, np.ndarray] = {}
    self._consts = {}
    for c in columns:
      col = table.column(c)
      if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        v = np.array(col.to_pylist() + [""], dtype=object)
      else:
        v = col.to_numpy(zero_copy_only=False).astype(np.float64)
        v = np.append(v, np.nanmean(v) if len(v) else 0.0)
        v = np.nan_to_num(v, nan=v[-1]).astype(np.float32)
      self.values[c] = v
      self._consts[c] = tf.constant(v)

  def index(self, ids: tf.Tensor) -> tf.Tensor:
    """`ids [B]` -> row of each ID in the file [B] (size: unknown ID)."""
    return self._index.lookup(ids)

  def call(self, ids: tf.Tensor) -> Dict[str, tf.Tensor]:
    """`ids [B]` -> {column: [B]}, and the file's rows under "__index__"."""
    idx = self._index.lookup(ids)
    out = {c: tf.gather(v, idx) for c, v in self._consts.items()}
    out["__index__"] = idx
    return out


def parse_vectors(values: Sequence[str], separator: str) -> np.ndarray:
  """Vectors written as text -> float32 [N, D]; "" -> zeros.

  Raises:
    ValueError: If the vectors do not all have the same length.
  """
  rows = [[float(x) for x in str(v).split(separator or None) if x]
          for v in values]
  dims = {len(r) for r in rows if r}
  if len(dims) > 1:
    raise ValueError(f"Pretrained vectors of different lengths: {sorted(dims)}.")
  dim = dims.pop() if dims else 1
  return np.array([r or [0.0] * dim for r in rows], np.float32)


def text_tokens(values: tf.Tensor) -> tf.RaggedTensor:
  """Strings [B] -> lower-cased alphanumeric tokens [B, None]."""
  words = tf.strings.regex_replace(tf.strings.lower(values), r"[^a-z0-9]+", " ")
  return _split(words, " ")


def _split(values: tf.Tensor, separator: str) -> tf.RaggedTensor:
  """Strings [B] -> tokens [B, None] (no empty tokens)."""
  parts = tf.strings.split(values, sep=separator)
  return tf.ragged.boolean_mask(parts, tf.strings.length(parts) > 0)


def _days_to_month(days: tf.Tensor) -> tf.Tensor:
  """Days since 1970-01-01 -> month 0..11 (Hinnant's civil_from_days)."""
  z = days + 719468
  era = tf.math.floordiv(z, 146097)
  doe = z - era * 146097
  yoe = tf.math.floordiv(
      doe - tf.math.floordiv(doe, 1460) + tf.math.floordiv(doe, 36524) -
      tf.math.floordiv(doe, 146096), 365)
  doy = doe - (365 * yoe + tf.math.floordiv(yoe, 4) - tf.math.floordiv(yoe, 100))
  mp = tf.math.floordiv(5 * doy + 2, 153)
  return tf.where(mp < 10, mp + 2, mp - 10)  # March-based -> January = 0.


def cyclical(seconds: tf.Tensor, period: str) -> tf.Tensor:
  """Unix seconds [B] -> [B, 2] (sin, cos) of the position in `period`."""
  seconds = tf.cast(seconds, tf.int64)
  if period == "month":
    phase = tf.cast(_days_to_month(tf.math.floordiv(seconds, 86400)),
                    tf.float32) / 12.0
  elif period == "weekday":
    # 1970-01-01 was a Thursday: shift so that Monday is 0.
    days = tf.math.floordiv(seconds, 86400) + 3
    phase = tf.cast(tf.math.floormod(days, 7), tf.float32) / 7.0
  else:
    phase = tf.cast(tf.math.floormod(seconds, PERIODS[period]),
                    tf.float32) / PERIODS[period]
  angle = 2 * math.pi * phase
  return tf.stack([tf.sin(angle), tf.cos(angle)], axis=1)


def recency_weights(lengths: tf.Tensor, log_weights: tf.Tensor,
                    max_len: int) -> tf.RaggedTensor:
  """Per-item weights of histories, normalised to sum 1 per row.

  Args:
    lengths: [B] items kept per history (<= max_len), most recent last.
    log_weights: [max_len] log-weight by age (0 = most recent).
    max_len: Longest history.

  Returns:
    [B, None] weights aligned with the histories' items.
  """
  ages = tf.ragged.range(lengths - 1, -1, -1)  # Oldest first, like the items.
  w = tf.exp(tf.gather(log_weights, tf.minimum(ages, max_len - 1)))
  return w / tf.maximum(tf.reduce_sum(w, axis=1, keepdims=True), 1e-12)
