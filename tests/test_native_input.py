"""The input pipeline's native loops (input/_fastcsv.c) against pyarrow and
numpy: the same values bit for bit, the same batches, the same errors."""

import gzip
import os
import unittest
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import tensorflow as tf

from input import csv_dataset
from trainer import config as config_lib

NATIVE = csv_dataset._native


def arrow_columns(text, ncols, fields, kinds):
  """What the pyarrow path reads from `text`."""
  names = [f"c{i}" for i in range(ncols)]
  types = {names[f]: pa.int64() if k == "i" else pa.float32()
           for f, k in zip(fields, kinds)}
  table = pcsv.read_csv(
      pa.py_buffer(text),
      read_options=pcsv.ReadOptions(column_names=names, use_threads=False),
      parse_options=pcsv.ParseOptions(delimiter=","),
      convert_options=pcsv.ConvertOptions(
          column_types=types, include_columns=[names[f] for f in fields],
          null_values=[], strings_can_be_null=False))
  return [table.column(names[f]).to_numpy() for f in fields]


def native_columns(pieces, ncols, fields, kinds, rows):
  outs = tuple(np.full(rows, 7, np.int64 if k == "i" else np.float32)
               for k in kinds)
  ok = NATIVE.parse(pieces, ",", ncols, fields, kinds, outs, rows)
  return ok, outs


@unittest.skipIf(NATIVE is None and not os.environ.get("CI"),
                 "input._fastcsv was not built (no C compiler at install)")
class NativeParserTest(tf.test.TestCase):

  def test_built_where_ci_runs(self):
    # CI has a compiler: a failed build must not pass as the slow path.
    self.assertIsNotNone(NATIVE)

  def test_values_equal_pyarrow_bit_for_bit(self):
    rng = np.random.default_rng(0)
    digits = np.array(list("0123456789"))

    def number(kind):
      sign = "-" if rng.random() < 0.3 else ""
      if kind == "i":
        return sign + "".join(rng.choice(digits, rng.integers(1, 19)))
      whole = int(rng.integers(1, 9))
      frac = int(rng.integers(0, min(8, 15 - whole) + 1))
      text = "".join(rng.choice(digits, whole))
      return sign + text + ("." + "".join(rng.choice(digits, frac))
                            if frac else "")

    tables = 0
    for _ in range(400):
      ncols = int(rng.integers(2, 6))
      kinds_all = rng.choice(["i", "f", "x"], ncols)
      fields = [i for i in range(ncols) if kinds_all[i] != "x"]
      if not fields:
        continue
      kinds = "".join(kinds_all[i] for i in fields)
      rows = int(rng.integers(1, 60))
      text = "".join(",".join(number(k) if k != "x" else "any text"
                              for k in kinds_all) + "\n"
                     for _ in range(rows)).encode()
      # Split into two pieces at a line end, as blocks arrive.
      cut = text.find(b"\n", len(text) // 2) + 1
      ok, outs = native_columns([text[:cut], text[cut:]], ncols, fields,
                                kinds, rows)
      self.assertTrue(ok, text[:200])
      for got, want in zip(outs, arrow_columns(text, ncols, fields, kinds)):
        self.assertEqual(got.dtype, want.dtype)
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
      tables += 1
    self.assertGreater(tables, 300)

  def test_float32_rounding_of_many_decimals(self):
    # 200,000 decimals with up to 8 digits after the point, where rounding
    # to float32 is hardest: the values pyarrow gives, to the bit.
    rng = np.random.default_rng(1)
    whole = rng.integers(0, 10**7, 200_000)
    frac_digits = rng.integers(1, 9, 200_000)
    frac = rng.integers(0, 10**frac_digits)
    lines = [f"{w}.{f:0{d}d}\n" for w, f, d in zip(whole, frac, frac_digits)]
    text = "".join(f"1,{x}" for x in lines).encode()
    ok, outs = native_columns([text], 2, [1], "f", len(lines))
    self.assertTrue(ok)
    want = arrow_columns(text, 2, [1], "f")[0]
    np.testing.assert_array_equal(outs[0].view(np.uint32),
                                  want.view(np.uint32))

  def test_text_that_is_not_plain_is_left_to_pyarrow(self):
    for text in (b"1,2\n\n", b"1,2,3\n", b"1\n", b'"1",2\n', b"1, 2\n",
                 b"+1,2\n", b"1.5,2\n", b"1,2.\n", b"1,1e5\n", b"1,nan\n",
                 b"1,2\r3\n", b"1234567890123456789,2\n", b"1,.5\n",
                 b"1,1.123456789\n", b"1,-\n", b",2\n"):
      ok, _ = native_columns([text], 2, [0, 1], "if", text.count(b"\n"))
      self.assertFalse(ok, text)
    # Windows line ends are plain.
    ok, (a, b) = native_columns([b"1,2\r\n", b"-3,4.25\n"], 2, [0, 1], "if", 2)
    self.assertTrue(ok)
    self.assertEqual(list(a), [1, -3])
    self.assertEqual(list(b), [2.0, 4.25])
    # A wrong row count (the caller's line count) is not accepted either.
    ok, _ = native_columns([b"1,2\n"], 2, [0, 1], "if", 2)
    self.assertFalse(ok)

  def test_rows_wider_than_the_native_parser_go_to_pyarrow(self):
    columns = [f"c{i}" for i in range(300)]
    reader = csv_dataset.ShardReader(
        columns, ["int64"] * 300, ["c0", "c299"], ",", False, "error", 1024,
        csv_dataset.RowStats())
    text = "".join(",".join(str(1000 * r + c) for c in range(300)) + "\n"
                   for r in range(3)).encode()
    cols, rows, skipped = reader.parse_blocks([("wide.csv", text, 0, 3)])
    self.assertEqual(list(cols[0]), [0, 1000, 2000])
    self.assertEqual(list(cols[1]), [299, 1299, 2299])
    self.assertEqual((rows, skipped), ([3], [0]))

  def test_mix_equals_take_then_put(self):
    rng = np.random.default_rng(2)
    dtype = [("f0", "<i8"), ("f1", "<i8"), ("f2", "<f4")]
    rows = np.zeros(50_000, dtype)
    rows["f0"] = rng.integers(0, 10**9, len(rows))
    rows["f1"] = np.arange(len(rows))
    rows["f2"] = rng.random(len(rows))
    outs = {}
    for name, native in (("native", NATIVE), ("numpy", None)):
      with mock.patch.object(csv_dataset, "_native", native):
        mixer = csv_dataset._Mixer(7_000, np.random.default_rng(3))
        sent = [o for i in range(0, len(rows), 3_000)
                for o in mixer.push(rows[i:i + 3_000])]
        outs[name] = (np.concatenate(sent), mixer.drain())
    self.assertLen(outs["native"][0], len(rows) - 7_000)
    for a, b in zip(outs["native"], outs["numpy"]):
      np.testing.assert_array_equal(a, b)

  def test_shuffle_is_numpys(self):
    # The same permutation and the same generator state after it, for the
    # mixer's int32 turns and drain's int64 permutation, across block ends.
    for dtype in (np.int32, np.int64):
      for n in (1, 2, 4096, 4097, 50_000):
        ours = np.arange(n, dtype=dtype)
        rng, ref_rng = (np.random.default_rng([7, 0, 1 << 20]) for _ in "ab")
        with rng.bit_generator.lock:
          NATIVE.shuffle(ours, ours.itemsize, rng.bit_generator.capsule)
        theirs = np.arange(n, dtype=dtype)
        ref_rng.shuffle(theirs)
        np.testing.assert_array_equal(ours, theirs)
        self.assertEqual(rng.integers(0, 2**62), ref_rng.integers(0, 2**62))
        if n > 2:
          self.assertFalse(np.array_equal(ours, np.arange(n)))

  def test_mix_checks_slots(self):
    buf = np.zeros(4, [("a", "<i8"), ("b", "<f4")])
    rows = np.zeros(2, buf.dtype)
    with self.assertRaises(IndexError):
      NATIVE.mix(buf, np.array([0, 4], np.int32), rows, np.empty_like(rows),
                 buf.dtype.itemsize, 4)


@unittest.skipIf(NATIVE is None and not os.environ.get("CI"),
                 "input._fastcsv was not built (no C compiler at install)")
class NativePipelineTest(tf.test.TestCase):
  """Whole pipelines with and without the native loops: the same batches."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(4)
    self.files = []
    for s in range(3):
      n = 20_000
      lines = [f"{u},{i},{r:.1f},{t}\n" for u, i, r, t in zip(
          rng.integers(0, 5_000, n), rng.integers(0, 800, n),
          rng.integers(1, 11, n) / 2, rng.integers(10**9, 2 * 10**9, n))]
      if s == 1:  # Malformed rows and an empty line in a later block.
        lines[12_345] = "12,x,3.0,5\n"
        lines[15_000] = "\n"
        lines[17_000] = "1,2,3\n"
      path = os.path.join(self.get_temp_dir(), f"part-{s}.csv.gz")
      with open(path, "wb") as f:
        f.write(gzip.compress("".join(lines).encode()))
      self.files.append(path)

  def batches(self, native, **fields):
    data = config_lib.DataConfig(
        train_files=tuple(self.files), label_mode="threshold",
        label_threshold=3.5, block_bytes=4096, shuffle_buffer_rows=9_000,
        files_in_flight=2, bad_rows="skip", **fields)
    stats = csv_dataset.RowStats()
    with mock.patch.object(csv_dataset, "_native", native):
      ds = csv_dataset.make_dataset(data, self.files, 1000, training=True,
                                    seed=5, epochs=2, stats=stats)
      feats, labels = [], []
      for f, l in ds:
        feats.append(np.stack([f["user_id"].numpy(), f["item_id"].numpy()]))
        labels.append(l.numpy())
    return np.concatenate(feats, 1), np.concatenate(labels), stats

  def test_same_batches_rows_and_skips(self):
    for fields in ({}, {"num_negatives": 3}):
      a_feats, a_labels, a_stats = self.batches(NATIVE, **fields)
      b_feats, b_labels, b_stats = self.batches(None, **fields)
      np.testing.assert_array_equal(a_feats, b_feats)
      np.testing.assert_array_equal(a_labels, b_labels)
      self.assertEqual(a_stats.rows, 3 * 20_000 - 3)
      self.assertEqual(a_stats.skipped, 2)
      self.assertEqual((a_stats.rows, a_stats.skipped),
                       (b_stats.rows, b_stats.skipped))
      group = 1 + fields.get("num_negatives", 0)
      self.assertLen(a_labels, 2 * (3 * 20_000 - 3) * group)


if __name__ == "__main__":
  tf.test.main()
