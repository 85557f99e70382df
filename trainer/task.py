"""Entry point: `python -m trainer.task [flags]` -> one Config -> train_and_evaluate.

With no --train_files it runs the embedded demo: a synthetic log with planted
structure is written under --work_dir, then trained on, evaluated and exported.
Flags left unset keep the preset's values (see trainer/config.py).
"""

import dataclasses
import logging as py_logging
import os
import sys

from absl import app, flags, logging

from trainer import config as config_lib
from trainer import environment

_LIST = "comma-separated"

# Data.
flags.DEFINE_list("train_files", None, "Training shard patterns (local or gs://).")
flags.DEFINE_list("eval_files", None, "Held-out shard patterns.")
flags.DEFINE_list("columns", None, f"Column names in file order ({_LIST}).")
flags.DEFINE_list("column_types", None, "int64|float32|string per column.")
flags.DEFINE_bool("header", None, "Shards start with a header line.")
flags.DEFINE_string("delimiter", None, "Field separator.")
flags.DEFINE_string("user_column", None, "User ID column.")
flags.DEFINE_string("item_column", None, "Item ID column.")
flags.DEFINE_enum("label_mode", None, config_lib.LABEL_MODES,
                  "column: 0/1 label column; threshold: label_column >= "
                  "label_threshold; implicit: rows are positives (set by "
                  "--num_negatives if not given).")
flags.DEFINE_string("label_column", None, "Label (or rating) column.")
flags.DEFINE_float("label_threshold", None, "Positive if label_column >= this.")
flags.DEFINE_integer("num_negatives", None, "Random negative items per row.")
flags.DEFINE_string("negative_catalog", None, "Item-ID file negatives come from.")
flags.DEFINE_integer("shuffle_buffer_rows", None,
                     "Rows of each input pipeline's mixing buffer (training); "
                     "a log that fits is shuffled whole every epoch.")
flags.DEFINE_integer("files_in_flight", None,
                     "Files each input pipeline reads at once, block by block.")
flags.DEFINE_string("time_column", None, "Event-time column (only checked for "
                    "sorted input).")
flags.DEFINE_enum("bad_rows", None, ["error", "skip"],
                  "Malformed rows stop the run (error) or are counted and "
                  "skipped (skip).")
# Model.
flags.DEFINE_enum("id_mode", None, config_lib.ID_MODES,
                  "IDs to rows by hashing or by vocabulary lookup.")
flags.DEFINE_integer("num_bins", None, "Hash buckets per table (hash mode).")
flags.DEFINE_integer("num_hashes", None,
                     "Hash mode: rows per ID (salted hashes, summed); 2 cuts "
                     "collisions at the same memory.")
flags.DEFINE_integer("user_num_bins", None, "Overrides --num_bins for users.")
flags.DEFINE_integer("item_num_bins", None, "Overrides --num_bins for items.")
flags.DEFINE_string("user_vocab", None, "User vocabulary file (vocab mode).")
flags.DEFINE_string("item_vocab", None, "Item vocabulary file (vocab mode).")
flags.DEFINE_string("vocab_dir", None, "Folder with <column>.txt vocabularies "
                    "from `python -m input.vocab` (vocab mode; without it the "
                    "run builds them in MODEL_DIR/vocab).")
flags.DEFINE_integer("num_oov", None, "OOV rows per table (vocab mode).")
flags.DEFINE_integer("min_count", None,
                     "Vocab mode without --vocab_dir: the run builds the "
                     "vocabularies, keeping IDs seen at least this often.")
flags.DEFINE_integer("embedding_dim", None, "Latent factors (plus a bias slot).")
flags.DEFINE_enum("embedding_optimizer", None, config_lib.OPTIMIZERS,
                  "Optimizer of every table.")
flags.DEFINE_float("embedding_learning_rate", None, "Tables' learning rate.")
flags.DEFINE_float("initial_accumulator", None, "Adagrad's initial accumulator.")
flags.DEFINE_float("l2", None, "L2 on the rows each example uses.")
flags.DEFINE_float("init_stddev", None, "Std-dev of initial factors.")
flags.DEFINE_list("table_options", None,
                  "Per-table overrides FEATURE.FIELD=VALUE, e.g. "
                  "item_id.learning_rate=0.05,user_id.l2=1e-5.")
# Two-tower retrieval (--model=two_tower).
flags.DEFINE_enum("model", None, config_lib.MODEL_KINDS,
                  "mf: matrix factorization (ranking); two_tower: retrieval "
                  "with feature towers.")
flags.DEFINE_string("features", None, "Two-tower feature configuration "
                    "(JSON file; format in trainer/models/features.py).")
flags.DEFINE_enum("preset", None, ["bn", "bn_logq", "bn_logq_l2", "history"],
                  "Two-tower preset applied to --features.")
flags.DEFINE_list("tower_widths", None, "Hidden widths of both towers' MLPs.")
flags.DEFINE_integer("output_dim", None, "Query/candidate embedding width.")
flags.DEFINE_bool("l2_normalize", None, "L2-normalise the towers' outputs.")
flags.DEFINE_float("temperature", None, "Softmax temperature.")
flags.DEFINE_bool("learn_temperature", None, "Learn the temperature.")
flags.DEFINE_enum("logq", None, config_lib.LOGQ_MODES,
                  "log(q) correction: none, streaming estimate, or counts.")
flags.DEFINE_bool("remove_accidental_hits", None,
                  "Mask in-batch candidates equal to the positive.")
flags.DEFINE_bool("global_negatives", None,
                  "Negatives from the whole global batch (all replicas).")
flags.DEFINE_integer("mixed_negatives", None, "Uniform catalog items added to "
                     "the in-batch candidates each step.")
flags.DEFINE_list("eval_ks", None, "Cut-offs of Recall@K / NDCG@K.")
flags.DEFINE_bool("scann", None, "Also export a ScaNN index of the item "
                  "embeddings (pip install '.[scann]'), with its recall@10 "
                  "against brute force.")
flags.DEFINE_list("feature_columns", None,
                  "Further columns passed to the model with each row.")
# Training.
flags.DEFINE_integer("batch_size", None, "Global batch size.")
flags.DEFINE_integer("eval_batch_size", None, "Global evaluation batch size.")
flags.DEFINE_integer("epochs", None, "Passes over the training files.")
flags.DEFINE_integer("train_steps", None, "Exact steps (overrides --epochs).")
flags.DEFINE_integer("steps_per_execution", None, "Steps per tf.function call.")
flags.DEFINE_enum("optimizer", None, config_lib.OPTIMIZERS,
                  "Optimizer of the dense parameters.")
flags.DEFINE_float("learning_rate", None, "Dense learning rate.")
flags.DEFINE_enum("lr_schedule", None, config_lib.LR_SCHEDULES,
                  "Learning-rate schedule of every optimizer.")
flags.DEFINE_integer("seed", None, "Seed of shuffling, negatives, init.")
flags.DEFINE_integer("checkpoint_every_steps", None, "Steps per checkpoint.")
flags.DEFINE_integer("log_every_steps", None, "Steps per progress line.")
# Runtime.
flags.DEFINE_enum("strategy", None, config_lib.STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_string("tpu", None, "TPU name, or 'local' on a TPU VM.")
flags.DEFINE_integer("intra_op_threads", None,
                     "Threads per TensorFlow op (0: one per core; default "
                     "-1: 1 for mf off TPU, else one per core).")
flags.DEFINE_integer("inter_op_threads", None,
                     "TensorFlow ops run at once (0: TensorFlow's choice).")
flags.DEFINE_integer("num_cpu_devices", None,
                     "Split the CPU into N logical devices (for mirrored).")
flags.DEFINE_string("model_dir", None, "Checkpoints, config.json, metrics.json.")
flags.DEFINE_string("export_dir", None, "SavedModel and embedding tables.")
flags.DEFINE_string("tensorboard_dir", None,
                    "TensorBoard events (default: --model_dir).")
flags.DEFINE_float("lock_timeout_secs", None,
                   "A second run on the same --model_dir is refused while the "
                   "first renews its lease; a holder silent this long is "
                   "taken over.")
flags.DEFINE_integer("min_shard_bytes", None, "parameter_server: smallest "
                     "shard of a table split over the parameter servers.")
flags.DEFINE_string("mlflow_uri", None, "MLflow tracking URI: log settings, "
                    "metrics and artifacts there (pip install .[mlflow]).")
flags.DEFINE_string("mlflow_experiment", None, "MLflow experiment name.")
flags.DEFINE_string("work_dir", "work/demo", "Demo data and outputs (demo only).")

FLAGS = flags.FLAGS

_SECTIONS = {
    "data": ["train_files", "eval_files", "columns", "column_types", "header",
             "delimiter", "user_column", "item_column", "label_mode",
             "label_column", "label_threshold", "num_negatives",
             "negative_catalog", "shuffle_buffer_rows", "files_in_flight",
             "time_column", "bad_rows", "feature_columns"],
    "model": ["id_mode", "embedding_dim", "min_count"],
    "retrieval": ["output_dim", "l2_normalize", "temperature",
                  "learn_temperature", "logq", "remove_accidental_hits",
                  "global_negatives", "mixed_negatives", "scann"],
    "train": ["batch_size", "eval_batch_size", "epochs", "train_steps",
              "steps_per_execution", "optimizer", "learning_rate",
              "lr_schedule", "seed",
              "checkpoint_every_steps", "log_every_steps"],
    "runtime": ["strategy", "tpu", "intra_op_threads", "inter_op_threads",
                "num_cpu_devices", "model_dir",
                "export_dir", "lock_timeout_secs", "tensorboard_dir",
                "mlflow_uri", "mlflow_experiment", "min_shard_bytes"],
}
_TABLE_FLAGS = {"embedding_optimizer": "optimizer",
                "embedding_learning_rate": "learning_rate",
                "initial_accumulator": "initial_accumulator", "l2": "l2",
                "init_stddev": "init_stddev", "num_bins": "num_bins",
                "num_hashes": "num_hashes",
                "num_oov": "num_oov"}


def _given(name):
  value = FLAGS[name].value
  return tuple(value) if isinstance(value, list) else value


def config_from_flags() -> config_lib.Config:
  """Builds the run's Config: a preset, overridden by the flags that are set."""
  demo = not FLAGS.train_files
  config = (config_lib.demo_preset(FLAGS.work_dir) if demo
            else config_lib.Config())
  sections = {
      s: {n: _given(n) for n in names if _given(n) is not None}
      for s, names in _SECTIONS.items()}
  # Unset folders come from the platform (Vertex AI's AIP_* variables).
  sections["runtime"] = environment.apply_defaults(sections["runtime"])
  if (FLAGS.num_negatives and FLAGS.label_mode is None):
    sections["data"]["label_mode"] = "implicit"
  if FLAGS.model:
    sections["model"]["kind"] = FLAGS.model
  if FLAGS.model == "two_tower":
    # Every row is a positive; the other rows of the batch are negatives.
    sections["data"].setdefault("label_mode", "implicit")
    sections["data"].setdefault("num_negatives", 0)
    sections["retrieval"].update(_retrieval_fields(sections["retrieval"]))
  config = config_lib.replace(config, **sections)

  data = config.data
  tables = []
  for table, kind in zip(config.model.tables, ("user", "item")):
    column = data.id_columns[len(tables)]
    fields = {"feature": column}
    fields.update({f: _given(n) for n, f in _TABLE_FLAGS.items()
                   if _given(n) is not None})
    if _given(f"{kind}_num_bins") is not None:
      fields["num_bins"] = _given(f"{kind}_num_bins")
    vocab = _given(f"{kind}_vocab") or (
        os.path.join(FLAGS.vocab_dir, f"{column}.txt") if FLAGS.vocab_dir
        else None)
    if vocab:
      fields["vocab_file"] = vocab
    tables.append(dataclasses.replace(table, **fields))
  for option in FLAGS.table_options or []:
    target, value = option.split("=", 1)
    feature, field = target.split(".", 1)
    tables = [dataclasses.replace(t, **{field: type(getattr(t, field))(value)})
              if t.feature == feature else t for t in tables]
  return config_lib.replace(config, model={"tables": tuple(tables)})


def _retrieval_fields(given):
  """--features (file), --preset and the list flags -> RetrievalConfig fields."""
  from trainer.models import presets  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  fields = {}
  text = ""
  if FLAGS.features:
    with tf.io.gfile.GFile(FLAGS.features) as f:
      text = f.read()
  if FLAGS.preset:
    text, preset_fields = presets.apply(FLAGS.preset, text)
    # Flags given explicitly win over the preset.
    fields.update({k: v for k, v in preset_fields.items() if k not in given})
  fields["features"] = text
  if FLAGS.tower_widths is not None:
    fields["tower_widths"] = tuple(int(w) for w in FLAGS.tower_widths if w)
  if FLAGS.eval_ks:
    fields["eval_ks"] = tuple(int(k) for k in FLAGS.eval_ks)
  return fields


class _OwnInfoOnly(py_logging.Filter):

  def filter(self, record):
    return (record.levelno >= py_logging.WARNING or
            "site-packages" not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from input import synthetic  # pylint: disable=g-import-not-at-top
  from trainer import run_lock  # pylint: disable=g-import-not-at-top
  from trainer import train  # pylint: disable=g-import-not-at-top
  config = config_from_flags()
  if not FLAGS.train_files:
    logging.info("No --train_files: running the demo on synthetic data in %s.",
                 FLAGS.work_dir)
    synthetic.write_log(os.path.join(FLAGS.work_dir, "data"))
  # Libraries' INFO lines (savers, signatures) drown the run's progress lines;
  # their warnings and errors still show.
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  try:
    train.train_and_evaluate(config)
  except (ValueError, FileNotFoundError, run_lock.RunLockHeld) as e:
    # Bad flags or bad input: one clear line, not a traceback.
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
