"""train_and_evaluate(config): the whole run, from shards to metrics and exports.

Never reads flags. The training stream is endless and deterministic, and the
run takes an exact number of steps; a resumed run restores the last checkpoint
and skips the batches it already trained on, so it sees the same data in the
same order as an uninterrupted run would.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Dict

from absl import logging
import numpy as np
import tensorflow as tf
import tf_keras

from input import csv_dataset
from input import vocab as vocab_lib
from trainer import config as config_lib
from trainer import embedding
from trainer import environment
from trainer import export
from trainer import models
from trainer import run_lock
from trainer import strategy as strategy_lib
from trainer.metrics import ranking as ranking_metrics
from trainer.metrics import retrieval as retrieval_metrics
from trainer.models import features as features_lib


class _Progress(tf_keras.callbacks.Callback):
  """Progress lines, TensorBoard scalars and periodic checkpoints."""

  def __init__(self, start_step: int, total_steps: int, examples_per_step: int,
               log_every: int, checkpoint_every: int,
               manager: tf.train.CheckpointManager, model_dir: str,
               check_lease=lambda: None):
    super().__init__()
    self._check_lease = check_lease
    self._start = start_step
    self._total = total_steps
    self._batch = examples_per_step
    self.log_every = log_every
    self.checkpoint_every = checkpoint_every
    self._manager = manager
    self._writer = tf.summary.create_file_writer(
        os.path.join(model_dir, "train"))
    self._last_log = self._last_ckpt = start_step
    self.examples_per_sec = 0.0
    self.last_logs: Dict[str, float] = {}

  def on_train_begin(self, logs=None):
    self._t0 = self._t_log = time.time()

  def on_train_batch_end(self, batch, logs=None):
    step = self._start + batch + 1
    self.last_logs = {k: float(v) for k, v in (logs or {}).items()}
    if step - self._last_log >= self.log_every or step == self._total:
      now = time.time()
      rate = (step - self._last_log) * self._batch / max(now - self._t_log, 1e-9)
      eta = (self._total - step) * self._batch / max(rate, 1e-9)
      logging.info("step %d/%d (%.0f%%)  loss %.4f  %.0f examples/s  eta %.0fs",
                   step, self._total, 100.0 * step / self._total,
                   self.last_logs.get("loss", float("nan")), rate, eta)
      with self._writer.as_default(step=step):
        for k, v in self.last_logs.items():
          tf.summary.scalar(k, v)
        tf.summary.scalar("examples_per_sec", rate)
      self._last_log, self._t_log = step, now
    if step - self._last_ckpt >= self.checkpoint_every:
      self._check_lease()  # Never write over another run's checkpoints.
      self._manager.save(checkpoint_number=step)
      self._last_ckpt = step

  def on_train_end(self, logs=None):
    steps = self._total - self._start
    self.examples_per_sec = steps * self._batch / max(time.time() - self._t0,
                                                      1e-9)
    self._writer.flush()


def _check_same_run(model_dir: str, config) -> None:
  """Refuses to resume a model_dir written by a different model or data."""
  previous = config_lib.load(os.path.join(model_dir, "config.json"))
  if previous is None:
    return
  for section in ("data", "model"):
    old, new = getattr(previous, section), getattr(config, section)
    if old != new:
      diff = [f"{k}: {v!r} -> {getattr(new, k)!r}"
              for k, v in vars(old).items() if getattr(new, k) != v]
      raise ValueError(
          f"{model_dir} holds a run with other {section} settings "
          f"({'; '.join(diff)}). Use a new --model_dir, or the same flags.")


def _scan_training_files(config, files, model_dir: str, stats):
  """Rows and order of each training file, in one pass cached in model_dir.

  The pass also stops a run on bad data before training and warns when a
  file is sorted (by user or time) beyond what the mixing buffer can mix.
  With --id_mode=vocab and no vocabulary given, the same pass counts the IDs
  and writes the vocabularies (min_count) to model_dir/vocab/, which a
  resumed run reuses.

  Returns:
    ({path: FileScan}, the config, pointing at the vocabularies built here).
  """
  model = config.model
  missing = [t.feature for t in model.tables
             if model.id_mode == "vocab" and not t.vocab_file]
  vocab_dir = os.path.join(model_dir, "vocab")
  cache = os.path.join(model_dir, "data_stats.json")
  sizes = {f: tf.io.gfile.stat(f).length for f in files}
  scans = None
  if tf.io.gfile.exists(cache) and (
      not missing or tf.io.gfile.exists(os.path.join(vocab_dir, "vocab.json"))):
    with tf.io.gfile.GFile(cache) as f:
      cached = json.load(f)
    if cached.get("sizes") == sizes and "scans" in cached:
      scans = {k: csv_dataset.FileScan(**v) for k, v in cached["scans"].items()}
  numeric = []
  if model.kind == "two_tower":
    numeric = features_lib.unscaled_row_numerics(features_lib.parse(
        config.retrieval.features, *config.data.id_columns))
  if scans is not None and numeric and "moments" not in cached:
    scans = None
  if scans is None:
    t0 = time.time()
    counts = vocab_lib.IdCounts(missing) if missing else None
    moments = features_lib.Moments(numeric) if numeric else None
    observers = [o.add for o in (counts, moments) if o is not None]
    scans = csv_dataset.scan_files(
        config.data, files, stats,
        observe=(lambda block: [o(block) for o in observers])
        if observers else None)
    cached = {"moments": moments.result() if moments else {}}
    logging.info("Counted %d rows in %d files (%.1fs).",
                 sum(s.rows for s in scans.values()), len(files),
                 time.time() - t0)
    if counts:
      summary = vocab_lib.write(counts, vocab_dir, min_count=model.min_count)
      for column, entry in summary.items():
        if not entry["size"]:
          raise ValueError(
              f"--min_count={model.min_count} keeps none of the "
              f"{entry['distinct']} {column} IDs; lower it.")
      logging.info("Built vocabularies in the counting pass (min_count %d): "
                   "%s.", model.min_count, vocab_dir)
    with tf.io.gfile.GFile(cache, "w") as f:
      json.dump({"sizes": sizes, "scans": {k: dataclasses.asdict(v)
                                           for k, v in scans.items()},
                 "moments": cached["moments"]}, f)
  elif missing:
    logging.info("Reusing the vocabularies this run built: %s.", vocab_dir)
  for message in csv_dataset.order_warnings(config.data, scans):
    logging.warning("%s", message)
  if numeric:
    # Numeric row features are standardised with the whole log's moments;
    # they go into the config (and config.json), so exports carry them.
    moments = {c: tuple(v) for c, v in cached["moments"].items()}
    logging.info("Numeric features standardised with (mean, std): %s.",
                 moments)
    config = config_lib.replace(config, retrieval={
        "features": features_lib.with_moments(config.retrieval.features,
                                              moments)})
  if missing:
    tables = tuple(
        dataclasses.replace(t, vocab_file=os.path.join(vocab_dir,
                                                       f"{t.feature}.txt"))
        if t.feature in missing else t for t in model.tables)
    config = config_lib.replace(config, model={"tables": tables})
  return scans, config


def _with_feature_columns(config):
  """Adds the row columns a two-tower model's features read to the input's."""
  if config.model.kind != "two_tower":
    return config
  spec = features_lib.parse(config.retrieval.features,
                            *config.data.id_columns)
  columns = list(config.data.feature_columns)
  for c in spec.row_columns():
    if c not in config.data.columns:
      raise ValueError(f"Feature column {c!r} is not among --columns "
                       f"{config.data.columns}.")
    if c not in columns:
      columns.append(c)
  return config_lib.replace(config, data={"feature_columns": tuple(columns)})


def _input_error(e: tf.errors.OpError) -> Exception:
  """Turns an input error raised inside tf.data back into a plain message."""
  found = re.search(r"InputDataError: (.*)", e.message)
  if found:
    return csv_dataset.InputDataError(found.group(1).strip())
  return e


def train_and_evaluate(config) -> Dict[str, Any]:
  """Trains, evaluates and exports as `config` says.

  Args:
    config: A validated Config.

  Returns:
    The summary also written to model_dir/metrics.json.

  Raises:
    FileNotFoundError: If a file pattern matches nothing.
    InputDataError: For a malformed row or a truncated shard (names the file).
  """
  config = _with_feature_columns(config_lib.validate(config))
  runtime = config.runtime
  # The strategy comes first: it sets up devices and collectives.
  strategy = strategy_lib.make_strategy(runtime)
  model_dir = runtime.model_dir
  # Every worker writes (checkpoints need all of them); only the chief's
  # files land in model_dir.
  write_dir = strategy_lib.worker_dir(strategy, model_dir)
  export_dir = runtime.export_dir
  if export_dir and write_dir != model_dir:
    export_dir = os.path.join(write_dir, "export")
  tf.io.gfile.makedirs(write_dir)
  # One writer per model_dir: the chief holds a lease for the whole run.
  lease = (run_lock.RunLock(model_dir, runtime.lock_timeout_secs)
           if write_dir == model_dir else contextlib.nullcontext())
  with lease:
    check = getattr(lease, "check", lambda: None)
    return _train_and_evaluate(config, strategy, write_dir, export_dir, check)


def _train_and_evaluate(config, strategy, write_dir: str, export_dir: str,
                        check_lease) -> Dict[str, Any]:
  """The run itself, on this worker, once the model_dir is held.

  `check_lease()` raises if the run lost its model_dir to another run; it is
  called before every checkpoint and before the exports.
  """
  data, train, runtime = config.data, config.train, config.runtime
  on_tpu = strategy_lib.is_tpu(strategy)
  model_dir = runtime.model_dir
  train_files = csv_dataset.resolve_files(data.train_files)
  eval_files = (csv_dataset.resolve_files(data.eval_files)
                if data.eval_files else [])
  logging.info("Training files: %d (%s%s).", len(train_files),
               train_files[0], ", ..." if len(train_files) > 1 else "")
  if eval_files:
    logging.info("Evaluation files: %d.", len(eval_files))

  train_stats, eval_stats = csv_dataset.RowStats(), csv_dataset.RowStats()
  scans, config = _scan_training_files(config, train_files, write_dir,
                                       train_stats)
  _check_same_run(model_dir, config)
  with tf.io.gfile.GFile(os.path.join(write_dir, "config.json"), "w") as f:
    f.write(config.to_json())
  replicas = strategy.num_replicas_in_sync
  layout = csv_dataset.batch_layout(data, train.batch_size // replicas)
  # A step takes one batch per replica; an epoch is a pass over the rows.
  rows_per_step = layout.rows * replicas
  examples_per_step = layout.examples * replicas
  rows = sum(s.rows for s in scans.values())
  if train.train_steps:
    total_steps = train.train_steps
  else:
    total_steps = train.epochs * max(1, math.ceil(rows / rows_per_step))
  logging.info("%d training rows; each step takes %d of them%s (%.2f epochs).",
               rows, rows_per_step,
               f" with {data.num_negatives} negatives each, {examples_per_step}"
               " examples" if data.num_negatives else "",
               total_steps * rows_per_step / max(rows, 1))

  with strategy.scope():
    model = models.build_model(config, on_tpu=on_tpu, total_steps=total_steps)
    model.compile(optimizer=embedding.make_optimizer(
        train.optimizer, train.learning_rate, schedule=train.lr_schedule,
        total_steps=total_steps),
                  steps_per_execution=train.steps_per_execution)
    # Sum, not Keras' TPU default "first": train_step returns each replica's
    # share of the loss.
    model.distribute_reduction_method = "sum"
  if strategy_lib.is_parameter_server(strategy):
    for name, table in model.embedding.tables().items():
      parts = embedding.table_parts(table)
      logging.info("%s_table: %d shards on %s.", name, len(parts), ", ".join(
          sorted(p.device.replace("/device:CPU:0", "") for p in parts)))
  checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
  manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=3)
  latest = tf.train.latest_checkpoint(model_dir)  # The chief's, for everyone.
  if latest:
    checkpoint.restore(latest)
  start_step = int(model.optimizer.iterations.numpy())
  if start_step:
    logging.info("Resumed from %s at step %d of %d.", latest, start_step,
                 total_steps)
  else:
    logging.info("Training from scratch for %d steps of %d examples.",
                 total_steps, examples_per_step)

  vocab = (config.model.table(data.item_column).vocab_file
           if config.model.id_mode == "vocab" else "")
  make_dataset = lambda ctx=None: csv_dataset.make_dataset(
      data, train_files, train.batch_size, training=True, seed=train.seed,
      repeat=True, drop_remainder=on_tpu, skip_steps=start_step,
      input_context=ctx, stats=train_stats,
      negative_catalog=data.negative_catalog or vocab)
  progress = _Progress(start_step, total_steps, examples_per_step,
                       train.log_every_steps, train.checkpoint_every_steps,
                       manager, environment.summary_dir(runtime, write_dir),
                       check_lease)
  parameter_servers = strategy_lib.is_parameter_server(strategy)
  t0 = time.time()
  try:
    if start_step < total_steps and parameter_servers:
      _fit_with_coordinator(model, strategy, make_dataset(), start_step,
                            total_steps, progress)
    elif start_step < total_steps:
      model.fit(strategy.distribute_datasets_from_function(make_dataset),
                epochs=1, steps_per_epoch=total_steps - start_step,
                callbacks=[progress], verbose=0)
    check_lease()
    manager.save(checkpoint_number=total_steps)
    if parameter_servers:
      # The tables are sharded over the parameter servers; the chief
      # evaluates and exports a whole copy of the trained model.
      model = _local_copy(config, manager.latest_checkpoint)
    summary: Dict[str, Any] = {
        "steps": total_steps, "resumed_from_step": start_step,
        "train_seconds": round(time.time() - t0, 2),
        "train_examples_per_sec": round(progress.examples_per_sec, 1),
        "train_loss": progress.last_logs.get("loss"),
        "train_rows_skipped": train_stats.skipped,
    }
    queries = None  # Retrieval: the held-out queries' embeddings.
    if eval_files and config.model.kind == "two_tower":
      summary["eval"], queries = _evaluate_retrieval(
          model, config, train_files, eval_files, eval_stats, write_dir)
    elif eval_files:
      summary["eval"] = _evaluate(model, config, eval_files,
                                  eval_stats, on_tpu,
                                  data.negative_catalog or vocab, write_dir)
      summary["eval_rows"] = eval_stats.rows
      summary["eval_rows_skipped"] = eval_stats.skipped
  except tf.errors.OpError as e:
    raise _input_error(e) from None

  skipped = {**train_stats.skipped_by_file(), **eval_stats.skipped_by_file()}
  if skipped:
    logging.warning("Skipped %d malformed rows: %s", sum(skipped.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
  if export_dir:
    if config.model.kind == "two_tower" and model._catalog is None:  # pylint: disable=protected-access
      _ensure_catalog(model, config, train_files)
    measured = {}
    summary["export_dir"] = export.export_version(
        model, data, export_dir, scann=config.retrieval.scann,
        scann_queries=queries, info=measured)
    summary.update(measured)
    if config.model.kind == "two_tower":
      summary["embeddings"] = export.export_embedding_history(
          model, config, os.path.join(export_dir, "embeddings"))
  with tf.io.gfile.GFile(os.path.join(write_dir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if runtime.mlflow_uri and write_dir == model_dir:
    from trainer import tracking  # pylint: disable=g-import-not-at-top
    artifacts = [os.path.join(write_dir, "config.json"),
                 os.path.join(write_dir, "metrics.json")]
    if summary.get("export_dir"):
      artifacts += [os.path.join(summary["export_dir"], name) for name in
                    ("item_embeddings.parquet", "user_embeddings.parquet")]
    summary["mlflow_run_id"] = tracking.log_run(config, summary, artifacts)
  if write_dir != model_dir:
    tf.io.gfile.rmtree(write_dir)  # Only the chief's outputs are kept.
  _log_summary(summary)
  return summary


def _fit_with_coordinator(model, strategy, dataset: tf.data.Dataset,
                          start_step: int, total_steps: int,
                          progress: _Progress) -> None:
  """Trains under parameter servers: the chief reads, the workers step.

  The input pipeline runs on the chief (it is Python: it cannot be shipped to
  the workers), and each global batch goes with its step to whichever worker
  is free (ClusterCoordinator.schedule). Workers apply their updates to the
  parameter servers asynchronously. The coordinator waits for the steps in
  flight before each progress line and checkpoint, so a checkpoint holds
  exactly the steps it is numbered by.
  """
  coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(
      strategy)

  @tf.function
  def step(features, labels):
    return strategy.run(lambda f, l: model.train_step((f, l))["loss"],
                        args=(features, labels))

  every = max(1, min(progress.log_every, progress.checkpoint_every))
  batches = iter(dataset)
  progress.on_train_begin()
  for done, _ in enumerate(range(start_step, total_steps), start=1):
    features, labels = next(batches)
    loss = coordinator.schedule(step, args=(features, labels))
    if done % every == 0 or start_step + done == total_steps:
      coordinator.join()
      progress.on_train_batch_end(done - 1, {"loss": float(loss.fetch())})
  coordinator.join()
  progress.on_train_end()


def _local_copy(config, checkpoint_path: str):
  """The model of `checkpoint_path`, whole, on this host (no strategy)."""
  with tf.distribute.get_strategy().scope():
    model = models.build_model(config)
    model.compile(optimizer=embedding.make_optimizer(
        config.train.optimizer, config.train.learning_rate))
  tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(
      checkpoint_path).expect_partial()
  return model


def _evaluate(model, config, files, stats, on_tpu, negative_catalog: str,
              write_dir: str) -> Dict[str, float]:
  """Evaluates on every held-out row, one step per execution.

  In implicit mode each held-out positive gets the same number of random
  negatives as in training (seeded), so AUC compares positives with them.
  """
  # The evaluation pass has an unknown length. Keras then needs one step per
  # execution and an undistributed dataset of global batches, which it splits
  # across replicas itself, the last partial batch included.
  model.compile(optimizer=model.optimizer, steps_per_execution=1)
  eval_ds = csv_dataset.make_dataset(
      config.data, files, config.train.eval_batch_size, training=False,
      seed=config.train.seed + 1, drop_remainder=on_tpu, stats=stats,
      negative_catalog=negative_catalog)
  results = model.evaluate(eval_ds, return_dict=True, verbose=0)
  return _write_eval(model, config, write_dir, results)


def _write_eval(model, config, write_dir: str, results) -> Dict[str, float]:
  writer = tf.summary.create_file_writer(os.path.join(
      environment.summary_dir(config.runtime, write_dir), "eval"))
  with writer.as_default(step=int(model.optimizer.iterations.numpy())):
    for k, v in results.items():
      tf.summary.scalar(k, v)
  writer.flush()
  return {k: round(float(v), 6) for k, v in results.items()}


def _read_rows(config, files, stats, columns):
  """Every row of `files` as {column: numpy array} (one pass, in order)."""
  data = config_lib.replace(config, data={"feature_columns": tuple(
      c for c in columns if c not in config.data.id_columns)}).data
  ds = csv_dataset.make_dataset(data, files, 1 << 16, training=False,
                                stats=stats)
  parts = [f for f, _ in ds.as_numpy_iterator()]
  return {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0)
          for c in (*data.id_columns, *data.feature_columns)}


def _evaluate_retrieval(model, config, train_files, eval_files, stats,
                        write_dir: str):
  """Full-catalog Recall@K / NDCG@K / MRR of each held-out row's item.

  Returns ({metric: value}, the query embeddings [Q, d]).

  Each held-out row is a query (its user's features and history); the
  candidates are the whole catalog minus the items its user trained on.
  """
  t0 = time.time()
  data, rc = config.data, config.retrieval
  user, item = data.id_columns
  held = _read_rows(config, eval_files, stats, data.feature_columns)
  train_rows = _read_rows(config, train_files, csv_dataset.RowStats(), ())
  _ensure_catalog(model, config, train_files, train_rows)
  catalog = model.catalog()
  n = len(held[user])
  queries = np.concatenate([
      model.query_embedding({c: tf.constant(v[i:i + 4096])
                             for c, v in held.items()}).numpy()
      for i in range(0, n, 4096)]) if n else np.zeros((0, rc.output_dim))
  # Seen items per query: the training items of the query's user.
  users, query_of = np.unique(held[user], return_inverse=True)
  pos = np.minimum(np.searchsorted(users, train_rows[user]), len(users) - 1)
  known = users[pos] == train_rows[user]
  train_user = pos[known]
  train_item = ranking_metrics.index_of(catalog, train_rows[item][known])
  by_user = np.argsort(query_of, kind="stable")
  starts = np.searchsorted(query_of[by_user], np.arange(len(users) + 1))
  counts = np.diff(starts)[train_user]
  seen_queries = by_user[np.repeat(starts[train_user], counts) +
                         _ragged_arange(counts)]
  seen_items = np.repeat(train_item, counts)
  ok = seen_items >= 0
  # Candidates are embedded chunk by chunk: memory does not grow with the
  # catalog.
  results = retrieval_metrics.streaming_metrics(
      queries, lambda a, b: model.candidate_embedding(
          tf.constant(catalog[a:b])).numpy(), len(catalog),
      ranking_metrics.index_of(catalog, held[item]), seen_queries[ok],
      seen_items[ok], ks=rc.eval_ks, chunk=rc.eval_chunk)
  logging.info("Full-catalog evaluation: %d queries x %d candidates (%.1fs).",
               n, len(catalog), time.time() - t0)
  return _write_eval(model, config, write_dir, results), queries


def _ensure_catalog(model, config, train_files, train_rows=None) -> None:
  """In hash mode without an item side file, the catalog is the training
  rows' items (one more pass over them)."""
  if config.model.id_mode == "vocab" or "item" in model.side:
    return
  if train_rows is None:
    train_rows = _read_rows(config, train_files, csv_dataset.RowStats(), ())
  model.set_catalog(np.unique(train_rows[config.data.item_column]))


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
  """[0..c0), [0..c1), ... concatenated."""
  ends = np.cumsum(counts)
  return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - counts,
                                                             counts)


def load_model(model_dir: str):
  """Rebuilds a run's model from its config.json and latest checkpoint."""
  config = config_lib.load(os.path.join(model_dir, "config.json"))
  if config is None:
    raise FileNotFoundError(f"No config.json in {model_dir}.")
  model = models.build_model(config)
  tf.train.Checkpoint(model=model).restore(
      tf.train.latest_checkpoint(model_dir)).expect_partial()
  return model


def _log_summary(summary: Dict[str, Any]) -> None:
  lines = ["Summary:"]
  for k, v in summary.items():
    if isinstance(v, dict):
      lines.append(f"  {k}:")
      lines.extend(f"    {kk:<16} {vv}" for kk, vv in v.items())
    else:
      lines.append(f"  {k:<24} {v}")
  logging.info("\n".join(lines))
