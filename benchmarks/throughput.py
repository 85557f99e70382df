r"""Input and training throughput, side by side in one run, against the tutorial way.

  python -m benchmarks.throughput [--rows=20000000] [--out=work/throughput] \
      [--baseline_checkout=../old] [--repeats=2] \
      [--trainer_flags=--intra_op_threads=1]

Generates an ML-20M-shaped log (8 gz shards; 138,493 users, 26,744 Zipf-popular
items; `user_id,item_id,label,timestamp`) if absent, plus a 2M-row copy for the
memory check. Peers in the same run: `implicit`'s BPR and ALS (the `bench`
extra) on the same log, and a memory-bandwidth probe. Each measurement runs in its own process, so its peak RSS is its
own. Prints a table with ratios and writes OUT/throughput.json.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from typing import Tuple

from absl import app, flags, logging
import numpy as np

NUM_USERS, NUM_ITEMS, NUM_SHARDS = 138_493, 26_744, 8
TABLE_ROWS, DIM = 200_000, 32

_ROWS = flags.DEFINE_integer("rows", 20_000_000, "Rows of the large log.")
_SMALL_ROWS = flags.DEFINE_integer("small_rows", 2_000_000,
                                   "Rows of the log for the memory check.")
_OUT = flags.DEFINE_string("out", "work/throughput", "Data and results folder.")
_TUTORIAL_ROWS = flags.DEFINE_integer(
    "tutorial_rows", 1_000_000, "Rows the (slow) tutorial pipeline reads.")
_TUTORIAL_EXAMPLES = flags.DEFINE_integer(
    "tutorial_examples", 1_000_000, "Examples the Keras-Adam configs train on.")
_BASELINE = flags.DEFINE_string(
    "baseline_checkout", None,
    "Another checkout of this project (e.g. `git worktree add ../old REV`): "
    "its input pipeline and trainer.task are measured in the same run, right "
    "after ours, and the ratios reported.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 2,
    "zcat, the input pipelines and the end-to-end runs of ours and the "
    "baseline are measured this many times, alternately; the best of each "
    "is reported (the machine is shared and noisy), with every value.")
_TRAINER_FLAGS = flags.DEFINE_list(
    "trainer_flags", [], "Extra flags of our trainer.task end-to-end runs "
    "(not the baseline's), e.g. --trainer_flags=--intra_op_threads=2.")
_MEASURE = flags.DEFINE_string("measure", None, "Internal: one measurement.")
_DATA = flags.DEFINE_string("data", None, "Internal: shard folder.")
_ARG = flags.DEFINE_string("arg", "", "Internal: measurement argument.")


# ---------------------------------------------------------------- the data.

def _write_shard(args):
  path, rows, seed = args
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.csv as pcsv  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  cdf = np.cumsum(1.0 / np.arange(1, NUM_ITEMS + 1))
  item_of_rank = np.random.default_rng(0).permutation(NUM_ITEMS)
  items = item_of_rank[np.searchsorted(cdf, rng.random(rows) * cdf[-1])]
  table = pa.table({
      "user_id": rng.integers(0, NUM_USERS, rows),
      "item_id": items,
      "label": rng.integers(0, 2, rows),
      "timestamp": 1_000_000_000 + rng.integers(0, 10**8, rows)})
  with pa.CompressedOutputStream(path + ".tmp", "gzip") as out:
    pcsv.write_csv(table, out, pcsv.WriteOptions(include_header=False))
  os.replace(path + ".tmp", path)


def ensure_log(folder: str, rows: int) -> str:
  """Writes the log once; later runs reuse it."""
  paths = [os.path.join(folder, f"train-{i:05d}-of-{NUM_SHARDS:05d}.csv.gz")
           for i in range(NUM_SHARDS)]
  todo = [(p, rows // NUM_SHARDS, i) for i, p in enumerate(paths)
          if not os.path.exists(p)]
  if todo:
    os.makedirs(folder, exist_ok=True)
    logging.info("Writing %d rows in %d shards to %s ...", rows, NUM_SHARDS,
                 folder)
    with futures.ProcessPoolExecutor(2) as pool:
      list(pool.map(_write_shard, todo))
  return folder


def _files(folder):
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.endswith(".csv.gz"))


# ------------------------------------------- measurements (child processes).

def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tutorial_lines(files, batch):
  """The tutorial pipeline: TextLineDataset -> batch -> decode_csv."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  defaults = [tf.constant(0, tf.int64)] * 2 + [tf.constant(0.0)] + [
      tf.constant(0, tf.int64)]
  ds = tf.data.Dataset.from_tensor_slices(files).interleave(
      lambda f: tf.data.TextLineDataset(f, compression_type="GZIP"),
      cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE)

  def decode(lines):
    u, i, label, _ = tf.io.decode_csv(lines, defaults)
    return {"user_id": u, "item_id": i}, label
  return ds.batch(batch).map(decode, num_parallel_calls=tf.data.AUTOTUNE)


def _our_dataset(files, batch, epochs=1):
  from input import csv_dataset  # pylint: disable=g-import-not-at-top
  from trainer import config as config_lib  # pylint: disable=g-import-not-at-top
  data = config_lib.DataConfig(train_files=tuple(files))
  return csv_dataset.make_dataset(data, files, batch, training=True, seed=0,
                                  epochs=epochs)


def _tutorial_model(optimizer):
  """What the tutorials write: two Keras Embedding tables and a dot product."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras  # pylint: disable=g-import-not-at-top

  class TutorialMF(tf_keras.Model):

    def __init__(self):
      super().__init__()
      self.users = tf_keras.layers.Embedding(TABLE_ROWS, DIM)
      self.items = tf_keras.layers.Embedding(TABLE_ROWS, DIM)

    def call(self, f):
      u = self.users(f["user_id"] % TABLE_ROWS)
      v = self.items(f["item_id"] % TABLE_ROWS)
      return tf.reduce_sum(u * v, axis=1)

  model = TutorialMF()
  model.compile(optimizer=optimizer,
                loss=tf_keras.losses.BinaryCrossentropy(from_logits=True))
  return model


def _our_model(optimizer, steps_per_execution=16):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top,unused-import
  from trainer import config as config_lib  # pylint: disable=g-import-not-at-top
  from trainer import embedding  # pylint: disable=g-import-not-at-top
  from trainer.models import mf as model_lib  # pylint: disable=g-import-not-at-top
  tables = tuple(config_lib.TableConfig(f, num_bins=TABLE_ROWS, salt=i + 1,
                                        optimizer=optimizer)
                 for i, f in enumerate(("user_id", "item_id")))
  from trainer import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.validate(config_lib.Config(
      data=config_lib.DataConfig(train_files=("x",)),
      model=config_lib.ModelConfig(embedding_dim=DIM, tables=tables),
      runtime=config_lib.RuntimeConfig(model_dir="unused")))
  strategy_lib.set_threads(config.runtime)  # The trainer's thread pools.
  model = model_lib.MatrixFactorization(config)
  model.compile(optimizer=embedding.make_optimizer("adagrad", 0.05),
                steps_per_execution=steps_per_execution)
  return model


def _in_memory(batch):
  """Pre-made batches, cached and repeated: training cost alone."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  k = 16
  users = rng.integers(0, NUM_USERS, (k, batch))
  items = rng.integers(0, NUM_ITEMS, (k, batch))
  labels = rng.integers(0, 2, (k, batch)).astype(np.float32)
  ds = tf.data.Dataset.from_tensor_slices(
      ({"user_id": users, "item_id": items}, labels)).cache().repeat()
  return ds


def _timed_fit(model, ds, steps, warmup):
  model.fit(ds, steps_per_epoch=warmup, verbose=0)  # Traces the step.
  t0 = time.time()
  model.fit(ds, steps_per_epoch=steps, verbose=0)
  return time.time() - t0


def _rows_in_graph(ds) -> Tuple[int, float]:
  """Reads a (features, labels) dataset to its end inside a tf.function, as
  Keras' fit does; returns its rows and the seconds it took (not counting
  the function's tracing)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.function
  def count(ds):
    return ds.reduce(tf.constant(0, tf.int64), lambda n, batch: n + tf.shape(
        batch[1], out_type=tf.int64)[0])
  run = count.get_concrete_function(ds)
  t0 = time.time()
  n = int(run(ds))
  return n, time.time() - t0


def _rows_in_python(ds) -> Tuple[int, float]:
  """Reads a dataset batch by batch in a Python loop (~0.1 ms per batch)."""
  n, t0 = 0, time.time()
  for _, label in ds:
    n += int(label.shape[0])
  return n, time.time() - t0


def measure(name: str, folder: str, arg: str) -> dict:
  """Runs one measurement in this process; returns its figures."""
  files = _files(folder)
  import tf_keras  # pylint: disable=g-import-not-at-top
  if name == "input_tutorial":
    n, seconds = _rows_in_graph(_tutorial_lines(files, 16).take(int(arg) // 16))
    return {"rows_per_s": n / seconds, "rows": n}
  if name == "input_ours":
    # As the trainer reads it (in the training function), then through a
    # Python loop, which adds its own cost per batch.
    n, seconds = _rows_in_graph(_our_dataset(files, 4096))
    loop_rows, loop_seconds = _rows_in_python(_our_dataset(files, 4096))
    return {"rows_per_s": n / seconds, "rows": n,
            "python_loop_rows_per_s": loop_rows / loop_seconds}
  if name.startswith("memory-"):
    _, kind, opt, batch = name.split("-")
    batch = int(batch)
    if kind == "tutorial":
      model, warmup = _tutorial_model(tf_keras.optimizers.Adam(0.001)), 5
    else:
      model, warmup = _our_model(opt), 32
    steps = max(32, int(arg) // batch // 16 * 16)
    seconds = _timed_fit(model, _in_memory(batch), steps, warmup)
    return {"ex_per_s": steps * batch / seconds,
            "ms_per_step": 1000 * seconds / steps, "batch": batch}
  if name in ("peer_bpr", "peer_als"):
    return _implicit_peer(files, name[len("peer_"):])
  if name == "bandwidth":
    return _bandwidth()
  if name == "e2e_tutorial":
    model = _tutorial_model(tf_keras.optimizers.Adam(0.001))
    steps = max(8, int(arg) // 4096)
    ds = _tutorial_lines(files, 4096).repeat()
    seconds = _timed_fit(model, ds, steps, 3)
    return {"ex_per_s": steps * 4096 / seconds}
  raise ValueError(name)


def _implicit_peer(files, algorithm: str) -> dict:
  """One epoch of `implicit`'s BPR or ALS (Cython, 2 threads, 32 factors) on
  the log's (user, item) pairs: what a user who only wants MF on a CPU would
  run. BPR draws one (user, positive, negative) sample per interaction."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.csv as pcsv  # pylint: disable=g-import-not-at-top
  import scipy.sparse  # pylint: disable=g-import-not-at-top
  from implicit.cpu import als, bpr  # pylint: disable=g-import-not-at-top
  table = pa.concat_tables([pcsv.read_csv(f, read_options=pcsv.ReadOptions(
      column_names=["user_id", "item_id", "label", "timestamp"]),
      convert_options=pcsv.ConvertOptions(
          include_columns=["user_id", "item_id"])) for f in files])
  users = table.column("user_id").to_numpy()
  items = table.column("item_id").to_numpy()
  matrix = scipy.sparse.csr_matrix(
      (np.ones(len(users), np.float32), (users, items)),
      shape=(NUM_USERS, NUM_ITEMS))
  matrix.sum_duplicates()
  cls = (bpr.BayesianPersonalizedRanking if algorithm == "bpr"
         else als.AlternatingLeastSquares)
  model = cls(factors=32, iterations=1, num_threads=2, random_state=0)
  t0 = time.time()
  model.fit(matrix, show_progress=False)
  seconds = time.time() - t0
  return {"samples_per_s": matrix.nnz / seconds, "nnz": int(matrix.nnz),
          "seconds": seconds}


def _bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
  """Memory bandwidth: copies of a 1 GiB array (bytes read + written / s)."""
  src = np.ones(int(gib * 2**30) // 8, np.float64)
  dst = np.empty_like(src)
  np.copyto(dst, src)  # Touch every page first.
  t0 = time.time()
  for _ in range(repeats):
    np.copyto(dst, src)
  return {"bytes_per_s": 2 * src.nbytes * repeats / (time.time() - t0)}


# Memory traffic of one example of an Adagrad step, both tables (rows of
# DIM + 1 floats): row read by the lookup, gradient written and read back,
# accumulator read and written, table row read and written: 7 accesses.
BYTES_PER_EXAMPLE = 2 * (DIM + 1) * 4 * 7


def _child(name, folder, arg="", cwd=None):
  """Runs `measure` in a fresh process; adds its peak RSS.

  With `cwd` (another checkout), this file's `measure` runs on that
  checkout's packages (input, trainer): the same harness for both.
  """
  argv = [__file__, f"--measure={name}", f"--data={folder}", f"--arg={arg}"]
  if cwd:
    cmd = [sys.executable, "-c", f"import runpy, sys; sys.argv = {argv!r}; "
           f"sys.path.insert(0, {os.path.abspath(cwd)!r}); "
           f"runpy.run_path({os.path.abspath(__file__)!r}, "
           "run_name='__main__')"]
  else:
    cmd = [sys.executable, "-m", "benchmarks.throughput", *argv[1:]]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
  if out.returncode:
    raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _trainer_e2e(folder, work, cwd=None, flags=()):
  """`python -m trainer.task` (of the checkout at cwd) on the shards, one epoch,
  batch 4096, Adagrad, with `flags` added."""
  model_dir = tempfile.mkdtemp(dir=os.path.abspath(work))
  cmd = [sys.executable, "-m", "trainer.task", f"--train_files={folder}/*.gz",
         f"--model_dir={model_dir}", f"--num_bins={TABLE_ROWS}",
         f"--embedding_dim={DIM}", "--batch_size=4096", "--epochs=1",
         "--embedding_optimizer=adagrad", "--log_every_steps=1000",
         "--checkpoint_every_steps=1000000000", *flags]
  t0 = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=cwd,
                          stderr=subprocess.PIPE, text=True)
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.time() - t0
  stderr = proc.stderr.read()
  if os.waitstatus_to_exitcode(status):
    raise RuntimeError(f"trainer failed:\n{stderr[-3000:]}")
  with open(os.path.join(model_dir, "metrics.json")) as f:
    metrics = json.load(f)
  return {"ex_per_s": metrics["train_examples_per_sec"],
          "wall_s": wall, "train_s": metrics["train_seconds"],
          "peak_rss_bytes": usage.ru_maxrss * 1024}


def _zcat(files, processes):
  halves = [files[i::processes] for i in range(processes)]
  t0 = time.time()
  procs = [subprocess.Popen(f"zcat {' '.join(h)} | wc -l", shell=True,
                            stdout=subprocess.PIPE, text=True) for h in halves]
  rows = sum(int(p.communicate()[0]) for p in procs)
  return {"rows_per_s": rows / (time.time() - t0), "rows": rows}


# ------------------------------------------------------------------ report.

def run(rows, small_rows, out, tutorial_rows, tutorial_examples,
        baseline=None) -> dict:
  """All measurements, one after another, on an otherwise idle machine."""
  big = ensure_log(os.path.join(out, f"rows{rows}"), rows)
  small = ensure_log(os.path.join(out, f"rows{small_rows}"), small_rows)
  files = _files(big)
  r = {}
  repeats = max(1, _REPEATS.value)
  # Rates that are compared with each other are measured alternately.
  for i in range(repeats):
    logging.info("zcat, input pipelines (%d of %d) ...", i + 1, repeats)
    _best(r, "zcat_1", _zcat(files, 1), "rows_per_s")
    _best(r, "zcat_2", _zcat(files, 2), "rows_per_s")
    _best(r, "input_ours", _child("input_ours", big, ""), "rows_per_s")
    if baseline:
      _best(r, "input_baseline", _child("input_ours", big, "", cwd=baseline),
            "rows_per_s")
  logging.info("input_tutorial ...")
  r["input_tutorial"] = _child("input_tutorial", big, tutorial_rows)
  # (kind, optimizer, batch, examples): the tutorial's Keras Adam is slow,
  # so it trains on fewer examples; rates do not depend on the count.
  for kind, opt, batch, examples in (
      ("tutorial", "adam", 16, tutorial_examples // 250),
      ("tutorial", "adam", 4096, tutorial_examples),
      ("ours", "adagrad", 4096, 8_000_000), ("ours", "sgd", 4096, 8_000_000),
      ("ours", "lazy_adam", 4096, 8_000_000),
      ("ours", "adagrad", 256, 2_000_000),
      ("ours", "adagrad", 16384, 8_000_000)):
    name = f"memory-{kind}-{opt}-{batch}"
    logging.info("%s ...", name)
    r[name] = _child(name, big, examples)
  logging.info("e2e_tutorial ...")
  r["e2e_tutorial"] = _child("e2e_tutorial", big, tutorial_examples)
  for name in ("peer_bpr", "peer_als", "bandwidth"):
    logging.info("%s ...", name)
    r[name] = _child(name, big)
  for i in range(repeats):
    logging.info("trainer end to end on %d rows (%d of %d) ...", rows, i + 1,
                 repeats)
    _best(r, "e2e_ours", _trainer_e2e(big, out, flags=_TRAINER_FLAGS.value),
          "ex_per_s")
    if baseline:
      logging.info("trainer of %s end to end on %d rows ...", baseline, rows)
      _best(r, "e2e_baseline", _trainer_e2e(big, out, cwd=baseline),
            "ex_per_s")
  logging.info("trainer end to end on %d rows ...", small_rows)
  r["e2e_ours_small"] = _trainer_e2e(small, out, flags=_TRAINER_FLAGS.value)
  return r


def _best(r: dict, key: str, result: dict, rate: str) -> None:
  """Keeps in r[key] the measurement with the highest `rate`, and every rate
  (an input pipeline's Python-loop rate: its best and every value, too)."""
  seen = r.get(key, {}).get("all", []) + [result[rate]]
  loops = r.get(key, {}).get("loop_all", []) + (
      [result["python_loop_rows_per_s"]] if "python_loop_rows_per_s" in result
      else [])
  if key not in r or result[rate] > r[key][rate]:
    r[key] = dict(result)
  r[key]["all"] = seen
  if loops:
    r[key]["loop_all"] = loops
    r[key]["python_loop_rows_per_s"] = max(loops)


def report(r, rows, small_rows) -> dict:
  """Prints the table and returns throughput.json's content."""
  z2 = r["zcat_2"]["rows_per_s"]
  tut = r["e2e_tutorial"]["ex_per_s"]
  e2e = r["e2e_ours"]["ex_per_s"]
  mem_ratio = (r["e2e_ours"]["peak_rss_bytes"] /
               r["e2e_ours_small"]["peak_rss_bytes"])
  lines = [f"{'measurement':<44} {'rate':>14} {'ratio':>22} {'peak RSS':>10}"]

  def row(label, value, unit, ratio="", rss=None, all_values=None):
    rss_text = f"{rss / 2**20:.0f} MiB" if rss else ""
    rate = f"{value / 1e6:.3f}M" if value >= 1e5 else f"{value:,.0f}"
    lines.append(f"{label:<44} {rate:>9} {unit:<5} {ratio:>22} "
                 f"{rss_text:>10}")
    if all_values and len(all_values) > 1:
      lines.append(f"{'':<44} (best of " + ", ".join(
          f"{v / 1e6:.3f}M" for v in all_values) + ")")

  row("zcat, 1 process", r["zcat_1"]["rows_per_s"], "rows",
      all_values=r["zcat_1"].get("all"))
  row("zcat, 2 processes", z2, "rows", all_values=r["zcat_2"].get("all"))
  for key, label in (("input_tutorial", "tutorial pipeline (batch 16)"),
                     ("input_ours", "our input pipeline (batch 4096)")):
    row(label, r[key]["rows_per_s"], "rows",
        f"{r[key]['rows_per_s'] / z2:.2f}x zcat-2", r[key]["peak_rss_bytes"],
        r[key].get("all"))
  loop = r["input_ours"]["python_loop_rows_per_s"]
  row("  the same, read by a Python loop", loop, "rows",
      f"{loop / z2:.2f}x zcat-2", all_values=r["input_ours"].get("loop_all"))
  for key in [k for k in r if k.startswith("memory-")]:
    _, kind, opt, batch = key.split("-")
    who = "tutorial Keras" if kind == "tutorial" else "trainer"
    row(f"in memory, {who} {opt}, batch {batch}", r[key]["ex_per_s"], "ex",
        f"{r[key]['ms_per_step']:.2f} ms/step", r[key]["peak_rss_bytes"])
  row("end to end, tutorial (Keras Adam, b4096)", tut, "ex", "1.00x",
      r["e2e_tutorial"]["peak_rss_bytes"])
  row(f"end to end, trainer.task ({rows:,} rows)", e2e, "ex",
      f"{e2e / tut:.1f}x tutorial", r["e2e_ours"]["peak_rss_bytes"],
      r["e2e_ours"].get("all"))
  row(f"end to end, trainer.task ({small_rows:,} rows)",
      r["e2e_ours_small"]["ex_per_s"], "ex", "",
      r["e2e_ours_small"]["peak_rss_bytes"])
  if "e2e_baseline" in r:
    base_in = r["input_baseline"]["rows_per_s"]
    base_e2e = r["e2e_baseline"]["ex_per_s"]
    row("baseline checkout: input pipeline", base_in, "rows",
        f"ours {r['input_ours']['rows_per_s'] / base_in:.2f}x",
        r["input_baseline"]["peak_rss_bytes"], r["input_baseline"].get("all"))
    base_loop = r["input_baseline"]["python_loop_rows_per_s"]
    row("  the same, read by a Python loop", base_loop, "rows",
        f"ours {loop / base_loop:.2f}x",
        all_values=r["input_baseline"].get("loop_all"))
    row(f"baseline checkout: trainer.task ({rows:,} rows)", base_e2e, "ex",
        f"ours {e2e / base_e2e:.2f}x", r["e2e_baseline"]["peak_rss_bytes"],
        r["e2e_baseline"].get("all"))
    lines.append(f"{'':<44} wall: ours {r['e2e_ours']['wall_s']:.1f} s, "
                 f"baseline {r['e2e_baseline']['wall_s']:.1f} s")
  bpr_rate = r["peer_bpr"]["samples_per_s"]
  row("implicit BPR, 32 factors, 2 threads", bpr_rate, "smp",
      f"ours {e2e / bpr_rate:.2f}x", r["peer_bpr"]["peak_rss_bytes"])
  row("implicit ALS, 32 factors, 2 threads", r["peer_als"]["samples_per_s"],
      "nnz", f"ours {e2e / r['peer_als']['samples_per_s']:.2f}x",
      r["peer_als"]["peak_rss_bytes"])
  bandwidth = r["bandwidth"]["bytes_per_s"]
  lines.append(f"{'memory bandwidth (1 GiB numpy copy)':<44} "
               f"{bandwidth / 1e9:>8.1f} GB/s")
  lines.append(f"{'':<44} ours: ~{BYTES_PER_EXAMPLE} B/example x "
               f"{e2e / 1e6:.2f}M/s = {BYTES_PER_EXAMPLE * e2e / 1e9:.2f} GB/s,"
               f" {100 * BYTES_PER_EXAMPLE * e2e / bandwidth:.0f}% of it")
  lines.append("")
  lines.append(f"input / zcat-2: {r['input_ours']['rows_per_s'] / z2:.2f} "
               f"as the trainer reads it, {loop / z2:.2f} through a Python "
               "loop (bar >= 0.6)")
  lines.append(f"end to end: {e2e / 1e6:.2f}M ex/s (bar >= 1.5M), "
               f"{e2e / tut:.1f}x the Keras-Adam tutorial config (bar >= 30x); "
               f"{e2e / bpr_rate:.2f}x implicit BPR's samples/s (goal 1x)")
  lines.append(f"peak RSS {rows:,} rows / {small_rows:,} rows:"
               f" {mem_ratio:.3f} (bar <= 1.10)")
  print("\n".join(lines))
  return {
      "zcat_rows_per_s": r["zcat_1"]["rows_per_s"],
      "zcat_2proc_rows_per_s": z2,
      "input_rows_per_s": r["input_ours"]["rows_per_s"],
      "input_python_loop_rows_per_s": loop,
      "tutorial_input_rows_per_s": r["input_tutorial"]["rows_per_s"],
      "train_ex_per_s": r["memory-ours-adagrad-4096"]["ex_per_s"],
      "e2e_ex_per_s": e2e,
      "tutorial_e2e_ex_per_s": tut,
      "implicit_bpr_samples_per_s": bpr_rate,
      "implicit_als_nnz_per_s": r["peer_als"]["samples_per_s"],
      "memory_bandwidth_bytes_per_s": bandwidth,
      "bytes_per_example": BYTES_PER_EXAMPLE,
      "peak_rss_bytes": {k: v.get("peak_rss_bytes") for k, v in r.items()
                         if v.get("peak_rss_bytes")},
      "peak_rss_ratio_large_over_small": mem_ratio,
      "step_ms": {b: r[f"memory-ours-adagrad-{b}"]["ms_per_step"]
                  for b in (256, 4096, 16384)},
      "details": r,
  }


def main(argv):
  del argv
  if _MEASURE.value:
    result = measure(_MEASURE.value, _DATA.value, _ARG.value)
    result["peak_rss_bytes"] = _peak_rss()
    print(json.dumps(result))
    return
  os.makedirs(_OUT.value, exist_ok=True)
  r = run(_ROWS.value, _SMALL_ROWS.value, _OUT.value, _TUTORIAL_ROWS.value,
          _TUTORIAL_EXAMPLES.value, _BASELINE.value)
  summary = report(r, _ROWS.value, _SMALL_ROWS.value)
  path = os.path.join(_OUT.value, "throughput.json")
  with open(path, "w") as f:
    json.dump(summary, f, indent=2)
  logging.info("Wrote %s", path)


if __name__ == "__main__":
  app.run(main)
