r"""Where a training step's time goes: the TensorFlow profiler's trace, summarised by op.

  python -m benchmarks.step_profile [--batch=4096] [--steps=300] \
      [--table_rows=200000] [--dim=32] [--optimizer=adagrad] \
      [--intra_op_threads=-1] [--inter_op_threads=0]

Trains the real MatrixFactorization (two tables of --table_rows x dim+1,
per-table optimizers, Keras fit with steps_per_execution 16) on in-memory
batches, so the input pipeline is out of the picture; traces --steps steps
and sums the executor's op time per op type, grouped: embedding gathers, the
score and loss, gradients of the lookups (slices, sums), de-duplication of
sparse gradients (Unique, segment sums), the optimizers' scatters and
updates, and the rest. Prints ms per step by group and by op type, and the
step's wall time without the profiler.
"""

import collections
import glob
import json
import os
import tempfile
import time

from absl import app, flags
import numpy as np

_BATCH = flags.DEFINE_integer("batch", 4096, "Examples per step.")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps traced.")
_ROWS = flags.DEFINE_integer("table_rows", 200_000, "Rows per table.")
_DIM = flags.DEFINE_integer("dim", 32, "Factors per row (plus a bias).")
_OPTIMIZER = flags.DEFINE_string("optimizer", "adagrad", "Tables' optimizer.")
_INTRA = flags.DEFINE_integer(
    "intra_op_threads", -1, "Threads per op (0: TensorFlow's choice; -1: the "
    "trainer's default for MF, 1).")
_INTER = flags.DEFINE_integer("inter_op_threads", 0,
                              "Ops at once (0: TensorFlow's choice).")

GROUPS = {
    "lookup (gathers)": ("ResourceGather", "GatherV2", "RowGather"),
    "de-duplication (Unique, segment sums)": ("Unique", "UnsortedSegmentSum",
                                              "DynamicStitch"),
    "optimizer scatters and updates": (
        "RowSparseAdagrad", "RowSparseSgd", "RowSparseLazyAdam",
        "ResourceScatterAdd", "ResourceScatterSub", "ResourceScatterUpdate",
        "ResourceSparseApplyAdagradV2", "ResourceSparseApplyAdagrad", "Rsqrt",
        "Sqrt", "AssignAddVariableOp", "AssignSubVariableOp"),
    "slices and their gradients": ("StridedSlice", "StridedSliceGrad"),
    "hashing of IDs": ("RightShift", "BitwiseXor", "Bitcast", "FloorMod"),
}


def _group(op_type: str) -> str:
  for name, types in GROUPS.items():
    if op_type in types:
      return name
  return "score, loss, gradient arithmetic and the rest"


def _wall_ms_per_step(model, data, steps: int) -> float:
  """Wall time per step between the first and the last call of the training
  function, so that fit's own start (its data handler, callbacks, a garbage
  collection: 0.1-0.3 s) is not spread over the steps."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  ends = []
  callback = tf_keras.callbacks.LambdaCallback(
      on_train_batch_end=lambda batch, logs: ends.append((batch, time.time())))
  model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0,
            callbacks=[callback])
  (first, t0), (last, t1) = ends[0], ends[-1]
  return (t1 - t0) / (last - first) * 1e3


def main(argv):
  del argv
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  from trainer import config as config_lib  # pylint: disable=g-import-not-at-top
  from trainer import embedding  # pylint: disable=g-import-not-at-top
  from trainer import models  # pylint: disable=g-import-not-at-top
  from trainer import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  batch, steps = _BATCH.value, _STEPS.value
  tables = tuple(config_lib.TableConfig(f, num_bins=_ROWS.value, salt=i + 1,
                                        optimizer=_OPTIMIZER.value)
                 for i, f in enumerate(("user_id", "item_id")))
  config = config_lib.validate(config_lib.Config(
      data=config_lib.DataConfig(train_files=("x",)),
      model=config_lib.ModelConfig(embedding_dim=_DIM.value, tables=tables),
      runtime=config_lib.RuntimeConfig(model_dir="unused",
                                       intra_op_threads=_INTRA.value,
                                       inter_op_threads=_INTER.value)))
  strategy_lib.set_threads(config.runtime)
  model = models.build_model(config)
  model.compile(optimizer=embedding.make_optimizer("adagrad", 0.05),
                steps_per_execution=16)
  model.distribute_reduction_method = "sum"
  rng = np.random.default_rng(0)
  n = batch * 64
  data = tf.data.Dataset.from_tensors((
      {"user_id": rng.integers(0, 138_493, n),
       "item_id": rng.integers(0, 26_744, n)},
      (rng.random(n) < 0.5).astype(np.float32))).unbatch().batch(
          batch).cache().repeat()
  model.fit(data, steps_per_epoch=64, epochs=1, verbose=0)  # Warm up, cache.
  wall_ms = _wall_ms_per_step(model, data, max(steps, 1024))
  logdir = tempfile.mkdtemp()
  tf.profiler.experimental.start(logdir)
  model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
  tf.profiler.experimental.stop()
  space = xplane_pb2.XSpace()
  with open(sorted(glob.glob(f"{logdir}/**/*.xplane.pb",
                             recursive=True))[-1], "rb") as f:
    space.ParseFromString(f.read())
  by_type, counts = collections.Counter(), collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_Compute"):
        continue  # Executor threads: one event per op run.
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if ":" in name and "::" not in name:  # "::": executor bookkeeping.
          op_type = name.rsplit(":", 1)[1]
          by_type[op_type] += event.duration_ps / 1e9 / steps
          counts[op_type] += 1
  groups = collections.Counter()
  for op_type, ms in by_type.items():
    groups[_group(op_type)] += ms
  total = sum(by_type.values())
  print(f"Step of {batch} examples, two {_ROWS.value:,} x {_DIM.value + 1} "
        f"tables, {_OPTIMIZER.value}, intra/inter-op threads "
        f"{config.runtime.intra_op_threads or 'default'}/"
        f"{_INTER.value or 'default'}: "
        f"{wall_ms:.2f} ms wall "
        f"({batch / wall_ms / 1e3:.2f}M examples/s); op time traced "
        f"{total:.2f} ms/step (ops of the two cores overlap; the profiler "
        "slows them).")
  print("| group | ms/step | share |\n|---|---|---|")
  for name, ms in groups.most_common():
    print(f"| {name} | {ms:.3f} | {100 * ms / total:.0f}% |")
  print("\n| op type | runs/step | ms/step |\n|---|---|---|")
  for op_type, ms in by_type.most_common(15):
    print(f"| {op_type} | {counts[op_type] // steps} | {ms:.3f} |")
  print(json.dumps({"wall_ms_per_step": round(wall_ms, 3),
                    "groups": {k: round(v, 3) for k, v in groups.items()}}))


if __name__ == "__main__":
  app.run(main)
