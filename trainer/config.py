"""Every setting of a run, as nested frozen dataclasses with one validation path."""

import dataclasses
import json
from typing import Any, Dict, Optional, Tuple

COLUMN_TYPES = ("int64", "float32", "string")
LABEL_MODES = ("column", "threshold", "implicit")
ID_MODES = ("hash", "vocab")
OPTIMIZERS = ("adagrad", "sgd", "adam", "lazy_adam")
LR_SCHEDULES = ("constant", "cosine", "linear")
MODEL_KINDS = ("mf", "two_tower")
LOGQ_MODES = ("none", "streaming", "counts")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu",
              "parameter_server")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the interaction log is and how to read it.

  Attributes:
    train_files: File patterns (local or gs://) of gzipped CSV training shards.
    eval_files: File patterns of held-out shards, evaluated after training.
    columns: Column names, in file order.
    column_types: One of COLUMN_TYPES per column; ID columns may be int64 or
      string and keep that type all the way to the exported signature.
    header: Whether every shard starts with a header line (skipped).
    delimiter: Field separator.
    user_column: Name of the user ID column.
    item_column: Name of the item ID column.
    label_mode: "column" (the label column is 0/1), "threshold" (label =
      label_column >= label_threshold) or "implicit" (every row is a positive).
    label_column: Column the label is read from in column/threshold modes.
    label_threshold: Threshold for "threshold" mode, e.g. a rating of 4.
    num_negatives: Uniform random negative items generated per row (implicit).
    negative_catalog: Text file of item IDs (one per line) negatives are drawn
      from; empty means the item vocabulary in vocab mode, else the distinct
      items of the block being read.
    bad_rows: "error" stops on the first malformed row, naming the file;
      "skip" drops malformed rows and counts them.
    block_bytes: Compressed bytes read per block; rows are parsed a whole
      block at a time. Memory in flight is a block per file being read,
      whatever the shard sizes.
    files_in_flight: Files each input pipeline reads at once, a block of each
      in turn, so that rows of many files meet in the mixing buffer.
    shuffle_buffer_rows: Rows of the mixing buffer of each input pipeline in
      training (about 20 bytes each with int64 IDs). A log that fits is
      shuffled whole every epoch; a larger one is mixed over this window.
    time_column: Column of event times, used only to warn when the files are
      sorted by time beyond what the buffer can mix ("" or absent: no check).
    feature_columns: Further columns passed to the model with each row (e.g.
      a history or a timestamp for a retrieval model's features); a row's
      negatives share them.
  """
  train_files: Tuple[str, ...] = ()
  eval_files: Tuple[str, ...] = ()
  columns: Tuple[str, ...] = ("user_id", "item_id", "label", "timestamp")
  column_types: Tuple[str, ...] = ("int64", "int64", "float32", "int64")
  header: bool = False
  delimiter: str = ","
  user_column: str = "user_id"
  item_column: str = "item_id"
  label_mode: str = "column"
  label_column: str = "label"
  label_threshold: float = 0.5
  num_negatives: int = 0
  negative_catalog: str = ""
  bad_rows: str = "error"
  block_bytes: int = 64 << 10
  files_in_flight: int = 16
  shuffle_buffer_rows: int = 1 << 20
  time_column: str = "timestamp"
  feature_columns: Tuple[str, ...] = ()

  def column_type(self, name: str) -> str:
    return self.column_types[self.columns.index(name)]

  @property
  def id_columns(self) -> Tuple[str, str]:
    return (self.user_column, self.item_column)


@dataclasses.dataclass(frozen=True)
class TableConfig:
  """One embedding table, owned by one ID feature.

  Attributes:
    feature: The ID column that indexes this table.
    num_bins: Rows in hash mode.
    salt: Hash salt in hash mode (distinct salts give distinct hash functions).
    num_hashes: Hash mode: each ID takes this many rows of the table, from as
      many salted hashes, summed. At equal memory, two IDs then share all
      their rows far more rarely than one row under plain hashing.
    vocab_file: Vocabulary file in vocab mode (one ID per line, most frequent
      first), as written by `python -m input.vocab`.
    num_oov: Out-of-vocabulary rows in vocab mode; unknown IDs hash into them.
    optimizer: One of OPTIMIZERS; updates only the rows a batch touches,
      except "adam" (Keras Adam decays every row's moments every step).
    learning_rate: Learning rate of this table's optimizer.
    initial_accumulator: Adagrad's starting accumulator. Small, because the
      loss is averaged over large batches and 0.1 all but freezes the rows.
    l2: L2 penalty on the rows used by each example (factors and bias).
    init_stddev: Standard deviation of the factor initializer (bias starts 0).
  """
  feature: str
  num_bins: int = 100_000
  salt: int = 0
  num_hashes: int = 1
  vocab_file: str = ""
  num_oov: int = 1
  optimizer: str = "adagrad"
  learning_rate: float = 0.1
  initial_accumulator: float = 1e-6
  l2: float = 0.0
  init_stddev: float = 0.05


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model: matrix factorization, or a two-tower retrieval model.

  Attributes:
    kind: "mf" (a ranking model of (user, item) pairs) or "two_tower" (a
      retrieval model of feature towers; see RetrievalConfig).
    id_mode: "hash" or "vocab"; how raw IDs become table rows, in the model.
    embedding_dim: Latent factors per row; each table row has one more slot,
      the bias.
    tables: One TableConfig per ID feature (user first, item second).
    min_count: Vocab mode, for tables without a vocabulary file: the run
      builds one from the training files in its counting pass, keeping IDs
      seen at least this often (the rest share the OOV rows).
  """
  kind: str = "mf"
  id_mode: str = "hash"
  embedding_dim: int = 32
  min_count: int = 1
  tables: Tuple[TableConfig, ...] = (TableConfig("user_id", salt=1),
                                     TableConfig("item_id", salt=2))

  def table(self, feature: str) -> TableConfig:
    for t in self.tables:
      if t.feature == feature:
        return t
    raise KeyError(feature)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  """The two-tower retrieval model (ModelConfig.kind == "two_tower").

  Attributes:
    features: The feature configuration, as JSON text (the contents of
      --features=FILE, or a preset's): side files and each tower's features;
      see trainer/models/features.py for the format. Kept in config.json, so a run
      is reproducible without the file.
    tower_widths: Hidden layer widths of both towers' MLPs (ReLU); the last
      layer is linear, of output_dim.
    output_dim: Width of the query and candidate embeddings.
    l2_normalize: Normalise both towers' outputs (cosine scores).
    temperature: Logits are scores / temperature.
    learn_temperature: Learn the temperature (starting at `temperature`).
    logq: Correction of the in-batch softmax for how often items appear as
      candidates: "none"; "streaming" (per hash bucket, the average gap
      between an item's appearances, estimated while training, as in Yi et
      al. 2019); "counts" (the item vocabulary's counts; vocab mode).
    logq_buckets: Hash buckets of the streaming estimator.
    logq_alpha: Its moving-average rate.
    remove_accidental_hits: Mask in-batch candidates equal to the positive.
    global_negatives: Under several replicas, score each query against the
      candidates of the whole global batch (all-gathered), not its replica's.
    mixed_negatives: Items drawn uniformly from the catalog each step and
      added to every query's candidates (mixed negative sampling, Yang et
      al. 2020), corrected by their own log(q) when --logq is on. Needs a
      catalog at build time: vocab mode or an item side file.
    eval_ks: Cut-offs of the full-catalog Recall@K / NDCG@K evaluation.
    eval_chunk: Candidates scored at a time in evaluation.
    scann: Also export a ScaNN index of the item embeddings (the `scann`
      extra), with its recall@10 against brute force on the held-out queries.
  """
  features: str = ""
  tower_widths: Tuple[int, ...] = ()
  output_dim: int = 64
  l2_normalize: bool = True
  temperature: float = 0.1
  learn_temperature: bool = False
  logq: str = "none"
  logq_buckets: int = 1 << 20
  logq_alpha: float = 0.01
  remove_accidental_hits: bool = True
  global_negatives: bool = True
  mixed_negatives: int = 0
  eval_ks: Tuple[int, ...] = (10, 50, 100)
  eval_chunk: int = 65536
  scann: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How long and how to train.

  Attributes:
    batch_size: Global batch size (split across replicas).
    eval_batch_size: Global batch size for evaluation.
    epochs: Passes over the training files.
    train_steps: If > 0, stop after this many steps (epochs repeat as needed).
    steps_per_execution: Steps run per tf.function call.
    optimizer: Optimizer of the dense parameters (the global bias).
    learning_rate: Its learning rate.
    lr_schedule: "constant", or "cosine"/"linear" decay to 0 over the run's
      steps; applies to every optimizer (tables and dense).
    seed: Seeds shuffling, negatives and initializers.
    checkpoint_every_steps: Steps between checkpoints (and a last one at end).
    log_every_steps: Steps between progress lines and TensorBoard points.
  """
  batch_size: int = 4096
  eval_batch_size: int = 16384
  epochs: int = 1
  train_steps: int = 0
  steps_per_execution: int = 16
  optimizer: str = "adagrad"
  learning_rate: float = 0.05
  lr_schedule: str = "constant"
  seed: int = 42
  checkpoint_every_steps: int = 1000
  log_every_steps: int = 100


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """Where the run executes and writes.

  Attributes:
    strategy: One of STRATEGIES.
    tpu: TPU name or address for the tpu strategy ("local" on a TPU VM).
    intra_op_threads: Threads one TensorFlow op may use: 0 is TensorFlow's
      choice (one per core); -1 (the default) picks 1 for mf off TPU, and 0
      for two_tower and on TPU. With 1 each op runs on the thread that
      scheduled it, so the MF step's small gathers and scatters wait for no
      other thread (end to end on 2 cores: 1.06-1.36M vs 0.96-1.12M
      examples/s; README, Performance); the two tables' ops still run side
      by side.
    inter_op_threads: Ops run at once (0: TensorFlow's choice).
    num_cpu_devices: Split the CPU into this many logical devices (lets the
      mirrored strategy run, and be tested, on one CPU host).
    model_dir: Checkpoints, config.json, metrics.json and TensorBoard logs.
    export_dir: If set, the SavedModel and embedding tables go here.
    lock_timeout_secs: The run holds model_dir/RUN_LOCK, renewed every quarter
      of this; a second run is refused until the holder has not renewed it
      for this long (or, on the same host, its pid is gone).
    tensorboard_dir: If set, TensorBoard events (train/, eval/) go here
      instead of model_dir (on Vertex AI: AIP_TENSORBOARD_LOG_DIR).
    mlflow_uri: If set, the chief logs the run's settings, metrics and
      small artifacts (config, metrics, item embeddings) to this MLflow
      tracking URI (the `mlflow` extra).
    mlflow_experiment: The MLflow experiment.
    min_shard_bytes: parameter_server: tables are split by rows into shards
      of at least this size, one per parameter server at most.
  """
  strategy: str = "default"
  tpu: str = ""
  intra_op_threads: int = -1
  inter_op_threads: int = 0
  num_cpu_devices: int = 0
  model_dir: str = ""
  export_dir: str = ""
  tensorboard_dir: str = ""
  lock_timeout_secs: float = 60.0
  mlflow_uri: str = ""
  mlflow_experiment: str = "cf-trainer"
  min_shard_bytes: int = 256 << 10


@dataclasses.dataclass(frozen=True)
class Config:
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  runtime: RuntimeConfig = RuntimeConfig()
  retrieval: RetrievalConfig = RetrievalConfig()

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "Config":
    model = dict(d["model"])
    model["tables"] = tuple(TableConfig(**t) for t in model["tables"])
    return cls(
        data=DataConfig(**_tuples(d["data"])),
        model=ModelConfig(**model),
        train=TrainConfig(**d["train"]),
        runtime=RuntimeConfig(**d["runtime"]),
        retrieval=RetrievalConfig(**_tuples(d.get("retrieval", {}))))


def _tuples(d: Dict[str, Any]) -> Dict[str, Any]:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def replace(config: Config, **sections: Dict[str, Any]) -> Config:
  """Returns `config` with fields of its sections replaced, e.g. train={...}."""
  return dataclasses.replace(config, **{
      name: dataclasses.replace(getattr(config, name), **fields)
      for name, fields in sections.items()})


def _check(ok: bool, message: str, *args: Any) -> None:
  if not ok:
    raise ValueError(message % args if args else message)


def validate(config: Config) -> Config:
  """Checks a config for contradictions, with messages that say what to fix.

  Args:
    config: The config to check.

  Returns:
    The same config, so calls can be chained.

  Raises:
    ValueError: If a setting is out of range or contradicts another.
  """
  d, m, t, r = config.data, config.model, config.train, config.runtime
  _check(bool(d.train_files), "No training files: set --train_files.")
  _check(len(d.columns) == len(d.column_types),
         "--columns has %d names but --column_types has %d types.",
         len(d.columns), len(d.column_types))
  _check(len(set(d.columns)) == len(d.columns), "Duplicate column names in %s.",
         d.columns)
  for typ in d.column_types:
    _check(typ in COLUMN_TYPES, "Unknown column type %r; use one of %s.", typ,
           COLUMN_TYPES)
  for col in d.id_columns:
    _check(col in d.columns, "ID column %r is not among --columns %s.", col,
           d.columns)
    _check(d.column_type(col) in ("int64", "string"),
           "ID column %r must be int64 or string, not %s.", col,
           d.column_type(col))
  _check(d.label_mode in LABEL_MODES, "--label_mode must be one of %s.",
         LABEL_MODES)
  if d.label_mode != "implicit":
    _check(d.label_column in d.columns,
           "Label column %r is not among --columns %s.", d.label_column,
           d.columns)
    _check(d.column_type(d.label_column) != "string",
           "Label column %r must be numeric.", d.label_column)
  _check(d.num_negatives >= 0, "--num_negatives must be >= 0.")
  _check(d.num_negatives == 0 or d.label_mode == "implicit",
         "--num_negatives=%d needs --label_mode=implicit (every row a positive).",
         d.num_negatives)
  _check(m.kind in MODEL_KINDS, "--model must be one of %s.", MODEL_KINDS)
  _check(d.label_mode != "implicit" or d.num_negatives > 0 or
         m.kind == "two_tower",
         "--label_mode=implicit needs --num_negatives > 0, or every label is 1.")
  for col in d.feature_columns:
    _check(col in d.columns, "Feature column %r is not among --columns %s.",
           col, d.columns)
  _check(not config.retrieval.scann or m.kind == "two_tower",
         "--scann indexes a retrieval model's items: it needs "
         "--model=two_tower.")
  if m.kind == "two_tower":
    rc = config.retrieval
    _check(d.num_negatives == 0, "--model=two_tower takes its negatives from "
           "the batch: set --num_negatives=0.")
    _check(bool(rc.features), "--model=two_tower needs --features=FILE or "
           "--preset.")
    _check(rc.logq in LOGQ_MODES, "--logq must be one of %s.", LOGQ_MODES)
    _check(rc.logq != "counts" or m.id_mode == "vocab",
           "--logq=counts needs --id_mode=vocab (the counts of the item "
           "vocabulary).")
    _check(rc.temperature > 0, "--temperature must be > 0.")
    _check(rc.mixed_negatives >= 0, "--mixed_negatives must be >= 0.")
    _check(rc.output_dim > 0 and all(w > 0 for w in rc.tower_widths),
           "Tower widths must be positive.")
  _check(d.bad_rows in ("error", "skip"), "--bad_rows must be error or skip.")
  _check(len(d.delimiter) == 1, "--delimiter must be one character.")
  _check(d.block_bytes >= 1024, "block_bytes must be at least 1024.")
  _check(d.files_in_flight >= 1, "--files_in_flight must be >= 1.")
  _check(d.shuffle_buffer_rows >= 1, "--shuffle_buffer_rows must be >= 1.")
  _check(t.batch_size >= 1 + d.num_negatives,
         "--batch_size=%d cannot hold one positive and its %d negatives.",
         t.batch_size, d.num_negatives)
  _check(m.id_mode in ID_MODES, "--id_mode must be one of %s.", ID_MODES)
  _check(m.embedding_dim > 0, "--embedding_dim must be positive.")
  _check(m.min_count >= 1, "--min_count must be >= 1.")
  _check([tb.feature for tb in m.tables] == list(d.id_columns),
         "Tables %s must match the ID columns %s.",
         [tb.feature for tb in m.tables], d.id_columns)
  for tb in m.tables:
    _check(tb.optimizer in OPTIMIZERS, "Table %s: optimizer must be one of %s.",
           tb.feature, OPTIMIZERS)
    if m.id_mode == "hash":
      _check(tb.num_bins > 0, "Table %s: --num_bins must be positive.",
             tb.feature)
      _check(tb.num_hashes >= 1, "Table %s: --num_hashes must be >= 1.",
             tb.feature)
    else:
      _check(tb.num_oov >= 1, "Table %s: --num_oov must be >= 1.", tb.feature)
  _check(t.batch_size > 0 and t.eval_batch_size > 0, "Batch sizes must be > 0.")
  _check(t.epochs > 0 or t.train_steps > 0,
         "Set --epochs or --train_steps to a positive number.")
  _check(t.steps_per_execution > 0, "--steps_per_execution must be > 0.")
  _check(t.optimizer in OPTIMIZERS, "--optimizer must be one of %s.",
         OPTIMIZERS)
  _check(t.lr_schedule in LR_SCHEDULES, "--lr_schedule must be one of %s.",
         LR_SCHEDULES)
  _check(r.strategy in STRATEGIES, "--strategy must be one of %s.", STRATEGIES)
  _check(r.strategy != "tpu" or bool(r.tpu), "--strategy=tpu needs --tpu.")
  _check(r.intra_op_threads >= -1 and r.inter_op_threads >= 0,
         "--intra_op_threads must be >= -1 (-1: automatic, 0: TensorFlow's "
         "choice) and --inter_op_threads >= 0 (0: TensorFlow's choice).")
  _check(bool(r.model_dir), "Set --model_dir.")
  if r.intra_op_threads == -1:  # Automatic; the TPU path keeps TF's pools.
    config = replace(config, runtime={
        "intra_op_threads": 1 if m.kind == "mf" and r.strategy != "tpu" else 0})
  return config


def demo_preset(work_dir: str) -> Config:
  """The embedded demo: synthetic shards written under `work_dir`."""
  return Config(
      data=DataConfig(train_files=(f"{work_dir}/data/train-*.csv.gz",),
                      eval_files=(f"{work_dir}/data/eval-*.csv.gz",)),
      # 100k bins keep hash collisions rare for 2,000 users and 1,000 items;
      # at 4,096 bins a fifth of the users share a row and AUC drops ~0.06.
      train=TrainConfig(epochs=10, batch_size=1024, log_every_steps=250),
      runtime=RuntimeConfig(model_dir=f"{work_dir}/model",
                            export_dir=f"{work_dir}/export"))


def load(path: str) -> Optional[Config]:
  """Reads a config.json written by a run; None if there is none."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return Config.from_dict(json.load(f))
