"""Streaming full-catalog metrics equal the exact ones, in bounded memory."""

import numpy as np
import tensorflow as tf

from trainer.metrics import ranking as ranking_metrics
from trainer.metrics import retrieval as retrieval_metrics


class StreamingMetricsTest(tf.test.TestCase):

  def test_equals_full_catalog_metrics_with_seen_items_and_ties(self):
    rng = np.random.default_rng(0)
    num_q, num_items, dim = 300, 1037, 8
    # Small integers: many exact ties (which must count pessimistically), and
    # scores exact in float32 whatever order a product sums in.
    queries = rng.integers(-3, 4, (num_q, dim)).astype(np.float32)
    items = rng.integers(-3, 4, (num_items, dim)).astype(np.float32)
    items[5] = items[6]
    targets = rng.integers(0, num_items, num_q)
    targets[:3] = -1  # Outside the catalog: misses.
    targets[3:10] = 5
    seen_q = rng.integers(0, num_q, 4000)
    seen_i = rng.integers(0, num_items, 4000)
    seen_q[:5], seen_i[:5] = np.arange(10, 15), targets[10:15]  # Seen targets.
    exact = ranking_metrics.full_catalog_metrics(
        lambda u: queries[u] @ items.T, seen_q, seen_i, np.arange(num_q),
        targets, num_items, ks=(1, 10, 50), with_mrr=True, user_chunk=64)
    calls = []

    def make(start, end):
      calls.append((start, end))
      return items[start:end]

    got = retrieval_metrics.streaming_metrics(
        queries, make, num_items, targets, seen_q, seen_i, ks=(1, 10, 50),
        chunk=100, query_block=37, return_top=True)
    for k in (1, 10, 50):
      self.assertAlmostEqual(got[f"recall@{k}"], exact[f"hr@{k}"], places=12)
      self.assertAlmostEqual(got[f"ndcg@{k}"], exact[f"ndcg@{k}"], places=12)
    self.assertAlmostEqual(got["mrr"], exact["mrr"], places=12)
    self.assertGreater(got["recall@50"], 0.0)
    self.assertLessEqual(max(e - s for s, e in calls), 100)  # Chunks only.
    # Top lists: the best unseen items, as a full sort gives them.
    scores = queries @ items.T
    scores[seen_q, seen_i] = -np.inf
    for q in (0, 17, 299):
      want = np.sort(scores[q])[::-1][:50]
      self.assertAllClose(got["top_scores"][q], want, atol=1e-5)
      self.assertAllClose(scores[q, got["top_items"][q]], want, atol=1e-5)

  def test_a_perfect_and_a_hopeless_scorer(self):
    items = np.eye(4, dtype=np.float32)
    out = retrieval_metrics.streaming_metrics(
        items[[0, 1]], items, 4, np.array([0, 1]), np.array([], int),
        np.array([], int), ks=(1,), chunk=3)
    self.assertEqual(out["recall@1"], 1.0)
    self.assertEqual(out["mrr"], 1.0)
    # All scores tie: pessimistic rank 3 of 4 -> MRR 1/4, no hit at 1.
    out = retrieval_metrics.streaming_metrics(
        np.zeros((1, 4), np.float32), items, 4, np.array([2]),
        np.array([], int), np.array([], int), ks=(1,), chunk=3)
    self.assertEqual(out["recall@1"], 0.0)
    self.assertAlmostEqual(out["mrr"], 0.25)


if __name__ == "__main__":
  tf.test.main()
