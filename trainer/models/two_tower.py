"""Two-tower retrieval as a tfrs.models.Model: feature towers and an in-batch softmax.

The query tower embeds a row's user-side features (user ID, side-file
features, cyclical time, the history of items before the row), the candidate
tower an item's (item ID, side-file features). Both end in an MLP and
optional L2 normalisation. The loss is a softmax over the batch's candidates
(under several replicas, the global batch's), with accidental hits removed and
optionally corrected by log(q), the candidates' sampling probability.
ID features and histories go through the same embedding seam as matrix
factorization (trainer/embedding.py); a history shares the item table.
"""

from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from trainer import config as config_lib
from trainer import embedding
from trainer.models import features as features_lib


class StreamingFrequency(tf_keras.layers.Layer):
  """Estimates each item's sampling probability while training (Yi et al. 2019).

  Per hash bucket it keeps the step an item was last seen (A) and a moving
  average of the gap between its appearances (B); an item's probability of
  being in a batch is about 1 / B. B starts at 1 / alpha steps, so an item
  counts as rare until it recurs.

  Args:
    buckets: Hash buckets (collisions merge items' estimates).
    alpha: Moving-average rate.
  """

  def __init__(self, buckets: int, alpha: float, **kwargs):
    super().__init__(**kwargs)
    self._buckets = buckets
    self._alpha = alpha
    # Every replica applies the same update, from the global batch's IDs.
    agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
    self.last_step = self.add_weight(
        name="last_step", shape=(buckets,), dtype=tf.float32,
        initializer="zeros", trainable=False, aggregation=agg)
    self.gap = self.add_weight(
        name="gap", shape=(buckets,), dtype=tf.float32,
        initializer=tf_keras.initializers.Constant(1.0 / alpha),
        trainable=False, aggregation=agg)

  def _bucket(self, ids: tf.Tensor) -> tf.Tensor:
    if ids.dtype == tf.string:
      return tf.strings.to_hash_bucket_fast(ids, self._buckets)
    return tf.math.floormod(embedding.hash_int64(ids, 99), self._buckets)

  def probability(self, ids: tf.Tensor) -> tf.Tensor:
    """Current estimates for `ids [N]` -> [N], before this step's update."""
    return 1.0 / tf.maximum(tf.gather(self.gap, self._bucket(ids)), 1.0)

  def update(self, ids: tf.Tensor, step: tf.Tensor) -> None:
    """Records that `ids` appeared in the batch of `step`."""
    b = self._bucket(ids)
    step = tf.cast(step, tf.float32) + 1.0  # Step 0 must differ from "never".
    last = tf.gather(self.last_step, b)
    seen = last > 0
    gap = tf.gather(self.gap, b)
    new_gap = tf.where(seen, (1 - self._alpha) * gap +
                       self._alpha * (step - last), gap)
    self.gap.scatter_update(tf.IndexedSlices(new_gap, b))
    self.last_step.scatter_update(
        tf.IndexedSlices(tf.fill(tf.shape(b), step), b))


class Tower(tf_keras.layers.Layer):
  """Concatenated feature vectors -> MLP -> linear output -> optional L2 norm."""

  def __init__(self, widths, output_dim: int, l2_normalize: bool, seed: int,
               **kwargs):
    super().__init__(**kwargs)
    init = lambda i: tf_keras.initializers.GlorotUniform(seed=seed + i)
    self._layers = [tf_keras.layers.Dense(w, activation="relu",
                                          kernel_initializer=init(i))
                    for i, w in enumerate(widths)]
    self._out = tf_keras.layers.Dense(output_dim, kernel_initializer=init(99))
    self._l2 = l2_normalize

  def call(self, x: tf.Tensor) -> tf.Tensor:
    for layer in self._layers:
      x = layer(x)
    x = self._out(x)
    return tf.math.l2_normalize(x, axis=-1) if self._l2 else x


def _item_counts(vocab_file: str) -> Optional[np.ndarray]:
  path = vocab_file[:-len(".txt")] + ".counts.txt"
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return np.array([int(x) for x in f.read().split()], np.float64)


class TwoTower(tfrs.models.Model):
  """Query and candidate towers over a feature configuration.

  Args:
    config: The run's Config (data columns, ID mode and tables, retrieval
      settings with the feature configuration).
    on_tpu: Whether built under a TPUStrategy.
    total_steps: Steps of the run, for decaying learning-rate schedules.
  """

  def __init__(self, config, on_tpu: bool = False, total_steps: int = 0):
    super().__init__()
    data, model, rc = config.data, config.model, config.retrieval
    self._config = config
    self.user_feature, self.item_feature = data.id_columns
    self.spec = features_lib.parse(rc.features, *data.id_columns)
    dtypes = {c: tf.string if data.column_type(c) == "string" else tf.int64
              for c in data.id_columns}
    self._id_dtype = dtypes
    # Side files, joined by ID inside the model.
    self.side = {}
    for source, entry in self.spec.side_files.items():
      cols = sorted({f.col for f in self.spec.query + self.spec.candidate
                     if f.source == source})
      key = self.user_feature if source == "user" else self.item_feature
      self.side[source] = features_lib.SideTable(
          entry["path"], entry.get("key", key), dtypes[key], cols,
          name=f"{source}_side")
    # Lookups and tables: the ID features use the run's tables.
    id_dims = {f.col: f.dim or model.embedding_dim
               for f in self.spec.query + self.spec.candidate if f.type == "id"}
    id_dims.setdefault(self.item_feature, model.embedding_dim)
    self.lookups = {
        t.feature: embedding.IdLookup(t, model.id_mode,
                                      data.column_type(t.feature))
        for t in model.tables if t.feature in id_dims}
    item_table = model.table(self.item_feature)
    tables = [t for t in model.tables if t.feature in id_dims]
    num_rows = {f: l.num_rows for f, l in self.lookups.items()}
    dims = dict(id_dims)
    self.categorical = {}
    for f in self.spec.query + self.spec.candidate:
      if f.type not in ("categorical", "text"):
        continue
      if f.source != "row" and f.type == "categorical":
        tokens = set()
        for v in self.side[f.source].values[f.col]:
          tokens.update(t for t in (str(v).split(f.separator) if f.separator
                                    else [str(v)]) if t)
        lookup = tf_keras.layers.StringLookup(
            vocabulary=sorted(tokens) or ["<none>"], num_oov_indices=1,
            name=f"{f.name}_vocab")
        rows = lookup.vocabulary_size()
      else:
        lookup, rows = None, f.num_bins
      self.categorical[f.name] = lookup
      tables.append(config_lib.TableConfig(
          feature=f.name, num_bins=rows, optimizer=item_table.optimizer,
          learning_rate=item_table.learning_rate,
          initial_accumulator=item_table.initial_accumulator,
          init_stddev=item_table.init_stddev))
      num_rows[f.name] = rows
      dims[f.name] = f.dim or 16
    shared = {f.name: self.item_feature for f in self.spec.query
              if f.type == "history"}
    self.embedding = embedding.EmbeddingTables(
        tables, num_rows, model.embedding_dim, config.train.seed,
        on_tpu=on_tpu,
        num_hashes={f: l.num_hashes for f, l in self.lookups.items()},
        lr_schedule=config.train.lr_schedule, total_steps=total_steps,
        dims=dims, shared=shared, bias_slot=False)
    self.l2 = {t.feature: t.l2 for t in tables if t.l2}
    # Numeric features: standardised, optionally batch-normalised.
    self.numeric_stats, self.batch_norm = {}, {}
    for f in self.spec.query + self.spec.candidate:
      if f.type != "numeric":
        continue
      if f.mean is not None:
        mean, std = f.mean, f.std or 1.0
      elif f.source != "row":
        v = self.side[f.source].values[f.col][:-1]
        mean, std = float(np.mean(v)), float(np.std(v)) or 1.0
      else:
        mean, std = 0.0, 1.0
      self.numeric_stats[f.name] = (mean, std)
      if f.batch_norm:
        self.batch_norm[f.name] = tf_keras.layers.BatchNormalization(
            name=f"{f.name}_bn")
    # Pretrained vectors: from a side file, one row per ID (the last, zeros,
    # for unknown IDs); from the rows, parsed in the model.
    self.pretrained = {}
    for f in self.spec.query + self.spec.candidate:
      if f.type == "pretrained" and f.source != "row":
        vectors = features_lib.parse_vectors(
            self.side[f.source].values[f.col], f.separator)
        self.pretrained[f.name] = tf.Variable(
            vectors, trainable=f.trainable, name=f"{f.name}_pretrained")
    # Recency weights of histories: one log-weight per age.
    self.recency = {}
    for f in self.spec.query:
      if f.type == "history" and f.recency != "none":
        init = np.log(f.decay) * np.arange(f.max_len, dtype=np.float64)
        self.recency[f.name] = self.add_weight(
            name=f"{f.name}_recency", shape=(f.max_len,),
            initializer=tf_keras.initializers.Constant(init.astype(np.float32)),
            trainable=f.recency == "learned")
    seed = config.train.seed
    self.query_tower = Tower(rc.tower_widths, rc.output_dim, rc.l2_normalize,
                             seed, name="query_tower")
    self.candidate_tower = Tower(rc.tower_widths, rc.output_dim,
                                 rc.l2_normalize, seed + 1000,
                                 name="candidate_tower")
    self.log_temperature = self.add_weight(
        name="log_temperature", shape=(),
        initializer=tf_keras.initializers.Constant(np.log(rc.temperature)),
        trainable=rc.learn_temperature)
    self.frequency = (StreamingFrequency(rc.logq_buckets, rc.logq_alpha,
                                         name="item_frequency")
                      if rc.logq == "streaming" else None)
    self.item_probability = None
    if rc.logq == "counts":
      counts = _item_counts(item_table.vocab_file)
      if counts is None:
        raise ValueError(f"--logq=counts: no counts beside {item_table.vocab_file}"
                         " (vocabularies built by this version write them).")
      # OOV rows (first) get the smallest count.
      counts = np.concatenate([np.full(item_table.num_oov, max(counts.min(), 1)),
                               counts])
      self.item_probability = tf.constant(
          (counts / counts.sum()).astype(np.float32))
    self.task = tfrs.tasks.Retrieval(
        loss=tf_keras.losses.CategoricalCrossentropy(
            from_logits=True, reduction=tf_keras.losses.Reduction.NONE),
        remove_accidental_hits=rc.remove_accidental_hits)
    self._global_negatives = rc.global_negatives
    self._catalog = None
    self._mixed = rc.mixed_negatives
    self._seed = config.train.seed
    if self._mixed:
      if model.id_mode != "vocab" and "item" not in self.side:
        raise ValueError("--mixed_negatives needs a catalog when the model is "
                         "built: --id_mode=vocab or an item side file.")
      self._corpus = tf.constant(self.catalog())

  def get_config(self):
    return {"config": self._config.to_dict()}

  def catalog(self) -> np.ndarray:
    """The item IDs retrieved from, sorted: the item vocabulary in vocab
    mode, else the item side file's IDs, else those given by set_catalog."""
    if self._catalog is None:
      model = self._config.model
      if model.id_mode == "vocab":
        lookup = self.lookups[self.item_feature]._vocab  # pylint: disable=protected-access
        ids = np.array(lookup.get_vocabulary()[model.table(
            self.item_feature).num_oov:])
      elif "item" in self.side:
        ids = self.side["item"].keys
      else:
        raise ValueError("No catalog: in hash mode without an item side "
                         "file, the trainer sets it from the training rows.")
      self._catalog = np.sort(ids.astype(object) if ids.dtype.kind in "OUS"
                              else ids.astype(np.int64))
    return self._catalog

  def set_catalog(self, item_ids: np.ndarray) -> None:
    self._catalog = np.sort(item_ids)

  # Features -> tower inputs.

  def _values(self, f, features, side) -> tf.Tensor:
    if f.source == "row":
      return features[f.col]
    return side[f.source][f.col]

  def _side(self, features, tower: str):
    out = {}
    for source, table in self.side.items():
      key = self.user_feature if source == "user" else self.item_feature
      if key in features and any(f.source == source for f in
                                 getattr(self.spec, tower)):
        out[source] = table(features[key])
    return out

  def _history_ids(self, f, values: tf.Tensor) -> tf.RaggedTensor:
    tokens = features_lib._split(values, "|")[:, -f.max_len:]  # pylint: disable=protected-access
    if self._id_dtype[self.item_feature] == tf.string:
      return tokens
    return tf.strings.to_number(tokens, tf.int64)

  def _rows(self, tower: str, features) -> Tuple[Dict, Dict]:
    """Table rows (and weights) of a tower's embedded features."""
    side = self._side(features, tower)
    rows, weights = {}, {}
    for f in getattr(self.spec, tower):
      if f.type == "id":
        rows[f.col] = self.lookups[f.col](features[f.col])
      elif f.type == "history":
        ids = self._history_ids(f, self._values(f, features, side))
        lookup = self.lookups[self.item_feature]
        rows[f.name] = [ids.with_flat_values(r) for r in
                        lookup(ids.flat_values)]
        lengths = ids.row_lengths()
        if f.name in self.recency:
          weights[f.name] = features_lib.recency_weights(
              lengths, self.recency[f.name], f.max_len)
        else:
          weights[f.name] = ids.with_flat_values(tf.repeat(
              1.0 / tf.cast(tf.maximum(lengths, 1), tf.float32), lengths))
      elif f.type in ("categorical", "text"):
        values = self._values(f, features, side)
        if values.dtype != tf.string:
          values = tf.strings.as_string(values)
        if f.type == "text":
          tokens = features_lib.text_tokens(values)
        elif f.separator:
          tokens = features_lib._split(values, f.separator)  # pylint: disable=protected-access
        else:
          tokens = tf.RaggedTensor.from_tensor(values[:, None])
        lookup = self.categorical[f.name]
        flat = (lookup(tokens.flat_values) if lookup is not None else
                tf.strings.to_hash_bucket_fast(tokens.flat_values, f.num_bins))
        rows[f.name] = [tokens.with_flat_values(tf.cast(flat, tf.int32))]
        lengths = tokens.row_lengths()
        weights[f.name] = tokens.with_flat_values(tf.repeat(
            1.0 / tf.cast(tf.maximum(lengths, 1), tf.float32), lengths))
    return rows, weights, side

  def _dense_inputs(self, tower: str, features, side, emb, training) -> tf.Tensor:
    parts = []
    for f in getattr(self.spec, tower):
      if f.type in ("id", "history", "categorical", "text"):
        parts.append(emb[f.col if f.type == "id" else f.name])
      elif f.type == "pretrained" and f.source != "row":
        parts.append(tf.gather(self.pretrained[f.name],
                               side[f.source]["__index__"]))
      elif f.type == "pretrained":
        tokens = features_lib._split(features[f.col], f.separator or " ")  # pylint: disable=protected-access
        parts.append(tf.strings.to_number(tokens, tf.float32).to_tensor(
            shape=[None, f.dim]))
      elif f.type == "numeric":
        x = tf.cast(self._values(f, features, side), tf.float32)[:, None]
        mean, std = self.numeric_stats[f.name]
        x = (x - mean) / std
        if f.name in self.batch_norm:
          x = self.batch_norm[f.name](x, training=training)
        parts.append(x)
      elif f.type == "cyclical":
        parts.append(features_lib.cyclical(self._values(f, features, side),
                                           f.period))
    return tf.concat(parts, axis=1)

  def towers(self, features: Dict[str, tf.Tensor], training: bool = False,
             which: Tuple[str, ...] = ("query", "candidate")
             ) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
    """Raw features -> ({tower: [B, output_dim]}, embedded rows)."""
    rows, weights, sides = {}, {}, {}
    for tower in which:
      r, w, sides[tower] = self._rows(tower, features)
      rows.update(r)
      weights.update(w)
    emb = self.embedding(rows, weights)
    out = {}
    for tower in which:
      x = self._dense_inputs(tower, features, sides[tower], emb, training)
      net = self.query_tower if tower == "query" else self.candidate_tower
      out[tower] = net(x)
    return out, emb

  def query_embedding(self, features, training: bool = False) -> tf.Tensor:
    """Raw query features -> [B, output_dim]."""
    return self.towers(features, training, ("query",))[0]["query"]

  def candidate_embedding(self, item_ids: tf.Tensor) -> tf.Tensor:
    """Raw item IDs [N] -> [N, output_dim] (item features joined by ID)."""
    return self.towers({self.item_feature: item_ids}, False,
                       ("candidate",))[0]["candidate"]

  @property
  def temperature(self) -> tf.Tensor:
    return tf.exp(self.log_temperature)

  def call(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
    """Scores of each row's query against its own item: [B]."""
    out, _ = self.towers(features)
    return tf.reduce_sum(out["query"] * out["candidate"], axis=1)

  # Training.

  def _global(self, *tensors):
    """The global batch's tensors, this replica's rows first.

    Under several replicas each query is scored against every replica's
    candidates (the gradients flow back through the gather). Rolling puts
    the replica's own candidates first, where the task's labels (an
    identity matrix) expect them.
    """
    ctx = tf.distribute.get_replica_context()
    if (not self._global_negatives or ctx is None or
        ctx.num_replicas_in_sync == 1):
      return tensors
    local = tf.shape(tensors[0])[0]
    shift = -tf.cast(ctx.replica_id_in_sync_group, tf.int32) * local
    return tuple(tf.roll(ctx.all_gather(t, axis=0), shift, axis=0)
                 for t in tensors)

  def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
    features, _ = inputs  # Every row is a positive; negatives are in-batch.
    out, emb = self.towers(features, training)
    ids = features[self.item_feature]
    query = out["query"] / self.temperature
    candidates, cand_ids = self._global(out["candidate"], ids)
    probability = None
    if self.frequency is not None:
      probability = self.frequency.probability(cand_ids)
      if training:
        self.frequency.update(cand_ids, self.optimizer.iterations)
    elif self.item_probability is not None:
      rows = self.lookups[self.item_feature](cand_ids)[0]
      probability = tf.gather(self.item_probability, rows)
    if self._mixed:
      candidates, cand_ids, probability = self._with_mixed_negatives(
          candidates, cand_ids, probability, training)
    per_example = self.task(query, candidates, compute_metrics=False,
                            candidate_sampling_probability=probability,
                            candidate_ids=cand_ids)
    for feature, l2 in self.l2.items():
      if feature in emb:
        per_example += l2 * tf.reduce_sum(tf.square(emb[feature]), axis=1)
    # Mean over the global batch: each replica divides by it, the optimizer
    # sums the replicas' gradients.
    return tf.nn.compute_average_loss(per_example)

  def _with_mixed_negatives(self, candidates, ids, probability, training):
    """Appends `mixed_negatives` uniform catalog items to the candidates.

    Drawn from a seed of (run seed, step, replica), so a resumed run draws
    the same items. Each is in a step's sample with probability
    mixed / catalog size, their log(q) when the in-batch ones have one.
    """
    ctx = tf.distribute.get_replica_context()
    replica = tf.cast(ctx.replica_id_in_sync_group if ctx else 0, tf.int64)
    size = tf.shape(self._corpus, out_type=tf.int64)[0]
    seed = tf.stack([tf.cast(self._seed, tf.int64) * 1000003 + replica,
                     tf.cast(self.optimizer.iterations, tf.int64)])
    rows = tf.random.stateless_uniform([self._mixed], seed, 0, size,
                                       dtype=tf.int64)
    extra_ids = tf.gather(self._corpus, rows)
    extra = self.towers({self.item_feature: extra_ids}, training,
                        ("candidate",))[0]["candidate"]
    if probability is not None:
      probability = tf.concat([probability, tf.fill(
          [self._mixed], self._mixed / tf.cast(size, tf.float32))], axis=0)
    return (tf.concat([candidates, extra], axis=0),
            tf.concat([ids, extra_ids], axis=0), probability)

  def train_step(self, inputs):
    return embedding.sparse_train_step(self, inputs)

  def test_step(self, inputs):
    return {"loss": self.compute_loss(inputs, training=False)}
