"""Matrix factorization as a tfrs.models.Model: ID lookups, tables and a Ranking task."""

from typing import Dict, Tuple

import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from trainer import embedding
from trainer import kernels


class SigmoidMean(tf_keras.metrics.Mean):
  """Mean predicted probability, from logits."""

  def update_state(self, logits, sample_weight=None):
    return super().update_state(tf.sigmoid(logits), sample_weight)


def _ranking_task() -> tfrs.tasks.Ranking:
  # reduction=NONE: the model averages per-example losses over the *global*
  # batch itself (see compute_loss), which Keras' default SUM_OVER_BATCH_SIZE
  # would get wrong under a multi-replica strategy.
  return tfrs.tasks.Ranking(
      loss=tf_keras.losses.BinaryCrossentropy(
          from_logits=True, reduction=tf_keras.losses.Reduction.NONE),
      metrics=[
          tf_keras.metrics.AUC(from_logits=True, num_thresholds=1000,
                               name="auc"),
          tf_keras.metrics.AUC(from_logits=True, curve="PR",
                               num_thresholds=1000, name="pr_auc"),
          tf_keras.metrics.BinaryCrossentropy(from_logits=True,
                                              name="log_loss"),
          tf_keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"),
      ],
      prediction_metrics=[SigmoidMean(name="prediction_mean")],
      label_metrics=[tf_keras.metrics.Mean(name="label_mean")])


class MatrixFactorization(tfrs.models.Model):
  """score = sigmoid(<u[:-1], v[:-1]> + u[-1] + v[-1] + global bias).

  Args:
    config: The run's Config (data: ID columns and types; model: ID mode and
      tables; train: dense optimizer and seed).
    on_tpu: Whether built under a TPUStrategy.
    total_steps: Steps of the run, for decaying learning-rate schedules.
  """

  def __init__(self, config, on_tpu: bool = False, total_steps: int = 0):
    super().__init__()
    data, model = config.data, config.model
    self.user_feature, self.item_feature = data.id_columns
    self.lookups = {
        t.feature: embedding.IdLookup(t, model.id_mode,
                                      data.column_type(t.feature))
        for t in model.tables}
    self.embedding = embedding.EmbeddingTables(
        model.tables, {f: l.num_rows for f, l in self.lookups.items()},
        model.embedding_dim, config.train.seed, on_tpu=on_tpu,
        num_hashes={f: l.num_hashes for f, l in self.lookups.items()},
        lr_schedule=config.train.lr_schedule, total_steps=total_steps)
    self.l2 = {t.feature: t.l2 for t in model.tables}
    self.global_bias = self.add_weight(
        name="global_bias", shape=(), initializer="zeros", trainable=True)
    self._config = config
    self.task = _ranking_task()

  def get_config(self):
    return {"config": self._config.to_dict()}

  def embed(self, features: Dict[str, tf.Tensor],
            fused: bool = False) -> Dict[str, tf.Tensor]:
    """Raw IDs `{feature: [B]}` -> rows with bias slot `{feature: [B, d+1]}`
    (`fused`: with the fused CPU gather, in training)."""
    rows = {f: lookup(features[f]) for f, lookup in self.lookups.items()}
    return self.embedding(rows, fused=fused)

  def vectors(self, feature: str, ids: tf.Tensor) -> tf.Tensor:
    """Rows of one feature for raw IDs: [N, dim + 1], last column the bias.

    Reads the table variable directly (off TPU, or after training), so a
    catalog can be scored without going through the training lookup path.
    """
    table = self.embedding.tables()[feature]
    return tf.add_n([tf.gather(table, rows)
                     for rows in self.lookups[feature](ids)])

  def score_logits(self, emb: Dict[str, tf.Tensor],
                   fused: bool = False) -> tf.Tensor:
    """<u[:-1], v[:-1]> + u[-1] + v[-1] + global bias, per row: [B].

    With `fused`, one CPU kernel computes it (and one its gradient;
    trainer/kernels.cc), for training; exports and evaluation use the
    TensorFlow ops below. Those are written with a mask over the slots
    instead of slices: the gradient of a slice is a zero-filled copy of the
    batch's rows, which cost more than the dot product itself.
    """
    u, v = emb[self.user_feature], emb[self.item_feature]
    if fused:
      return kernels.biased_dot(u, v) + self.global_bias
    bias_slot = tf.one_hot(tf.shape(u)[1] - 1, tf.shape(u)[1], dtype=u.dtype)
    # u . (v on the factors, 1 on the bias slot) + v's bias slot.
    return (tf.reduce_sum(u * (v * (1.0 - bias_slot) + bias_slot) +
                          v * bias_slot, axis=1) + self.global_bias)

  def call(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
    """Returns logits [B] for `{user: [B], item: [B]}` raw IDs."""
    return self.score_logits(self.embed(features))

  def compute_loss(self, inputs: Tuple[Dict[str, tf.Tensor], tf.Tensor],
                   training: bool = False) -> tf.Tensor:
    features, labels = inputs
    # In training on a CPU the lookup, the score and their gradients run as
    # fused kernels (trainer/kernels.cc); exports and evaluation never do.
    fused = training and kernels.usable_here()  # Never on TPUs.
    emb = self.embed(features, fused=fused)
    logits = self.score_logits(emb, fused=fused)
    # Keras losses average over the last axis: [B, 1] keeps one loss per row.
    per_example = self.task(labels[:, None], logits[:, None],
                            training=training, compute_metrics=not training)
    for feature, l2 in self.l2.items():
      if l2:  # Only the rows this batch uses are penalised.
        per_example += l2 * tf.reduce_sum(tf.square(emb[feature]), axis=1)
    # Each replica divides by the global batch; the optimizer sums replicas'
    # gradients, which makes the mean over the global batch.
    return tf.nn.compute_average_loss(per_example)

  # Traced as written, without AutoGraph: nothing in the step branches or
  # loops on tensors, and converting it took 0.5-0.9 s of the 1.2-1.5 s a
  # run spends tracing its training function. (The two-tower step needs
  # AutoGraph: TFRS' Retrieval task is written for it.)
  @tf.autograph.experimental.do_not_convert
  def train_step(self, inputs):
    return embedding.sparse_train_step(self, inputs)

  def test_step(self, inputs):
    self.compute_loss(inputs, training=False)
    return {m.name: m.result() for m in self.metrics}
