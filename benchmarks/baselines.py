"""Classical top-K baselines (popularity, EASE, iALS) exposing score_fn, and validation tuning."""

import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from trainer.metrics import ranking as ranking_metrics


def _check_interactions(train_users, train_items, num_users: int,
                        num_items: int) -> Tuple[np.ndarray, np.ndarray]:
  """Returns int64 copies of the training indices after range checks."""
  users = np.asarray(train_users, dtype=np.int64)
  items = np.asarray(train_items, dtype=np.int64)
  if users.shape != items.shape or users.ndim != 1:
    raise ValueError("train_users and train_items must be 1-D, same length")
  if users.size and (users.min() < 0 or users.max() >= num_users or
                     items.min() < 0 or items.max() >= num_items):
    raise ValueError("training indices out of range")
  return users, items


def _binary_matrix(users: np.ndarray, items: np.ndarray, num_users: int,
                   num_items: int, value: float = 1.0):
  """CSR [num_users, num_items] with `value` at each distinct (user, item)."""
  import scipy.sparse  # pylint: disable=g-import-not-at-top
  keys = np.unique(users * num_items + items)
  return scipy.sparse.csr_matrix(
      (np.full(len(keys), value, dtype=np.float32),
       (keys // num_items, keys % num_items)),
      shape=(num_users, num_items))


class Popularity:
  """Most-popular baseline: every user gets the same item scores.

  score(u, i) = number of training interactions with item i (repeats count).
  The floor any personalised model should clear; see e.g. Cremonesi, Koren,
  Turrin, "Performance of recommender algorithms on top-N recommendation
  tasks", RecSys 2010.
  """

  def __init__(self):
    self.item_counts = None

  def fit(self, train_users, train_items, num_users: int,
          num_items: int) -> "Popularity":
    """Counts interactions per item.

    Args:
      train_users: int [T] user indices in [0, num_users).
      train_items: int [T] item indices in [0, num_items).
      num_users: number of users.
      num_items: catalog size.

    Returns:
      self.
    """
    _, items = _check_interactions(train_users, train_items, num_users,
                                   num_items)
    self.item_counts = np.bincount(items, minlength=num_items).astype(
        np.float32)
    return self

  def score_fn(self, user_idx: np.ndarray) -> np.ndarray:
    """float32 [len(user_idx), num_items]: the item counts on every row."""
    return np.repeat(self.item_counts[None, :], len(user_idx), axis=0)


class EASE:
  """EASE^R: a closed-form item-item linear autoencoder with a zero diagonal.

  Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019.
  With binary X [users, items] and P = (X^T X + l2 I)^-1, the weights are
  B = I - P diag(1/diag(P)), which has diag(B) = 0, and score(u) = X_u B.
  The inverse is float64 and dense, so memory is ~8 * num_items^2 bytes
  during the fit (num_items = 20k: 3.2 GB) and time O(num_items^3).
  """

  def __init__(self, l2: float = 100.0):
    """Args: l2: the ridge penalty lambda added to the Gram diagonal."""
    self.l2 = float(l2)
    self.weights = None  # B, float32 [num_items, num_items].
    self._x = None

  def fit(self, train_users, train_items, num_users: int,
          num_items: int) -> "EASE":
    """Solves for B in closed form.

    Args:
      train_users: int [T] user indices in [0, num_users).
      train_items: int [T] item indices in [0, num_items); repeats count once.
      num_users: number of users.
      num_items: catalog size.

    Returns:
      self.
    """
    users, items = _check_interactions(train_users, train_items, num_users,
                                       num_items)
    self._x = _binary_matrix(users, items, num_users, num_items)
    gram = (self._x.T @ self._x).toarray().astype(np.float64)
    gram[np.diag_indices(num_items)] += self.l2
    p = np.linalg.inv(gram)
    b = p / -np.diag(p)[None, :]  # B_ij = -P_ij / P_jj off the diagonal.
    b[np.diag_indices(num_items)] = 0.0
    # float32 halves memory and scoring time; the precision that matters was
    # in the inverse.
    self.weights = b.astype(np.float32)
    return self

  def score_fn(self, user_idx: np.ndarray) -> np.ndarray:
    """float32 [len(user_idx), num_items]: X[user_idx] @ B."""
    return np.asarray(self._x[user_idx] @ self.weights, dtype=np.float32)


class RecencyEASE(EASE):
  """EASE scored from a recency-weighted profile: a sequence-aware baseline.

  The item-item weights B are EASE's; a user's profile weights each of their
  training items by decay^(its position from the end in time order) (the
  latest 1, the one before decay, ...) instead of 1, so score(u) = w_u B
  leans on what the user took last. decay = 1 is EASE.

  Args:
    l2: EASE's ridge penalty.
    decay: Weight ratio between consecutive items of a profile.
    timestamps: float [T] event time of each training interaction, aligned
      with the train_users/train_items passed to fit (ties: log order).
  """

  def __init__(self, l2: float, decay: float, timestamps: np.ndarray):
    super().__init__(l2)
    self.decay = float(decay)
    self._times = np.asarray(timestamps)

  def fit(self, train_users, train_items, num_users: int,
          num_items: int) -> "RecencyEASE":
    super().fit(train_users, train_items, num_users, num_items)
    import scipy.sparse  # pylint: disable=g-import-not-at-top
    users = np.asarray(train_users, np.int64)
    items = np.asarray(train_items, np.int64)
    order = np.lexsort((np.arange(len(users)), self._times, users))
    u = users[order]
    # Position from the end of each user's run of rows.
    run_end = np.r_[np.flatnonzero(u[1:] != u[:-1]), len(u) - 1]
    ends = np.repeat(run_end, np.diff(np.r_[-1, run_end]))
    weights = self.decay ** (ends - np.arange(len(u))).astype(np.float64)
    x = scipy.sparse.coo_matrix(
        (weights.astype(np.float32), (u, items[order])),
        shape=(num_users, num_items)).tocsr()
    x.sum_duplicates()  # A repeated item's weights add up.
    self._x = x
    return self


class IALS:
  """Implicit-feedback ALS (weighted matrix factorisation), via `implicit`.

  Hu, Koren, Volinsky, "Collaborative Filtering for Implicit Feedback
  Datasets", ICDM 2008: minimise sum over all (u, i) of
  c_ui (p_ui - x_u . y_i)^2 + regularization (|x|^2 + |y|^2), with p_ui = 1
  for observed pairs (else 0) and confidence c_ui = 1 + alpha for observed
  pairs (else 1). implicit (CPU, conjugate-gradient solver) takes the matrix
  value as c_ui itself, so the matrix handed to it holds 1 + alpha.
  score(u, i) = x_u . y_i; a user with no training rows scores 0 everywhere.
  """

  def __init__(self, factors: int = 128, regularization: float = 0.01,
               iterations: int = 15, alpha: float = 1.0, seed: int = 0,
               num_threads: int = 2):
    """Args are the paper's and implicit's; num_threads=2 fits this machine."""
    self.factors = int(factors)
    self.regularization = float(regularization)
    self.iterations = int(iterations)
    self.alpha = float(alpha)
    self.seed = int(seed)
    self.num_threads = int(num_threads)
    self.user_factors = None  # float32 [num_users, factors].
    self.item_factors = None  # float32 [num_items, factors].

  def fit(self, train_users, train_items, num_users: int,
          num_items: int) -> "IALS":
    """Runs `iterations` ALS sweeps.

    Args:
      train_users: int [T] user indices in [0, num_users).
      train_items: int [T] item indices in [0, num_items); repeats count once.
      num_users: number of users.
      num_items: catalog size.

    Returns:
      self.
    """
    # Imported here so Popularity and EASE work without implicit installed.
    import implicit.cpu.als  # pylint: disable=g-import-not-at-top
    import threadpoolctl  # pylint: disable=g-import-not-at-top
    users, items = _check_interactions(train_users, train_items, num_users,
                                       num_items)
    confidence = _binary_matrix(users, items, num_users, num_items,
                                value=1.0 + self.alpha)
    # implicit parallelises over users itself; a multi-threaded BLAS inside
    # each of its threads oversubscribes the cores (its constructor warns).
    with threadpoolctl.threadpool_limits(1, "blas"):
      model = implicit.cpu.als.AlternatingLeastSquares(
          factors=self.factors, regularization=self.regularization,
          alpha=1.0, iterations=self.iterations, random_state=self.seed,
          num_threads=self.num_threads)
      model.fit(confidence, show_progress=False)
    self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
    self.item_factors = np.asarray(model.item_factors, dtype=np.float32)
    return self

  def score_fn(self, user_idx: np.ndarray) -> np.ndarray:
    """float32 [len(user_idx), num_items]: user_factors @ item_factors^T."""
    return self.user_factors[user_idx] @ self.item_factors.T


def tune_on_validation(
    make_model: Callable[[Any], Any], grid: Sequence[Any], train_users,
    train_items, val_users, val_items, num_users: int, num_items: int,
    metric: str = "ndcg@10", ks: Sequence[int] = (10,),
    user_chunk: int = 1024) -> Tuple[Any, List[Dict[str, Any]]]:
  """Picks the grid value whose model scores best on the validation pairs.

  Each model is fitted on the training pairs only and scored with
  full_catalog_metrics on (val_users, val_items), training items excluded;
  test pairs are never seen. Ties go to the earliest grid value.

  Args:
    make_model: param -> unfitted model with fit(train_users, train_items,
      num_users, num_items) and score_fn, e.g. `lambda l2: EASE(l2)`.
    grid: candidate params.
    train_users: int [T] training user indices.
    train_items: int [T] training item indices.
    val_users: int [V] validation users (-1: cannot be scored).
    val_items: int [V] validation items (-1: not in the catalog).
    num_users: number of users.
    num_items: catalog size.
    metric: key of full_catalog_metrics to maximise.
    ks: cut-offs computed (must produce `metric`).
    user_chunk: users per score_fn call.

  Returns:
    (best_param, table): table has one dict per grid value, in grid order,
    with "param", the metrics, "fit_seconds" and "eval_seconds".
  """
  if not grid:
    raise ValueError("empty grid")
  table = []
  for param in grid:
    start = time.perf_counter()
    model = make_model(param).fit(train_users, train_items, num_users,
                                  num_items)
    fitted = time.perf_counter()
    row = ranking_metrics.full_catalog_metrics(
        model.score_fn, train_users, train_items, val_users, val_items,
        num_items, ks=ks, user_chunk=user_chunk)
    if metric not in row:
      raise ValueError(f"metric {metric!r} not among {sorted(row)}")
    table.append({"param": param, **row, "fit_seconds": fitted - start,
                  "eval_seconds": time.perf_counter() - fitted})
  best = max(range(len(table)), key=lambda j: (table[j][metric], -j))
  return table[best]["param"], table
