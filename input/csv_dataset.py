"""tf.data pipeline: gzipped CSV shards (local or gs://) -> (features, labels) batches.

How one input pipeline turns its shards into batches:

1. Read: `files_in_flight` files at once, a small block (`block_bytes` of
   gzip) at a time, in a fixed round-robin order. Blocks are inflated by ISA-L
   on a thread pool, and consecutive blocks (~1 MiB of text) parsed by one
   call on the same pool (the native parser of _fastcsv.c for plain numeric
   text, else pyarrow); all of it releases the GIL. A thread of its own
   keeps this going ahead of tf.data. A bad row or a truncated shard is
   reported with the file's name and line.
2. Mix (training): rows pass through a buffer of `shuffle_buffer_rows` rows.
   Once it is full, each incoming row takes the slot of one row sent on, the
   slots visited in a fresh random permutation per turn of the buffer. A row
   waits at most two turns, and when one pass over the data fits in the buffer
   each turn sends on exactly one pass in random order (a full shuffle).
3. Batch: with k negatives per positive, every batch is exactly B // (1 + k)
   positives, each followed by its k negatives: whatever the order on disk,
   every batch has the same share of positives, in training and evaluation.
   Negatives are uniform over the catalog (or, without one, over the distinct
   items in the mixing buffer), from a generator keyed by (seed, pipeline,
   chunk), so a stream is replayed exactly and a resumed run skips batches
   without drawing their negatives.

Nothing here knows about the model.
"""

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import queue
import re
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
from isal import isal_zlib as zlib  # ISA-L inflate: zlib's API, ~2x faster.
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import tensorflow as tf

try:  # Built at install from _fastcsv.c; optional (see setup.py).
  from input import _fastcsv as _native
except ImportError:  # pragma: no cover - depends on the install.
  _native = None

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
    self._arrow_types = {c: _ARROW_TYPES[self._types[c]] for c in self._wanted}
    # The native parser reads numeric columns, of rows of at most
    # _native.MAX_FIELDS fields.
    self._native_kinds = (
        "".join({"int64": "i", "float32": "f"}[self._types[c]]
                for c in self._wanted)
        if _native is not None
        and all(self._types[c] != "string" for c in self._wanted)
        and len(self._columns) <= _native.MAX_FIELDS else None)
    self._fields = [self._columns.index(c) for c in self._wanted]

  @property
  def wanted(self) -> List[str]:
    """The columns each block holds, in order."""
    return list(self._wanted)

  def texts(self, path) -> Iterator[Tuple[bytes, int, int]]:
    """Yields (text of whole lines, lines before it, its lines) per block of
    `path`, the header left out."""
    path = path.decode() if isinstance(path, bytes) else str(path)
    lines_before = 0
    first = True
    for text in _text_blocks(path, self._block_bytes):
      if first and self._header:
        text = text[text.find(b"\n") + 1:]
        lines_before = 1
      first = False
      lines = _count_lines(text)
      yield text, lines_before, lines
      lines_before += lines

  def read(self, path) -> Iterator[Tuple[np.ndarray, ...]]:
    """Yields one tuple of column arrays per block of `path`."""
    path = path.decode() if isinstance(path, bytes) else str(path)
    rows = skipped = 0
    for block in self.texts(path):
      # The same parsing as the training stream's (native when plain).
      cols, (n,), (bad,) = self.parse_blocks([(path, *block)])
      rows += n
      skipped += bad
      self._stats.update(path, rows, skipped)
      if n:
        yield cols
    if skipped:
      logging.warning("%s: skipped %d malformed rows.", path, skipped)

  def parse_blocks(self, blocks: Sequence[Tuple[str, bytes, int, int]]
                   ) -> Tuple[Tuple[np.ndarray, ...], List[int], List[int]]:
    """Parses blocks (path, text, lines before, lines) of one or more files
    at once.

    One parser call over the blocks' text is much cheaper than one per block.
    Plain numeric text goes to the native parser (the values pyarrow would
    give); the rest to pyarrow. If the text holds anything but plain rows (a
    malformed row, an empty line), each block is parsed on its own instead,
    exactly as `read` does.

    Returns:
      The wanted columns of all the blocks' rows, in order, and per block
      the rows it gave and the malformed rows it skipped.
    """
    texts = [text for _, text, _, _ in blocks]
    lines = [n for _, _, _, n in blocks]
    if self._native_kinds is not None:
      rows = sum(lines)
      cols = tuple(np.empty(rows, np.int64 if k == "i" else np.float32)
                   for k in self._native_kinds)
      if _native.parse(texts, self._delimiter, len(self._columns),
                       self._fields, self._native_kinds, cols, rows):
        return cols, lines, [0] * len(blocks)
      # Not plain text: pyarrow parses it (and reports or skips bad rows).
    try:
      table = self._read_csv(texts[0] if len(texts) == 1 else b"".join(texts),
                             self._arrow_types, None)
      if table.num_rows == sum(lines):  # No empty line: a row per line.
        return (tuple(self._to_numpy(table.column(c)) for c in self._wanted),
                lines, [0] * len(blocks))
    except pa.ArrowInvalid:
      pass
    parts, rows, skipped = [], [], []
    for path, text, lines_before, _ in blocks:
      table, bad = self._parse(path, text, lines_before)
      parts.append([self._to_numpy(table.column(c)) for c in self._wanted])
      rows.append(table.num_rows)
      skipped.append(bad)
    return tuple(np.concatenate(cs) for cs in zip(*parts)), rows, skipped

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
      line = (lines_before + _line_of(text, row.number)
              if row.number and row.number > 0 else "?")
      return (f"{path}: line {line}: expected {row.expected_columns} fields, "
              f"found {row.actual_columns}: {row.text[:200]!r}")

    # Numbers are read as text only when one is bad: to skip its row, or to
    # say which line it is on.
    types = self._arrow_types
    try:
      table = self._read_csv(text, types, on_invalid_row)
      return table, len(bad_shape)
    except pa.ArrowInvalid as e:
      if bad_shape and not self._skip:
        raise InputDataError(where(bad_shape[-1]) + ". Fix the row or run "
                             "with --bad_rows=skip.") from None
      error = _short(e)
    bad_shape.clear()
    table = self._read_csv(text, {c: pa.string() for c in self._wanted},
                           on_invalid_row)
    ok = pa.array(np.ones(table.num_rows, bool))
    for c in self._wanted:
      if self._types[c] in _NUMBER_RE:
        good = pc.match_substring_regex(table.column(c),
                                        _NUMBER_RE[self._types[c]])
        ok = pc.and_(ok, good)
    if not self._skip:
      first_bad = int(np.argmin(ok.to_numpy(zero_copy_only=False)))
      raise InputDataError(
          f"{path}: line {lines_before + _line_of(text, first_bad + 1)}: "
          f"{error}. Fix the row or run with --bad_rows=skip.")
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


def _count_lines(text: bytes) -> int:
  """Newlines in `text`; several times faster than bytes.count, and without
  the GIL."""
  return int(np.count_nonzero(np.frombuffer(text, np.uint8) == ord("\n")))


def _line_of(text: bytes, number: int) -> int:
  """Line (from 1) of the `number`-th row of `text`; the parser skips empty lines."""
  seen = 0
  for line_no, line in enumerate(text.split(b"\n"), 1):
    if line not in (b"", b"\r"):
      seen += 1
      if seen == number:
        return line_no
  return number


def _short(e: Exception) -> str:
  return re.sub(r"\s+", " ", str(e))[:300]


def _load_catalog(path: str, dtype: str) -> np.ndarray:
  """Item IDs of a catalog file (one per line), as the reader parses them."""
  with tf.io.gfile.GFile(path, "rb") as f:
    ids = [line.rstrip(b"\r\n") for line in f if line.strip()]
  if dtype == "int64":
    return np.array([int(x) for x in ids], dtype=np.int64)
  return np.array([x.decode() for x in ids], dtype=object)


def _reader(data, stats: RowStats, extra: Sequence[str] = ()) -> ShardReader:
  """A reader of the columns a DataConfig uses: user, item, maybe label,
  then its feature columns (then `extra`)."""
  wanted = [data.user_column, data.item_column]
  if data.label_mode != "implicit":
    wanted.append(data.label_column)
  for c in (*data.feature_columns, *extra):
    if c not in wanted:
      wanted.append(c)
  return ShardReader(data.columns, data.column_types, wanted, data.delimiter,
                     data.header, data.bad_rows, data.block_bytes, stats)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """What one replica's batch is made of.

  Attributes:
    rows: Rows of the log per batch (the positives, with negatives).
    group: Examples per row: the row itself and its negatives (1 + k).
  """
  rows: int
  group: int

  @property
  def examples(self) -> int:
    return self.rows * self.group


def batch_layout(data, per_replica_batch: int) -> BatchLayout:
  """Splits a replica's batch into rows and their negatives.

  Args:
    data: A DataConfig (num_negatives).
    per_replica_batch: Examples per replica batch asked for; with k negatives
      it is rounded down to a multiple of 1 + k.

  Returns:
    The layout.

  Raises:
    ValueError: If the batch cannot hold one positive and its negatives.
  """
  group = 1 + data.num_negatives
  if per_replica_batch < group:
    raise ValueError(
        f"A replica's batch of {per_replica_batch} examples cannot hold one "
        f"positive and its {data.num_negatives} negatives; raise --batch_size.")
  return BatchLayout(per_replica_batch // group, group)


def _labelled(data, path: str, cols) -> Tuple[np.ndarray, ...]:
  """(user, item, label float32, *feature columns) of a parsed block."""
  user, item = cols[0], cols[1]
  if data.label_mode == "implicit":
    return (user, item, np.ones(len(user), np.float32), *cols[2:])
  value, extra = cols[2], cols[3:]
  if data.label_mode == "threshold":
    return (user, item, (value >= data.label_threshold).astype(np.float32),
            *extra)
  if len(value) and (value.min() < 0 or value.max() > 1):
    raise InputDataError(
        f"{path}: label column {data.label_column!r} must hold 0/1 values, "
        f"found {value.max() if value.max() > 1 else value.min()}; use "
        "--label_mode=threshold for ratings.")
  return (user, item, value.astype(np.float32), *extra)


def _pack(cols: Sequence[np.ndarray]) -> np.ndarray:
  """Columns as one array of records (fields f0, f1, ...), so that moving a
  row is one operation whatever the number of columns."""
  rows = np.empty(len(cols[0]), [(f"f{i}", c.dtype) for i, c in enumerate(cols)])
  for i, c in enumerate(cols):
    rows[f"f{i}"] = c
  return rows


def _unpack(rows: np.ndarray) -> List[np.ndarray]:
  return [np.ascontiguousarray(rows[f]) for f in rows.dtype.names]


def _labelled_blocks(data, blocks, rows: Sequence[int],
                     cols) -> Tuple[np.ndarray, ...]:
  """`_labelled` of the rows of several blocks; an error names its block's file."""
  try:
    return _labelled(data, blocks[0][0], cols)
  except InputDataError:
    if len(blocks) == 1:
      raise
  start = 0
  for (path, _, _, _), n in zip(blocks, rows):
    _labelled(data, path, tuple(c[start:start + n] for c in cols))
    start += n
  raise AssertionError("unreachable")


def _round_robin(reader: ShardReader, paths: Sequence[str], width: int,
                 pool: concurrent.futures.Executor
                 ) -> Iterator[Tuple[str, Optional[bytes], int, int]]:
  """(path, text, lines before, lines) of `paths`' blocks, `width` files at
  a time.

  The order depends only on the files' contents, never on the threads'
  timing: file after file in `paths` order takes a free slot, and slots are
  visited in turn. Each file's next block is read and inflated ahead on
  `pool`. When a file ends, (path, None, 0, 0) says so.
  """
  queue = iter(paths)

  def start(path):
    blocks = reader.texts(path)
    return [path, blocks, pool.submit(next, blocks, None)]

  active = [start(p) for p in itertools.islice(queue, width)]
  i = 0
  while active:
    i %= len(active)
    path, blocks, pending = active[i]
    block = pending.result()
    if block is None:  # The file is done: the next one takes its slot.
      yield path, None, 0, 0
      following = next(queue, None)
      if following is None:
        del active[i]
        continue
      active[i] = start(following)
    else:
      active[i][2] = pool.submit(next, blocks, None)
      yield (path, *block)
    i += 1


# Text parsed per parser call: large enough that the call's fixed cost is
# small, small enough to stay in cache.
_PARSE_BYTES = 1 << 20
# Parser calls in flight on the pool, ahead of the reading thread.
_PARSE_AHEAD = 2


def _parsed_blocks(data, reader: ShardReader, paths: Sequence[str], width: int,
                   pool: concurrent.futures.Executor, stats: RowStats
                   ) -> Iterator[np.ndarray]:
  """The labelled rows of `paths` (see `_labelled`, `_pack`), in
  `_round_robin` order.

  Consecutive blocks (of any files) are parsed together, `_PARSE_BYTES` of
  text at a time, on `pool`, ahead of the caller. Which blocks go together
  depends only on the files' contents.
  """

  def parse(group):
    blocks = [b for b in group if b[1] is not None]
    if not blocks:
      return None, [], []
    cols, rows, skipped = reader.parse_blocks(blocks)
    return _pack(_labelled_blocks(data, blocks, rows, cols)), rows, skipped

  counts: Dict[str, List[int]] = {}

  def finish(group, future):
    packed, rows, skipped = future.result()
    blocks = iter(zip(rows, skipped))
    for path, text, _, _ in group:
      count = counts.setdefault(path, [0, 0])
      if text is None:  # The file is done.
        del counts[path]
        if count[1]:
          logging.warning("%s: skipped %d malformed rows.", path, count[1])
        continue
      r, bad = next(blocks)
      count[0] += r
      count[1] += bad
      stats.update(path, count[0], count[1])
    return packed

  ahead = collections.deque()
  group, size = [], 0
  for block in _round_robin(reader, paths, width, pool):
    group.append(block)
    if block[1] is not None:
      size += len(block[1])
    if size >= _PARSE_BYTES:
      ahead.append((group, pool.submit(parse, group)))
      group, size = [], 0
      while len(ahead) > _PARSE_AHEAD:
        rows = finish(*ahead.popleft())
        if rows is not None and len(rows):
          yield rows
  if group:
    ahead.append((group, pool.submit(parse, group)))
  while ahead:
    rows = finish(*ahead.popleft())
    if rows is not None and len(rows):
      yield rows


def _permutation(rng: np.random.Generator, n: int, dtype) -> np.ndarray:
  """rng.permutation(n) as `dtype`: the same draws, natively if built."""
  perm = np.arange(n, dtype=dtype)
  if _native is not None:
    with rng.bit_generator.lock:
      _native.shuffle(perm, perm.itemsize, rng.bit_generator.capsule)
  else:
    rng.shuffle(perm)
  return perm


class _Mixer:
  """Sends rows on in random order through a buffer of `capacity` rows.

  While the buffer fills nothing comes out. Then each incoming row takes the
  slot of the row it sends on; slots are visited in a fresh random
  permutation per turn of the buffer, so a row waits at most two turns, and
  when the buffer holds one whole pass over the data (see `seal`), each turn
  sends on exactly one pass, in random order.
  """

  def __init__(self, capacity: int, rng: np.random.Generator):
    self.capacity = capacity
    self._rng = rng
    self._buf: Optional[np.ndarray] = None
    self._fill = 0
    self._perm = np.zeros(0, np.int32)
    self._pos = 0
    self.turns = 0
    self._pool_turn = -1
    self._pool = None

  def seal(self) -> None:
    """Ends filling: the buffer keeps just the rows it holds (one whole pass)."""
    if self._fill < self.capacity and self._buf is not None:
      self.capacity = self._fill

  def push(self, rows: np.ndarray) -> List[np.ndarray]:
    """Takes a block of rows (see `_pack`); returns the (possibly empty)
    rows sent on."""
    n = len(rows)
    if self._buf is None:
      self._buf = np.empty(self.capacity, rows.dtype)
    take = min(n, self.capacity - self._fill)
    self._buf[self._fill:self._fill + take] = rows[:take]
    self._fill += take
    out, start = [], take
    while start < n:
      if self._pos == len(self._perm):  # A new turn of the buffer.
        # rng.permutation's values, as int32: half the memory.
        self._perm = _permutation(
            self._rng, self.capacity,
            np.int32 if self.capacity < 2**31 else np.int64)
        self._pos = 0
        self.turns += 1
      # Within one turn the slots are distinct, so gather-then-scatter is exact.
      k = min(n - start, len(self._perm) - self._pos)
      slots = self._perm[self._pos:self._pos + k]
      self._pos += k
      incoming = rows[start:start + k]
      if _native is not None and not rows.dtype.hasobject:
        # Native: take and put in one pass over the slots.
        sent = np.empty(k, rows.dtype)
        _native.mix(self._buf, slots, incoming, sent, rows.dtype.itemsize,
                    slots.itemsize)
        out.append(sent)
      else:
        # np.take/np.put of whole rows: several times faster than fancy
        # indexing, or than one call per column.
        out.append(np.take(self._buf, slots))
        np.put(self._buf, slots, incoming)
      start += k
    return out

  def drain(self) -> Optional[np.ndarray]:
    """Sends on every row still held, in random order; the stream has ended."""
    if self._buf is None:
      return None
    order = _permutation(self._rng, self._fill, np.int64)
    return np.take(self._buf[:self._fill], order)

  def distinct_items(self) -> np.ndarray:
    """The distinct items in the buffer, recomputed once per turn."""
    if self._pool is None or self._pool_turn != self.turns:
      self._pool = np.unique(self._buf["f1"][:self._fill])
      self._pool_turn = self.turns
    return self._pool


class _Rows:
  """A queue of row blocks (see `_pack`) that hands out fixed numbers of rows."""

  def __init__(self):
    self._parts: List[np.ndarray] = []
    self.count = 0

  def add(self, rows: Optional[np.ndarray]) -> None:
    if rows is not None and len(rows):
      self._parts.append(rows)
      self.count += len(rows)

  def take(self, n: int) -> np.ndarray:
    out, got = [], 0
    while got < n:
      part = self._parts[0]
      k = min(n - got, len(part))
      out.append(part[:k])
      if k == len(part):
        self._parts.pop(0)
      else:
        self._parts[0] = part[k:]
      got += k
    self.count -= n
    return out[0] if len(out) == 1 else np.concatenate(out)


_EPOCH_END = object()


class _ReadAhead:
  """Runs a generator on a thread of its own, up to `depth` items ahead.

  Iterating yields the generator's items in order, then re-raises any error
  it raised. The stream keeps being read (and the parsing pool kept busy)
  while the consumer is away, e.g. while tf.data holds the stream's
  generator between two chunks. `close` stops the thread.
  """

  def __init__(self, make: Callable[[], Iterator[object]], depth: int = 16):
    self._queue = queue.Queue(depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(make,),
                                    name="csv_dataset-read", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def _run(self, make) -> None:
    items = make()
    try:
      for item in items:
        if not self._put((True, item)):
          return
    except BaseException as e:  # pylint: disable=broad-except
      self._put((False, e))
      return
    finally:
      items.close()
    self._put((False, None))

  def __iter__(self):
    while True:
      ok, item = self._queue.get()
      if ok:
        yield item
      elif item is None:
        return
      else:
        raise item

  def close(self) -> None:
    self._stop.set()
    self._thread.join()


class _BatchStream:
  """The Python side of one input pipeline: shards -> chunks of whole batches.

  Called with no arguments it returns a generator of (features, labels)
  chunks, each a whole number of `layout` batches (the last one of a finite
  stream may end with a partial batch), laid out row by row: a positive, then
  its k negatives.
  """

  def __init__(self, data, files: Sequence[str], layout: BatchLayout, *,
               training: bool, seed: int, epochs: int, repeat: bool,
               drop_remainder: bool, skip_batches: int, pipeline: int,
               catalog: Optional[np.ndarray], stats: RowStats):
    self._data = data
    self._files = list(files)
    self._layout = layout
    self._training = training
    self._seed = seed
    self._epochs = epochs
    self._repeat = repeat
    self._drop = drop_remainder
    self._skip = skip_batches
    self._pipeline = pipeline
    self._catalog = catalog
    self._reader = _reader(data, stats)
    self._stats = stats
    # Chunks of ~64k examples keep the per-element cost of the generator
    # small at any batch size.
    self.batches_per_chunk = max(1, (1 << 18) // layout.examples)

  def _passes(self) -> Iterator[List[str]]:
    epoch = 0
    while self._repeat or epoch < self._epochs:
      order = list(self._files)
      if self._training:
        np.random.default_rng([self._seed, self._pipeline, epoch]).shuffle(order)
      yield order
      epoch += 1

  def __call__(self):
    data, layout = self._data, self._layout
    mixer = (_Mixer(data.shuffle_buffer_rows, np.random.default_rng(
        [self._seed, self._pipeline, 1 << 20])) if self._training else None)
    pending = _Rows()
    chunk_rows = layout.rows * self.batches_per_chunk
    state = {"chunk": 0, "batch": 0}
    ahead = _ReadAhead(self._read_passes)
    try:
      for item in ahead:
        if item is _EPOCH_END:
          if mixer:  # After the first pass this changes nothing.
            mixer.seal()
          continue
        for out in (mixer.push(item) if mixer else [item]):
          pending.add(out)
        while pending.count >= chunk_rows:
          chunk = self._chunk(pending.take(chunk_rows), mixer, state)
          if chunk is not None:
            yield chunk
    finally:
      ahead.close()
    if mixer:
      pending.add(mixer.drain())
    rows = pending.count
    if self._drop:
      rows -= rows % layout.rows
    if rows:
      chunk = self._chunk(pending.take(rows), mixer, state)
      if chunk is not None:
        yield chunk

  def _read_passes(self) -> Iterator[object]:
    """Row blocks (see `_pack`) of every pass, each pass followed by
    _EPOCH_END."""
    data = self._data
    width = max(1, data.files_in_flight)
    threads = max(1, min(width, len(self._files), os.cpu_count() or 2))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for paths in self._passes():
        yield from _parsed_blocks(data, self._reader, paths, width, pool,
                                  self._stats)
        yield _EPOCH_END

  def _chunk(self, rows, mixer: Optional[_Mixer], state):
    """Adds negatives to a chunk of rows; None if it is all skipped."""
    layout, k = self._layout, self._data.num_negatives
    n = len(rows)
    first, chunk = state["batch"], state["chunk"]
    state["batch"] += -(-n // layout.rows)
    state["chunk"] += 1
    if state["batch"] <= self._skip:
      return None
    user, item, label, *extra = _unpack(rows)
    if k:
      if self._catalog is not None:
        pool = self._catalog
      elif mixer is not None:
        pool = mixer.distinct_items()
      else:
        pool = np.unique(item)
      rng = np.random.default_rng([self._seed, self._pipeline, chunk])
      negatives = pool[rng.integers(0, len(pool), size=(n, k))]
      item = np.concatenate([item[:, None], negatives], axis=1).reshape(-1)
      user = np.repeat(user, 1 + k)
      # A row's other columns describe its context (history, time, ...):
      # its negatives share them.
      extra = [np.repeat(c, 1 + k) for c in extra]
      label = np.zeros((n, 1 + k), np.float32)
      label[:, 0] = 1.0
      label = label.reshape(-1)
    start = max(0, self._skip - first) * layout.examples
    features = {self._data.user_column: user[start:],
                self._data.item_column: item[start:]}
    features.update({c: v[start:] for c, v in
                     zip(self._data.feature_columns, extra)})
    return features, label[start:]


def make_dataset(data, files: Sequence[str], global_batch_size: int, *,
                 training: bool, seed: int = 0, epochs: int = 1,
                 repeat: bool = False, drop_remainder: bool = False,
                 skip_steps: int = 0,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 stats: Optional[RowStats] = None,
                 negative_catalog: str = "") -> tf.data.Dataset:
  """Builds the (features, labels) pipeline of one input pipeline.

  Args:
    data: A DataConfig (schema, labels, negatives, mixing, bad-row policy).
    files: Shards, from `resolve_files`.
    global_batch_size: Examples per step across all replicas; with k
      negatives each replica's share is rounded down to a multiple of 1 + k.
    training: Shuffle files, mix rows and add negatives when True.
    seed: Seeds every random choice, so a run can be replayed exactly.
    epochs: Passes over the files (ignored if `repeat`).
    repeat: Repeat forever (the caller stops after a number of steps).
    drop_remainder: Keep every batch full (static shapes, as TPUs need).
    skip_steps: Steps already trained (a resumed run): each step took one
      batch for every replica this pipeline feeds, and those are skipped.
    input_context: Gives the per-replica batch size and this pipeline's shard.
    stats: Counts rows read and skipped.
    negative_catalog: Item-ID file negatives are drawn from (overrides the
      config's), e.g. the item vocabulary.

  Returns:
    A dataset of ({user_column: [B], item_column: [B], and each of
    data.feature_columns: [B]}, labels [B] float32).

  Raises:
    ValueError: If there are fewer files than input pipelines, or a batch
      cannot hold a positive and its negatives.
  """
  stats = stats if stats is not None else RowStats()
  batch_size, pipeline, replicas_here = global_batch_size, 0, 1
  files = list(files)
  if input_context is not None:
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    n = input_context.num_input_pipelines
    pipeline = input_context.input_pipeline_id
    replicas_here = max(1, input_context.num_replicas_in_sync // n)
    if n > 1:
      if len(files) < n:
        raise ValueError(f"{len(files)} files cannot feed {n} input pipelines;"
                         " write the data in at least that many shards.")
      files = files[pipeline::n]
  layout = batch_layout(data, batch_size)
  catalog_path = negative_catalog or data.negative_catalog
  catalog = (_load_catalog(catalog_path, data.column_type(data.item_column))
             if data.num_negatives and catalog_path else None)
  if _native is None:
    logging.log_first_n(
        logging.WARNING, "input/_fastcsv.c was not built at install (no C "
        "compiler?): parsing and mixing with pyarrow and numpy, 1.6-1.9x "
        "slower. Reinstall with a C compiler present to build it.", 1)
  if training:
    logging.info(
        "Input pipeline %d: %d files, %d read at once in %d KiB blocks; "
        "mixing buffer of %d rows (%.0f MiB); batches of %d rows%s.",
        pipeline + 1, len(files), min(len(files), data.files_in_flight),
        data.block_bytes >> 10, data.shuffle_buffer_rows,
        data.shuffle_buffer_rows * _row_bytes(data) / 2**20, layout.rows,
        (f" + {layout.rows * data.num_negatives} negatives = "
         f"{layout.examples} examples, per replica") if data.num_negatives
        else " per replica")
    if data.num_negatives:
      logging.info("Negatives: %d per positive, uniform over %s.",
                   data.num_negatives,
                   f"{len(catalog)} items of {catalog_path}"
                   if catalog is not None
                   else "the distinct items in the mixing buffer")

  user, item = data.user_column, data.item_column
  spec = lambda col: tf.TensorSpec([None], _TF_TYPES[data.column_type(col)])
  stream = _BatchStream(
      data, files, layout, training=training, seed=seed, epochs=epochs,
      repeat=repeat, drop_remainder=drop_remainder,
      skip_batches=skip_steps * replicas_here, pipeline=pipeline,
      catalog=catalog, stats=stats)
  ds = tf.data.Dataset.from_generator(
      stream, output_signature=(
          {c: spec(c) for c in (user, item, *data.feature_columns)},
          tf.TensorSpec([None], tf.float32)))
  ds = ds.rebatch(layout.examples, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  # No autotuning: nothing here has a parallelism to tune, and TensorFlow's
  # autotuning thread makes deleting an iterator wait out its sleep (up to
  # 5 s at the end of each pass).
  options.autotune.enabled = False
  # With an input context the files were sharded above; without one the
  # caller may hand the dataset to a strategy, which then splits its batches.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF if input_context is not None
      else tf.data.experimental.AutoShardPolicy.DATA)
  # Batches of two chunks ahead.
  return ds.with_options(options).prefetch(2 * stream.batches_per_chunk)


def _row_bytes(data) -> int:
  """Bytes a row takes in the mixing buffer (user, item, label, features)."""
  per_type = {"int64": 8, "float32": 4, "string": 8 + 56}  # str objects.
  return sum(per_type[data.column_type(c)] for c in
             (data.user_column, data.item_column, *data.feature_columns)) + 4


@dataclasses.dataclass
class FileScan:
  """What one pass over a file found.

  Attributes:
    rows: Usable rows.
    in_order: {column: share of consecutive rows whose value does not
      decrease}; about 0.5 for a shuffled file, near 1 for a sorted or
      grouped one.
  """
  rows: int
  in_order: Dict[str, float]


def scan_files(data, files: Sequence[str], stats: Optional[RowStats] = None,
               threads: int = 2,
               observe: Optional[Callable[[Dict[str, np.ndarray]], None]] = None
               ) -> Dict[str, FileScan]:
  """Counts the usable rows of each file and how sorted it is, in one pass.

  The pass parses every row exactly as training will, so a malformed row or a
  truncated shard stops the run here, before any training.

  Args:
    data: A DataConfig.
    files: Shards to scan.
    stats: Counts skipped rows too (with bad_rows="skip").
    threads: Files read at once (the parser releases the GIL).
    observe: Called with each parsed block, {column: values}, e.g. to count
      IDs for a vocabulary in the same pass (from several threads).

  Returns:
    {path: FileScan}, in the order of `files`.
  """
  stats = stats if stats is not None else RowStats()
  order_columns = [data.user_column] + (
      [data.time_column] if data.time_column in data.columns else [])
  reader = _reader(data, stats, extra=order_columns)
  names = reader.wanted

  def scan(path):
    rows, pairs, ordered = 0, 0, dict.fromkeys(order_columns, 0)
    for cols in reader.read(path):
      if observe is not None:
        observe(dict(zip(names, cols)))
      rows += len(cols[0])
      pairs += max(0, len(cols[0]) - 1)
      for c in order_columns:
        v = cols[names.index(c)]
        ordered[c] += int(np.count_nonzero(v[1:] >= v[:-1]))
    return FileScan(rows, {c: ordered[c] / pairs if pairs else 0.0
                           for c in order_columns})

  with concurrent.futures.ThreadPoolExecutor(
      max(1, min(threads, len(files)))) as pool:
    return dict(zip(files, pool.map(scan, files)))


def order_warnings(data, scans: Dict[str, FileScan],
                   threshold: float = 0.9) -> List[str]:
  """Says which files are sorted beyond what the mixing buffer can mix.

  The buffer holds about shuffle_buffer_rows / files_in_flight consecutive
  rows of each file being read: a sorted file longer than that reaches the
  batches as runs of one user (or one period). A log that fits in the buffer
  is shuffled whole, whatever its order.

  Returns:
    One message per such file, naming it and the fix.
  """
  total = sum(s.rows for s in scans.values())
  if total <= data.shuffle_buffer_rows:
    return []
  share = data.shuffle_buffer_rows // max(1, min(data.files_in_flight,
                                                 len(scans)))
  out = []
  for path, scan in scans.items():
    sorted_by = [f"{column} ({100 * fraction:.0f}% of consecutive rows in "
                 "order)" for column, fraction in scan.in_order.items()
                 if fraction >= threshold]
    if sorted_by and scan.rows > share:
      out.append(
          f"{path} is sorted by {' and by '.join(sorted_by)} over {scan.rows} "
          f"rows, more than the {share} rows of it the mixing buffer holds: "
          "batches will hold runs of few users or of one period. Write the "
          "log in more, shuffled shards (input.movielens writes them so), or "
          "raise --shuffle_buffer_rows (memory) or --files_in_flight.")
  return out
