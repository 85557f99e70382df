"""The embedding seam: raw IDs -> table rows -> TPUEmbedding tables with a bias slot.

Everything accelerator-specific about embeddings lives here. The rest of the
model sees `{feature: [batch, dim + 1]}`, whose last column is the row's bias.
Off TPU, `tfrs.layers.embedding.TPUEmbedding` keeps plain variables that the
per-table Keras optimizers below update, one row-sparse update per batch.
"""

import contextlib
from typing import Dict, List, Mapping

import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras
from absl import logging
from tensorflow.python.distribute import sharded_variable  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops import resource_variable_ops  # pylint: disable=g-direct-tensorflow-import

from trainer import kernels

_GOLDEN = 0x9E3779B97F4A7C15


class IdLookup(tf_keras.layers.Layer):
  """Maps raw IDs (int64 or string) to rows of one table, inside the model.

  Because the lookup is part of the model, exports take raw IDs, and an ID
  never seen in training still gets a row (a hash bucket or an OOV row).

  Args:
    table: The TableConfig (bins and salt, or vocabulary file and OOV rows).
    id_mode: "hash" or "vocab".
    id_dtype: "int64" or "string".
  """

  def __init__(self, table, id_mode: str, id_dtype: str, **kwargs):
    super().__init__(name=f"{table.feature}_lookup", **kwargs)
    self._mode = id_mode
    self._dtype_name = id_dtype
    self._num_bins = table.num_bins
    self._salts = [table.salt + 1000 * k for k in range(table.num_hashes)]
    self.num_hashes = table.num_hashes if id_mode == "hash" else 1
    if id_mode == "vocab":
      layer = (tf_keras.layers.IntegerLookup if id_dtype == "int64" else
               tf_keras.layers.StringLookup)
      self._vocab = layer(vocabulary=table.vocab_file,
                          num_oov_indices=table.num_oov, mask_token=None,
                          name=f"{table.feature}_vocab")
      self.num_rows = self._vocab.vocabulary_size()
      logging.info("%s: vocabulary of %d IDs + %d OOV rows from %s.",
                   table.feature, self.num_rows - table.num_oov, table.num_oov,
                   table.vocab_file)
    else:
      self.num_rows = table.num_bins

  def call(self, ids: tf.Tensor) -> List[tf.Tensor]:
    """Returns `num_hashes` int32 row tensors in [0, num_rows), shaped as ids."""
    if self._mode == "vocab":
      return [tf.cast(self._vocab(ids), tf.int32)]
    return [tf.cast(self._hash(ids, salt), tf.int32) for salt in self._salts]

  def _hash(self, ids: tf.Tensor, salt: int) -> tf.Tensor:
    if ids.dtype == tf.string:
      return tf.strings.to_hash_bucket_strong(ids, self._num_bins,
                                              key=[salt, _GOLDEN >> 1])
    return tf.math.floormod(hash_int64(ids, salt), self._num_bins)


def hash_int64(ids: tf.Tensor, salt: int) -> tf.Tensor:
  """Mixes int64 IDs with the SplitMix64 finaliser; returns non-negative int64.

  Integer IDs are hashed as integers: going through strings would cost more
  than the rest of the lookup, and consecutive IDs still land in unrelated rows.
  """
  u64 = tf.uint64
  z = tf.bitcast(tf.cast(ids, tf.int64), u64) + tf.constant(
      (_GOLDEN * (salt + 1)) % (1 << 64), u64)
  for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(shift, u64)))
    z = z * tf.constant(mult, u64)
  z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, u64)))
  return tf.bitcast(tf.bitwise.right_shift(z, tf.constant(1, u64)), tf.int64)


class FactorsAndBias:
  """Initializer for a table row: N(0, stddev) factors and a zero bias slot.

  One instance per table with its own seed: a shared, unseeded initializer
  would give identical tables.
  """

  def __init__(self, stddev: float, seed: int, bias_slot: bool = True):
    self._stddev = stddev
    self._seed = seed
    self._bias = int(bias_slot)

  def __call__(self, shape, dtype=tf.float32):
    factors = tf.random.stateless_truncated_normal(
        [shape[0], shape[1] - self._bias], seed=[self._seed, 7],
        stddev=self._stddev, dtype=dtype)
    return tf.concat([factors, tf.zeros([shape[0], self._bias], dtype)],
                     axis=1)


def _fused_ops(variable):
  """The fused row-update ops (trainer/kernels.cc) if they can update
  `variable` here: a float32 table on this process's CPU."""
  ops = None
  if (variable.dtype == tf.float32 and variable.shape.rank == 2 and
      kernels.usable_here()):  # Not where GPUs are: no variable is on one.
    ops = kernels.ops()
  how = ("fused row updates (trainer/kernels.cc)" if ops is not None else
         "TensorFlow's gather/scatter ops")
  if how not in _LOGGED:
    _LOGGED.add(how)
    logging.info("Sparse table updates: %s.", how)
  return ops


_LOGGED = set()


def _write_rows(variable: tf.Variable, rows: tf.Tensor, values: tf.Tensor):
  """variable[rows] = values, rows distinct: a copy per row.

  TensorFlow's CPU scatter-add/-sub and fused sparse-apply kernels run an
  Eigen expression per row, 5-8x slower than the row copies of a
  scatter-update (2,700 random rows of a 200k x 33 table: 0.1 ms to copy,
  0.8 ms to subtract, 1.5 ms for ResourceSparseApplyAdagrad), so Adagrad and
  LazyAdam compute the new rows and write them.
  """
  variable.scatter_update(tf.IndexedSlices(values, rows))


class _RowSparse:
  """Mixin: sparse gradients reach update_step with their duplicate rows.

  The fused ops sum duplicates themselves (in batch order, as Keras'
  Unique + UnsortedSegmentSum do); without them update_step sums first.
  """

  def _deduplicate_sparse_grad(self, grads):
    return grads

  def _summed(self, grad: tf.IndexedSlices):
    """(distinct rows, their summed gradients), by Keras' de-duplication."""
    summed = super()._deduplicate_sparse_grad([grad])[0]
    return summed.indices, summed.values


class SparseAdagrad(_RowSparse, tf_keras.optimizers.Adagrad):
  """Keras Adagrad whose row-sparse update reads and writes each row once.

  Keras updates a sparse gradient's rows with five ops (scatter-add into the
  accumulator, gather it back, add epsilon, rsqrt, scatter-add into the
  table), and TensorFlow's fused ResourceSparseApplyAdagrad is slower still on
  CPU. Here one op (RowSparseAdagrad, trainer/kernels.cc) sums duplicate
  rows and updates each distinct table and accumulator row in place; without
  it, the new rows are computed from one gather of each and written back with
  row copies. The mathematics are Keras': var -= lr * g / sqrt(acc + epsilon)
  with acc += g^2 (duplicate rows summed first, as Keras does). The
  accumulator slot holds acc + epsilon from the start (as TensorFlow's fused
  kernel, which has no epsilon, needs; kept so checkpoints stay
  interchangeable).
  """

  def build(self, var_list):
    # The slot starts at initial_accumulator_value + epsilon (see above).
    initial = self.initial_accumulator_value
    self.initial_accumulator_value = initial + self.epsilon
    try:
      super().build(var_list)
    finally:
      self.initial_accumulator_value = initial

  def update_step(self, grad, variable):
    accumulator = self._accumulators[self._index_dict[self._var_key(variable)]]
    lr = tf.cast(self.learning_rate, variable.dtype)
    if isinstance(grad, tf.IndexedSlices):
      fused = _fused_ops(variable)
      if fused is not None:
        fused.row_sparse_adagrad(variable.handle, accumulator.handle,
                                 grad.indices, grad.values, lr)
        return
      rows, g = self._summed(grad)
      acc = tf.gather(accumulator, rows) + tf.square(g)
      _write_rows(accumulator, rows, acc)
      _write_rows(variable, rows,
                  tf.gather(variable, rows) - lr * g * tf.math.rsqrt(acc))
    else:
      accumulator.assign_add(grad * grad)
      variable.assign_sub(lr * grad / tf.sqrt(accumulator))


class LazyAdam(_RowSparse, tf_keras.optimizers.Adam):
  """Adam that, for a sparse gradient, updates only the rows it touches.

  Keras Adam decays the moments of every row of a table on every step; with
  large tables that costs more than the rest of training. Rows absent from a
  batch keep their moments (the usual "lazy" approximation).
  """

  def update_step(self, gradient, variable):
    if not isinstance(gradient, tf.IndexedSlices):
      return super().update_step(gradient, variable)
    dtype = variable.dtype
    step = tf.cast(self.iterations + 1, dtype)
    b1, b2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
    alpha = (tf.cast(self.learning_rate, dtype) * tf.sqrt(1 - tf.pow(b2, step))
             / (1 - tf.pow(b1, step)))
    key = self._var_key(variable)
    m = self._momentums[self._index_dict[key]]
    v = self._velocities[self._index_dict[key]]
    fused = _fused_ops(variable)
    if fused is not None:
      fused.row_sparse_lazy_adam(variable.handle, m.handle, v.handle,
                                 gradient.indices, gradient.values, alpha, b1,
                                 b2, tf.cast(self.epsilon, dtype))
      return
    rows, grad = self._summed(gradient)
    m_rows = b1 * tf.gather(m, rows) + (1 - b1) * grad
    v_rows = b2 * tf.gather(v, rows) + (1 - b2) * tf.square(grad)
    _write_rows(m, rows, m_rows)
    _write_rows(v, rows, v_rows)
    _write_rows(variable, rows, tf.gather(variable, rows) -
                alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon))


class SparseSGD(_RowSparse, tf_keras.optimizers.SGD):
  """Plain SGD that updates only the rows a sparse gradient touches.

  Keras SGD keeps a momentum slot even at momentum 0 and adds it to the whole
  table every step, which makes it as slow as Adam on embedding tables.
  """

  def build(self, var_list):
    tf_keras.optimizers.Optimizer.build(self, var_list)  # No momentum slots.
    self._built = True

  def update_step(self, gradient, variable):
    lr = tf.cast(self.learning_rate, variable.dtype)
    if isinstance(gradient, tf.IndexedSlices):
      fused = _fused_ops(variable)
      if fused is not None:
        fused.row_sparse_sgd(variable.handle, gradient.indices,
                             gradient.values, lr)
        return
      # Without the fused op, a scatter-subtract adds up duplicate rows'
      # updates by itself: exact without a de-duplication first (which costs
      # about as much as the row copies of _write_rows would save).
      variable.scatter_sub(tf.IndexedSlices(gradient.values * lr,
                                            gradient.indices))
    else:
      variable.assign_sub(gradient * lr)


def make_optimizer(name: str, learning_rate: float,
                   initial_accumulator: float = 1e-6,
                   schedule: str = "constant", total_steps: int = 0):
  """A Keras optimizer by name; all but "adam" update embedding rows sparsely.

  Args:
    name: One of config.OPTIMIZERS.
    learning_rate: Initial learning rate.
    initial_accumulator: Adagrad's starting accumulator.
    schedule: "constant", "cosine" or "linear" (decay to 0 by total_steps).
    total_steps: Steps of the run, for the decaying schedules.
  """
  if schedule == "cosine" and total_steps:
    learning_rate = tf_keras.optimizers.schedules.CosineDecay(
        learning_rate, total_steps)
  elif schedule == "linear" and total_steps:
    learning_rate = tf_keras.optimizers.schedules.PolynomialDecay(
        learning_rate, total_steps, end_learning_rate=0.0)
  if name == "adagrad":
    return SparseAdagrad(
        learning_rate, initial_accumulator_value=initial_accumulator)
  if name == "sgd":
    return SparseSGD(learning_rate)
  if name == "adam":
    return tf_keras.optimizers.Adam(learning_rate)
  if name == "lazy_adam":
    return LazyAdam(learning_rate)
  raise ValueError(f"Unknown optimizer {name!r}.")


def _tpu_optimizer(table):
  emb = tf.tpu.experimental.embedding
  if table.optimizer == "adagrad":
    return emb.Adagrad(table.learning_rate,
                       initial_accumulator_value=table.initial_accumulator)
  if table.optimizer == "sgd":
    return emb.SGD(table.learning_rate)
  return emb.Adam(table.learning_rate, lazy_adam=table.optimizer == "lazy_adam")


@contextlib.contextmanager
def _local_string_variables():
  """Creates string variables outside the strategy's variable creator.

  TPUEmbeddingForServing keeps a string variable for SparseCore layouts;
  MultiWorkerMirroredStrategy would try to broadcast its initial value, which
  collectives cannot do for strings. It is only read locally, so it stays local.
  """

  def creator(next_creator, **kwargs):
    if tf.as_dtype(kwargs.get("dtype") or tf.float32) == tf.string:
      return resource_variable_ops.ResourceVariable(
          initial_value=kwargs["initial_value"], trainable=False,
          name=kwargs.get("name"), dtype=tf.string)
    return next_creator(**kwargs)

  with tf.variable_creator_scope(creator):
    yield


def _lookup_name(feature: str, k: int) -> str:
  return feature if k == 0 else f"{feature}_hash{k}"


class EmbeddingTables(tf_keras.layers.Layer):
  """One named TPUEmbedding table per ID feature; rows end in a bias slot.

  Args:
    tables: TableConfigs, one per feature.
    num_rows: Rows of each feature's table (from its IdLookup).
    embedding_dim: Latent factors; each row has embedding_dim + 1 slots.
    seed: Base seed; table i is initialised with seed + i.
    on_tpu: Whether the layer is built under a TPUStrategy (then the tables'
      own optimizers run on the TPU and the Keras ones are unused).
    num_hashes: Row lookups per ID for each feature (default 1), summed.
    lr_schedule: Learning-rate schedule of the tables' optimizers.
    total_steps: Steps of the run, for decaying schedules.
    dims: Per-feature embedding_dim, for tables of different widths.
    shared: {lookup: feature}: further lookups that read `feature`'s table,
      e.g. a history of items pooled through the item table. Their rows may
      be ragged ([B, None]) and weighted, and are summed per example.
    bias_slot: Whether rows end in a bias slot (matrix factorization's).
  """

  def __init__(self, tables, num_rows: Mapping[str, int], embedding_dim: int,
               seed: int, on_tpu: bool = False,
               num_hashes: Mapping[str, int] = None,
               lr_schedule: str = "constant", total_steps: int = 0,
               dims: Mapping[str, int] = None,
               shared: Mapping[str, str] = None, bias_slot: bool = True,
               **kwargs):
    super().__init__(name="embedding_tables", **kwargs)
    shared = dict(shared or {})
    self._features = [t.feature for t in tables] + list(shared)
    self._table_of = {**{t.feature: t.feature for t in tables}, **shared}
    self._num_hashes = {f: (num_hashes or {}).get(self._table_of[f], 1)
                        for f in self._features}
    feature_config = {}
    for i, t in enumerate(tables):
      dim = (dims or {}).get(t.feature, embedding_dim)
      width = dim + int(bias_slot)
      table = tf.tpu.experimental.embedding.TableConfig(
          vocabulary_size=num_rows[t.feature], dim=width,
          initializer=FactorsAndBias(t.init_stddev, seed + i, bias_slot),
          optimizer=_tpu_optimizer(t) if on_tpu else None,
          combiner="sum", name=f"{t.feature}_table")
      # Extra hashes of a feature, and lookups sharing its table, are extra
      # features of its table.
      for f in self._features:
        if self._table_of[f] != t.feature:
          continue
        for k in range(self._num_hashes[f]):
          name = _lookup_name(f, k)
          feature_config[name] = tf.tpu.experimental.embedding.FeatureConfig(
              table=table, name=name)
      logging.info("Table %s_table: %d rows x %d (%d factors%s), %.1f MB.",
                   t.feature, num_rows[t.feature], width, dim,
                   " + bias" if bias_slot else "",
                   num_rows[t.feature] * width * 4 / 2**20)
    with _local_string_variables():
      self._tpu_embedding = tfrs.layers.embedding.TPUEmbedding(
          feature_config, optimizer=_tpu_optimizer(tables[0]) if on_tpu else None)
      self._tpu_embedding.build(None)
    # Off TPU, per-table Keras optimizers update the plain table variables.
    self.optimizers = {t.feature: make_optimizer(
        t.optimizer, t.learning_rate, t.initial_accumulator, lr_schedule,
        total_steps) for t in tables}

  def call(self, rows: Dict[str, List[tf.Tensor]],
           weights: Dict[str, tf.Tensor] = None,
           fused: bool = False) -> Dict[str, tf.Tensor]:
    """Looks up `{feature: [int32 rows [B]] * num_hashes}` -> `{feature: [B, d+1]}`.

    A feature's rows from several hashes are summed. A shared lookup's rows
    may be ragged [B, None], with `weights[feature]` of the same shape: its
    output is the weighted sum of the rows of each example.

    With `fused` (training on a CPU), plain rows [B] of plain (not
    distributed) table variables are read with the fused gather of
    trainer/kernels.cc, the same rows as TPUEmbedding's lookup; anything else
    goes through TPUEmbedding.
    """
    weights = weights or {}
    if fused and not weights:
      tables = self.tables()
      if all(type(tables[self._table_of[f]]) is  # pylint: disable=unidiomatic-typecheck
             resource_variable_ops.ResourceVariable and
             all(isinstance(r, tf.Tensor) and r.shape.rank == 1 for r in rs)
             for f, rs in rows.items()):
        return {f: tf.add_n([kernels.gather(tables[self._table_of[f]], r)
                             for r in rs]) for f, rs in rows.items()}
    names = {_lookup_name(f, k): (f, k) for f in self._features
             if f in rows for k in range(self._num_hashes[f])}
    if len(names) < len(self._tpu_embedding._feature_config):  # pylint: disable=protected-access
      # One tower alone (serving, scoring a catalog): TPUEmbedding looks up
      # every feature at once, so read the table variables directly.
      return {f: self._direct(f, r, weights.get(f)) for f, r in rows.items()}
    looked_up = self._tpu_embedding(
        {n: rows[f][k] for n, (f, k) in names.items()},
        weights={n: weights.get(f) for n, (f, _) in names.items()}
        if weights else None)
    return {f: tf.add_n([looked_up[_lookup_name(f, k)]
                         for k in range(self._num_hashes[f])])
            for f in self._features if f in rows}

  def _direct(self, feature: str, rows: List[tf.Tensor],
              weights: tf.Tensor = None) -> tf.Tensor:
    table = self.tables()[self._table_of[feature]]
    out = []
    for r in rows:
      v = tf.gather(table, r)
      if isinstance(r, tf.RaggedTensor):
        if weights is not None:
          v = v * tf.expand_dims(weights, -1)
        v = tf.reduce_sum(v, axis=1)
      out.append(v)
    return tf.add_n(out)

  def tables(self) -> Dict[str, tf.Variable]:
    """`{feature: table variable [rows, dim + 1]}`."""
    by_name = {cfg.name: var for cfg, var in
               self._tpu_embedding.embedding_tables.items()}
    return {f: by_name[f"{f}_table"] for f in self._features
            if self._table_of[f] == f}


def table_parts(table) -> List[tf.Variable]:
  """The variables a table is made of: its shards if sharded, else itself."""
  if isinstance(table, sharded_variable.ShardedVariable):
    return list(table.variables)
  return [table]


def sparse_train_step(model: tf_keras.Model, inputs) -> Dict[str, tf.Tensor]:
  """One step of a model whose tables live in `model.embedding`.

  Each table has its own optimizer (row-sparse updates); the rest (global
  bias, towers) uses compile's.
  """
  with tf.GradientTape() as tape:
    loss = model.compute_loss(inputs, training=True)
  variables = model.trainable_variables
  grads = dict(zip((v.ref() for v in variables),
                   tape.gradient(loss, variables)))
  owned = set()
  for feature, table in model.embedding.tables().items():
    # Under parameter servers a table is a ShardedVariable: its shards, not
    # the table, are the trainable variables.
    parts = table_parts(table)
    pairs = [(grads[p.ref()], p) for p in parts
             if p.ref() in grads and grads[p.ref()] is not None]
    if pairs:
      model.embedding.optimizers[feature].apply_gradients(pairs)
    owned.update(p.ref() for p in parts)
  model.optimizer.apply_gradients(
      [(g, v.deref()) for v, g in grads.items()
       if v not in owned and g is not None])
  # Each replica returns its share of the global-batch mean loss; Keras sums
  # the replicas' outputs (distribute_reduction_method="sum", set by the
  # trainer), which gives the step's loss under every strategy.
  return {"loss": loss}
