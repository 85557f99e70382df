"""tf.data pipeline: gzipped CSV shards (local or gs://) -> (features, labels) batches.

Each shard is read by a Python generator that streams it through ISA-L's
inflate (zlib-compatible, about twice as fast as zlib) and parses
whole blocks of rows with pyarrow's CSV reader; both release the GIL, so shards
interleaved in parallel use every core, and a bad row or a truncated shard is
reported with the file's name. The rest (labels, negatives, shuffling,
rebatching) is tf.data graph code. Nothing here knows about the model.
"""

import re
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
from isal import isal_zlib as zlib  # ISA-L inflate: zlib's API, ~2x faster.
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import tensorflow as tf

_ARROW_TYPES = {"int64": pa.int64(), "float32": pa.float32(),
                "string": pa.string()}
_TF_TYPES = {"int64": tf.int64, "float32": tf.float32, "string": tf.string}
_NUMBER_RE = {
    "int64": r"^\s*[-+]?\d+\s*$",
    "float32": r"^\s*[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|nan)\s*$",
}


class InputDataError(ValueError):
  """A shard is unreadable or holds a malformed row; the message names it."""


def resolve_files(patterns: Sequence[str]) -> List[str]:
  """Expands file patterns (local or gs://) into a sorted list of files.

  Args:
    patterns: Glob patterns or plain paths.

  Returns:
    The matching files, sorted within each pattern, without duplicates.

  Raises:
    FileNotFoundError: If a pattern matches nothing.
  """
  files = []
  for pattern in patterns:
    matched = sorted(tf.io.gfile.glob(pattern))
    if not matched:
      raise FileNotFoundError(f"No file matches {pattern!r}.")
    files.extend(f for f in matched if f not in files)
  return files


class RowStats:
  """Rows read and malformed rows skipped, per file; safe across threads.

  A file read again in a later epoch is not counted twice: each file keeps the
  largest count any one pass over it reached.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._rows: Dict[str, int] = {}
    self._skipped: Dict[str, int] = {}

  def update(self, path: str, rows: int, skipped: int) -> None:
    with self._lock:
      self._rows[path] = max(self._rows.get(path, 0), rows)
      self._skipped[path] = max(self._skipped.get(path, 0), skipped)

  @property
  def rows(self) -> int:
    with self._lock:
      return sum(self._rows.values())

  @property
  def skipped(self) -> int:
    with self._lock:
      return sum(self._skipped.values())

  def skipped_by_file(self) -> Dict[str, int]:
    with self._lock:
      return {k: v for k, v in self._skipped.items() if v}


def _open(path: str):
  # Python's own file object releases the GIL on reads; gfile covers gs://.
  if "://" not in path:
    return open(path, "rb")
  return tf.io.gfile.GFile(path, "rb")


def _text_blocks(path: str, block_bytes: int) -> Iterator[bytes]:
  """Yields the decompressed text of a gzip shard in blocks of whole lines.

  Raises:
    InputDataError: If the shard is not gzip or is truncated.
  """
  decomp = zlib.decompressobj(wbits=31)
  tail = b""
  with _open(path) as f:
    while True:
      raw = f.read(block_bytes)
      if not raw:
        break
      try:
        text = tail + decomp.decompress(raw)
        # Concatenated gzip members are valid gzip: start the next member.
        while decomp.eof and decomp.unused_data:
          rest = decomp.unused_data
          decomp = zlib.decompressobj(wbits=31)
          text += decomp.decompress(rest)
      except zlib.error as e:
        raise InputDataError(f"{path}: not a readable gzip file ({e}).") from e
      cut = text.rfind(b"\n") + 1
      if cut:
        yield text[:cut]
      tail = text[cut:]
  if not decomp.eof:
    raise InputDataError(
        f"{path}: truncated gzip shard (the stream ends before its end "
        "marker); the file is incomplete or corrupt.")
  if tail:
    yield tail + b"\n"


class ShardReader:
  """Parses shards into typed numpy columns, a whole block at a time.

  Args:
    columns: Column names in file order.
    column_types: A type of COLUMN_TYPES per column.
    wanted: The columns to return, in this order.
    delimiter: Field separator.
    header: Whether each shard starts with a header line.
    bad_rows: "error" or "skip".
    block_bytes: Compressed bytes per block.
    stats: Where rows read and skipped are counted.
  """

  def __init__(self, columns: Sequence[str], column_types: Sequence[str],
               wanted: Sequence[str], delimiter: str, header: bool,
               bad_rows: str, block_bytes: int, stats: RowStats):
    self._columns = list(columns)
    self._types = dict(zip(columns, column_types))
    self._wanted = list(wanted)
    self._delimiter = delimiter
    self._header = header
    self._skip = bad_rows == "skip"
    self._block_bytes = block_bytes
    self._stats = stats

  def output_signature(self) -> Tuple[tf.TensorSpec, ...]:
    return tuple(tf.TensorSpec([None], _TF_TYPES[self._types[c]])
                 for c in self._wanted)

  def read(self, path) -> Iterator[Tuple[np.ndarray, ...]]:
    """Yields one tuple of column arrays per block of `path`."""
    path = path.decode() if isinstance(path, bytes) else str(path)
    rows = skipped = lines_before = 0
    first = True
    for text in _text_blocks(path, self._block_bytes):
      if first and self._header:
        text = text[text.find(b"\n") + 1:]
        lines_before = 1
      first = False
      table, bad = self._parse(path, text, lines_before)
      lines_before += text.count(b"\n")
      rows += table.num_rows
      skipped += bad
      self._stats.update(path, rows, skipped)
      if table.num_rows:
        yield tuple(self._to_numpy(table.column(c)) for c in self._wanted)
    if skipped:
      logging.warning("%s: skipped %d malformed rows.", path, skipped)

  @staticmethod
  def _to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_string(column.type):
      return column.to_numpy(zero_copy_only=False).astype(object)
    return column.to_numpy()

  def _parse(self, path: str, text: bytes,
             lines_before: int) -> Tuple[pa.Table, int]:
    """Parses one block; returns its wanted columns and the rows skipped."""
    bad_shape = []

    def on_invalid_row(row):
      bad_shape.append(row)
      return "skip" if self._skip else "error"

    def where(row) -> str:
      line = lines_before + row.number if row.number and row.number > 0 else "?"
      return (f"{path}: line {line}: expected {row.expected_columns} fields, "
              f"found {row.actual_columns}: {row.text[:200]!r}")

    # Numbers are read as text first only when a bad one must be skipped.
    types = {c: _ARROW_TYPES[self._types[c]] for c in self._wanted}
    try:
      table = self._read_csv(text, types, on_invalid_row)
      return table, len(bad_shape)
    except pa.ArrowInvalid as e:
      if bad_shape and not self._skip:
        raise InputDataError(where(bad_shape[-1]) + ". Fix the row or run "
                             "with --bad_rows=skip.") from None
      if not self._skip:
        raise InputDataError(
            f"{path}: malformed row in the block after line {lines_before}: "
            f"{_short(e)}. Fix the row or run with --bad_rows=skip.") from None
    # Skip mode with a value that is not a number: find and drop those rows.
    bad_shape.clear()
    table = self._read_csv(text, {c: pa.string() for c in self._wanted},
                           on_invalid_row)
    ok = None
    for c in self._wanted:
      if self._types[c] in _NUMBER_RE:
        good = pc.match_substring_regex(table.column(c), _NUMBER_RE[self._types[c]])
        ok = good if ok is None else pc.and_(ok, good)
    bad_values = table.num_rows - pc.sum(ok).as_py()
    table = table.filter(ok)
    table = pa.table({c: table.column(c).cast(types[c]) for c in self._wanted})
    return table, len(bad_shape) + bad_values

  def _read_csv(self, text: bytes, types, on_invalid_row) -> pa.Table:
    return pcsv.read_csv(
        pa.py_buffer(text),
        read_options=pcsv.ReadOptions(column_names=self._columns,
                                      use_threads=False,
                                      block_size=len(text) + 1),
        parse_options=pcsv.ParseOptions(delimiter=self._delimiter,
                                        invalid_row_handler=on_invalid_row),
        convert_options=pcsv.ConvertOptions(
            column_types=types, include_columns=self._wanted,
            null_values=[], strings_can_be_null=False))


def _short(e: Exception) -> str:
  return re.sub(r"\s+", " ", str(e))[:300]


def _load_catalog(path: str, dtype: str) -> np.ndarray:
  with tf.io.gfile.GFile(path, "rb") as f:
    ids = [line.rstrip(b"\r\n") for line in f if line.strip()]
  if dtype == "int64":
    return np.array([int(x) for x in ids], dtype=np.int64)
  return np.array(ids, dtype=object)


def _reader(data, stats: RowStats) -> ShardReader:
  """A reader of the columns a DataConfig uses: user, item and maybe label."""
  wanted = [data.user_column, data.item_column]
  if data.label_mode != "implicit":
    wanted.append(data.label_column)
  return ShardReader(data.columns, data.column_types, wanted, data.delimiter,
                     data.header, data.bad_rows, data.block_bytes, stats)


def make_dataset(data, files: Sequence[str], global_batch_size: int, *,
                 training: bool, seed: int = 0, epochs: int = 1,
                 repeat: bool = False, drop_remainder: bool = False,
                 skip_batches: int = 0,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 stats: Optional[RowStats] = None,
                 negative_catalog: str = "") -> tf.data.Dataset:
  """Builds the (features, labels) pipeline of one input pipeline.

  Args:
    data: A DataConfig (schema, labels, negatives, bad-row policy).
    files: Shards, from `resolve_files`.
    global_batch_size: Examples per step across all replicas.
    training: Shuffle files and rows and add negatives when True.
    seed: Seeds every random choice, so a run can be replayed exactly.
    epochs: Passes over the files (ignored if `repeat`).
    repeat: Repeat forever (the caller stops after a number of steps).
    drop_remainder: Keep every batch full (static shapes, as TPUs need).
    skip_batches: Batches to skip, e.g. those a resumed run already trained on.
    input_context: Gives the per-replica batch size and this pipeline's shard.
    stats: Counts rows read and skipped.
    negative_catalog: Item-ID file negatives are drawn from (overrides the
      config's), e.g. the item vocabulary.

  Returns:
    A dataset of ({user_column: [B], item_column: [B]}, labels [B] float32).

  Raises:
    ValueError: If there are fewer files than input pipelines.
  """
  stats = stats if stats is not None else RowStats()
  batch_size = global_batch_size
  files = list(files)
  if input_context is not None:
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    n = input_context.num_input_pipelines
    if n > 1:
      if len(files) < n:
        raise ValueError(f"{len(files)} files cannot feed {n} input pipelines;"
                         " write the data in at least that many shards.")
      files = files[input_context.input_pipeline_id::n]
    logging.info("Input pipeline %d of %d: %d files, %d examples per replica"
                 " batch.", input_context.input_pipeline_id + 1, n, len(files),
                 batch_size)

  user, item = data.user_column, data.item_column
  reader = _reader(data, stats)

  ds = tf.data.Dataset.from_tensor_slices(files)
  if training:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat() if repeat else ds.repeat(epochs)
  ds = ds.interleave(
      lambda path: tf.data.Dataset.from_generator(
          reader.read, args=(path,),
          output_signature=reader.output_signature()),
      cycle_length=min(len(files), 4),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)

  def to_example(*cols):
    features = {user: cols[0], item: cols[1]}
    if data.label_mode == "column":
      labels = tf.cast(cols[2], tf.float32)
      tf.debugging.assert_less_equal(
          tf.reduce_max(tf.abs(labels - 0.5)), 0.5,
          message=(f"Label column {data.label_column!r} must hold 0/1 values;"
                   " use --label_mode=threshold for ratings."))
    elif data.label_mode == "threshold":
      labels = tf.cast(cols[2] >= data.label_threshold, tf.float32)
    else:
      labels = tf.ones_like(cols[0], dtype=tf.float32)
    return features, labels

  ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)

  catalog_path = negative_catalog or data.negative_catalog
  catalog = (_load_catalog(catalog_path, data.column_type(item))
             if data.num_negatives and catalog_path else None)
  if data.num_negatives and training:
    logging.info("Negatives: %d per positive, uniform over %s.",
                 data.num_negatives,
                 f"{len(catalog)} items of {catalog_path}"
                 if catalog is not None else "the distinct items of each block")
  # Seeded streams of per-element seeds keep the whole pipeline replayable:
  # a resumed run skips to exactly the batches it had left.
  if data.num_negatives:
    ds = tf.data.Dataset.zip((ds, _seeds(seed))).map(
        lambda ex, s: _add_negatives(ex, s, data.num_negatives, catalog),
        num_parallel_calls=tf.data.AUTOTUNE)
  if training:
    # Consecutive blocks come from different files (the interleave alternates
    # them); permuting super-blocks of them mixes rows across blocks and files
    # at a per-element cost of one super-block, not one row.
    ds = ds.rebatch(max(data.shuffle_rows, 8 * batch_size))
    ds = tf.data.Dataset.zip((ds, _seeds(seed + 1))).map(
        _permute, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.rebatch(batch_size, drop_remainder=drop_remainder)
  if skip_batches:
    ds = ds.skip(skip_batches)
  options = tf.data.Options()
  options.deterministic = True
  # With an input context the files were sharded above; without one the
  # caller may hand the dataset to a strategy, which then splits its batches.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF if input_context is not None
      else tf.data.experimental.AutoShardPolicy.DATA)
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _seeds(seed: int) -> tf.data.Dataset:
  """An endless, seeded stream of stateless-RNG seeds (int64 [2])."""
  return tf.data.Dataset.random(seed=seed).batch(2)


def _add_negatives(example, seed, num_negatives: int,
                   catalog: Optional[np.ndarray]):
  """Appends `num_negatives` uniform random items (label 0) per row."""
  features, labels = example
  user, item = list(features)
  n = tf.shape(labels)[0] * num_negatives
  pool = (tf.constant(catalog) if catalog is not None
          else tf.unique(features[item]).y)
  picks = tf.random.stateless_uniform(
      [n], seed=seed, maxval=tf.shape(pool, out_type=tf.int64)[0],
      dtype=tf.int64)
  features = {
      user: tf.concat([features[user],
                       tf.repeat(features[user], num_negatives)], 0),
      item: tf.concat([features[item], tf.gather(pool, picks)], 0),
  }
  return features, tf.concat([labels, tf.zeros([n], tf.float32)], 0)


def _permute(example, seed):
  """Shuffles the rows of a super-block."""
  features, labels = example
  order = tf.random.experimental.stateless_shuffle(
      tf.range(tf.shape(labels)[0]), seed=seed)
  return ({k: tf.gather(v, order) for k, v in features.items()},
          tf.gather(labels, order))


def count_rows(data, files: Sequence[str], stats: Optional[RowStats] = None,
               threads: int = 2) -> Dict[str, int]:
  """Counts the usable rows of each file in one parallel streaming pass.

  The pass parses every row exactly as training will, so a malformed row or a
  truncated shard stops the run here, before any training.

  Args:
    data: A DataConfig.
    files: Shards to count.
    stats: Counts skipped rows too (with bad_rows="skip").
    threads: Files read at once (the parser releases the GIL).

  Returns:
    {path: rows}.
  """
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  stats = stats if stats is not None else RowStats()
  reader = _reader(data, stats)

  def count(path):
    return sum(len(cols[0]) for cols in reader.read(path))

  with futures.ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
    return dict(zip(files, pool.map(count, files)))
