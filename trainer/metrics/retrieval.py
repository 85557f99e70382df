"""Full-catalog Recall@K, NDCG@K and MRR of embedding models, in bounded memory.

Scores are never held for the whole catalog: candidates come in chunks, and
each block of queries keeps a running top-K and a running count of the
candidates that beat its held-out item. Memory is O(query_block * chunk +
queries * K), whatever the catalog size; time is one pass of matrix products
(plus a cheap first pass for the held-out items' own scores).

Ranks follow trainer.metrics.ranking exactly (pessimistic ties: every other
candidate scoring >= the held-out item counts above it; a NaN score beats it;
seen items are not candidates; an item outside the catalog is a miss), so the
numbers equal full_catalog_metrics on the same scores (up to the rounding of
scores summed in another order, which can only move exact ties).
"""

from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np

_MISS = np.iinfo(np.int64).max
Candidates = Union[np.ndarray, Callable[[int, int], np.ndarray]]


def _chunk(candidates: Candidates, start: int, end: int) -> np.ndarray:
  if callable(candidates):
    return np.asarray(candidates(start, end), np.float32)
  return np.asarray(candidates[start:end], np.float32)


def streaming_metrics(queries: np.ndarray, candidates: Candidates,
                      num_candidates: int, targets: np.ndarray,
                      seen_queries: np.ndarray, seen_items: np.ndarray,
                      ks: Sequence[int] = (10, 50, 100), chunk: int = 65536,
                      query_block: Optional[int] = None,
                      return_top: bool = False) -> Dict[str, object]:
  """Ranks each query's held-out item against the whole catalog.

  Args:
    queries: float [Q, d] query embeddings.
    candidates: float [N, d] candidate embeddings, or a function (start, end)
      -> [end - start, d] that makes them chunk by chunk (e.g. the candidate
      tower), so they never all sit in memory.
    num_candidates: N.
    targets: int [Q] catalog index of each query's held-out item (-1: not in
      the catalog, a miss).
    seen_queries, seen_items: int [S] pairs (query, catalog index) that are
      not candidates for that query (e.g. its user's training items).
    ks: Cut-offs.
    chunk: Candidates scored at a time.
    query_block: Queries scored at a time (default: ~32M scores per block).
    return_top: Also return "top_items" [Q, max(ks)] (catalog indices, best
      first, seen items excluded) and "top_scores".

  Returns:
    {"recall@K", "ndcg@K" for each K, "mrr", "num_eval"} averaged over the Q
    queries, plus the top lists if asked.
  """
  queries = np.asarray(queries, np.float32)
  targets = np.asarray(targets, np.int64)
  num_q = len(queries)
  k_max = max(ks)
  block = query_block or max(1, (1 << 25) // max(1, chunk))
  # Seen pairs sorted by query, then item, to slice them per block and chunk.
  order = np.lexsort((seen_items, seen_queries))
  seen_q = np.asarray(seen_queries, np.int64)[order]
  seen_i = np.asarray(seen_items, np.int64)[order]
  valid = (targets >= 0) & (targets < num_candidates)

  # Pass 1: each query's score for its held-out item.
  target_score = np.full(num_q, np.nan, np.float32)
  by_target = np.argsort(np.where(valid, targets, num_candidates),
                         kind="stable")
  sorted_targets = np.where(valid, targets, num_candidates)[by_target]
  for start in range(0, num_candidates, chunk):
    end = min(start + chunk, num_candidates)
    lo, hi = np.searchsorted(sorted_targets, [start, end])
    if lo == hi:
      continue
    emb = _chunk(candidates, start, end)
    q = by_target[lo:hi]
    target_score[q] = np.einsum("qd,qd->q", queries[q],
                                emb[targets[q] - start])
  # Pass 2: counts of candidates at or above the held-out item, and top-K.
  above = np.zeros(num_q, np.int64)
  top_s = np.full((num_q, k_max), -np.inf, np.float32)
  top_i = np.full((num_q, k_max), -1, np.int64)
  for start in range(0, num_candidates, chunk):
    end = min(start + chunk, num_candidates)
    emb = _chunk(candidates, start, end)
    for q0 in range(0, num_q, block):
      q1 = min(q0 + block, num_q)
      scores = queries[q0:q1] @ emb.T
      lo, hi = np.searchsorted(seen_q, [q0, q1])
      sq, si = seen_q[lo:hi], seen_i[lo:hi]
      inside = (si >= start) & (si < end)
      rows, cols = sq[inside] - q0, si[inside] - start
      t = target_score[q0:q1, None]
      # ~(s < t): s >= t, and True for a NaN s (pessimistic).
      beats = ~(scores < t)
      beats[rows, cols] = False  # Seen items are not candidates.
      # Nor is the held-out item itself (its score here may differ from
      # pass 1's in the last bit: never count it).
      mine = np.flatnonzero((targets[q0:q1] >= start) &
                            (targets[q0:q1] < end))
      beats[mine, targets[q0 + mine] - start] = False
      above[q0:q1] += np.count_nonzero(beats, axis=1)
      scores[rows, cols] = -np.inf
      scores = np.where(np.isnan(scores), -np.inf, scores)
      take = min(k_max, end - start)
      part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
      merged_s = np.concatenate(
          [top_s[q0:q1], np.take_along_axis(scores, part, 1)], axis=1)
      merged_i = np.concatenate([top_i[q0:q1], part + start], axis=1)
      best = np.argsort(-merged_s, axis=1, kind="stable")[:, :k_max]
      top_s[q0:q1] = np.take_along_axis(merged_s, best, 1)
      top_i[q0:q1] = np.take_along_axis(merged_i, best, 1)
  ranks = above
  ranks[~valid | np.isnan(target_score)] = _MISS
  gains = 1.0 / np.log2(ranks.astype(np.float64) + 2.0)
  out: Dict[str, object] = {}
  for k in ks:
    hit = ranks < k
    out[f"recall@{k}"] = float(np.mean(hit)) if num_q else 0.0
    out[f"ndcg@{k}"] = float(np.mean(np.where(hit, gains, 0.0))) if num_q else 0.0
  out["mrr"] = float(np.mean(1.0 / (ranks.astype(np.float64) + 1))) if num_q else 0.0
  out["num_eval"] = num_q
  if return_top:
    out["top_items"] = top_i
    out["top_scores"] = top_s
  return out
