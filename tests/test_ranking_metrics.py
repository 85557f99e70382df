"""Tests for trainer.ranking_metrics and benchmarks.baselines, on hand-computed rankings."""

import math

import numpy as np
import pytest

from trainer.metrics import ranking as rm


def _table_scorer(table):
  """score_fn over a fixed [num_users, num_items] table; rejects user -1."""
  table = np.asarray(table, dtype=np.float32)

  def score_fn(user_idx):
    assert np.all(user_idx >= 0), "an unscorable user reached score_fn"
    return table[user_idx]

  return score_fn


# Two users, five items. Scores fall with the item index for user 0.
_SCORES = [[0.9, 0.8, 0.7, 0.6, 0.5],
           [0.1, 0.5, 0.4, 0.3, 0.2]]
# User 0 saw items 0 and 1 in training, user 1 saw item 1.
_TRAIN_USERS = [0, 0, 1]
_TRAIN_ITEMS = [0, 1, 1]


def test_seen_item_exclusion_changes_the_rank():
  # (u0, item 3), score 0.6. Candidates: items 2 (0.7) and 4 (0.5); items 0
  # and 1 were seen. Only item 2 is >= 0.6, so rank = 1 (it would be 3 with
  # the seen items 0 and 1 counted).
  # (u1, item 2), score 0.4. Candidates: 0 (0.1), 3 (0.3), 4 (0.2); item 1
  # (0.5) was seen. None is >= 0.4, so rank = 0 (1 without the exclusion).
  got = rm.full_catalog_metrics(_table_scorer(_SCORES), _TRAIN_USERS,
                                _TRAIN_ITEMS, [0, 1], [3, 2], num_items=5,
                                ks=(1, 2))
  # HR@1 = (0 + 1) / 2; HR@2 = (1 + 1) / 2.
  # NDCG@1 = (0 + 1/log2(0 + 2)) / 2 = 0.5;
  # NDCG@2 = (1/log2(1 + 2) + 1/log2(0 + 2)) / 2 = (1/log2(3) + 1) / 2.
  assert got["hr@1"] == 0.5
  assert got["hr@2"] == 1.0
  assert got["ndcg@1"] == 0.5
  assert got["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 2)
  assert got["num_eval"] == 2


def test_without_training_items_nothing_is_excluded():
  # Same pairs, empty training set: u0/item 3 has items 0, 1, 2 above it,
  # rank 3; u1/item 2 has item 1 above it, rank 1.
  got = rm.full_catalog_metrics(_table_scorer(_SCORES), [], [], [0, 1],
                                [3, 2], num_items=5, ks=(1, 2, 4))
  assert got["hr@1"] == 0.0
  assert got["hr@2"] == 0.5  # Only u1 (rank 1).
  assert got["hr@4"] == 1.0
  # NDCG@4 = (1/log2(3 + 2) + 1/log2(1 + 2)) / 2.
  assert got["ndcg@4"] == pytest.approx(
      (1 / math.log2(5) + 1 / math.log2(3)) / 2)


def test_held_out_item_that_is_also_a_training_item_is_still_ranked():
  # (u0, item 0): item 0 is in u0's training items, but the held-out item is
  # never excluded. Candidates: items 2, 3, 4 (item 1 is seen), all below
  # 0.9, so rank = 0.
  got = rm.full_catalog_metrics(_table_scorer(_SCORES), _TRAIN_USERS,
                                _TRAIN_ITEMS, [0], [0], num_items=5, ks=(1,))
  assert got["hr@1"] == 1.0
  assert got["ndcg@1"] == 1.0


def test_ties_are_pessimistic():
  # Constant scores: the four other items all tie with the held-out item,
  # and ties count against it, so rank = 4: a miss at K = 1..4, a hit at 5
  # with NDCG 1/log2(4 + 2).
  constant = _table_scorer([[0.5] * 5])
  got = rm.full_catalog_metrics(constant, [], [], [0], [2], num_items=5,
                                ks=(1, 4, 5))
  assert got["hr@1"] == 0.0
  assert got["hr@4"] == 0.0
  assert got["hr@5"] == 1.0
  assert got["ndcg@5"] == pytest.approx(1 / math.log2(6))
  # Partial tie: item 1 scores 0.5; item 0 (0.9) is above and items 2 and 4
  # (0.5) tie, so rank = 3 (an optimistic rule would give 1).
  partial = _table_scorer([[0.9, 0.5, 0.5, 0.1, 0.5]])
  got = rm.full_catalog_metrics(partial, [], [], [0], [1], num_items=5,
                                ks=(3, 4))
  assert got["hr@3"] == 0.0
  assert got["hr@4"] == 1.0
  assert got["ndcg@4"] == pytest.approx(1 / math.log2(5))
  # A tie with a *seen* item does not count: u0 saw item 0, so rank = 2.
  got = rm.full_catalog_metrics(_table_scorer([[0.5, 0.5, 0.5, 0.1, 0.5]]),
                                [0], [0], [0], [1], num_items=5, ks=(3,))
  assert got["hr@3"] == 1.0
  assert got["ndcg@3"] == pytest.approx(1 / math.log2(4))


def test_unknown_item_and_unknown_user_are_misses():
  # Pairs: (u1, item 2) hits at rank 0 (see the first test); (u0, -1) is an
  # item unseen in training; (-1, 3) a user score_fn cannot score (the
  # scorer asserts it is never asked); (u0, 5) is outside the 5-item
  # catalog. All four count: HR@1 = NDCG@1 = 1/4.
  got = rm.full_catalog_metrics(_table_scorer(_SCORES), _TRAIN_USERS,
                                _TRAIN_ITEMS, [1, 0, -1, 0], [2, -1, 3, 5],
                                num_items=5, ks=(1, 50))
  assert got["hr@1"] == 0.25
  assert got["ndcg@1"] == 0.25
  # K larger than the catalog still cannot turn a miss into a hit.
  assert got["hr@50"] == 0.25
  assert got["num_eval"] == 4


def test_nan_scores_are_pessimistic():
  # A NaN held-out score is a miss; a NaN candidate counts as above.
  nan = float("nan")
  got = rm.full_catalog_metrics(_table_scorer([[nan, 0.1, 0.2],
                                               [0.9, 0.1, 0.2]]), [], [],
                                [0, 1, 1], [0, 0, 2], num_items=3, ks=(1, 2))
  # Ranks: miss; 0; 1 (only item 0's 0.9 is above 0.2).
  assert got["hr@1"] == pytest.approx(1 / 3)
  assert got["hr@2"] == pytest.approx(2 / 3)
  got = rm.full_catalog_metrics(_table_scorer([[0.9, nan, 0.2]]), [], [],
                                [0], [0], num_items=3, ks=(1, 2))
  # Item 1's NaN counts against item 0: rank 1.
  assert got["hr@1"] == 0.0
  assert got["hr@2"] == 1.0


def _item_index_scorer(num_items):
  """score(u, i) = i for every user: a higher item index ranks higher."""
  row = np.arange(num_items, dtype=np.float32)
  return lambda users: np.repeat(row[None, :], len(users), axis=0)


def test_sampled_top_and_bottom_item():
  # 200 items scored by index. Held-out item 199 beats all 99 negatives:
  # rank 0, HR = NDCG = 1. Held-out item 0 is below all 99: rank 99, a miss.
  score_fn = _item_index_scorer(200)
  top = rm.sampled_metrics(score_fn, [], [], [0], [199], num_items=200)
  assert top["sampled_hr@10"] == 1.0
  assert top["sampled_ndcg@10"] == 1.0
  bottom = rm.sampled_metrics(score_fn, [], [], [0], [0], num_items=200)
  assert bottom["sampled_hr@10"] == 0.0
  assert bottom["sampled_ndcg@10"] == 0.0
  both = rm.sampled_metrics(score_fn, [], [], [0, 1], [199, 0],
                            num_items=200, ks=(10, 100))
  assert both["sampled_hr@10"] == 0.5
  # Rank 99 of 100 is a hit at K = 100: NDCG = (1 + 1/log2(101)) / 2.
  assert both["sampled_hr@100"] == 1.0
  assert both["sampled_ndcg@100"] == pytest.approx(
      (1 + 1 / math.log2(101)) / 2)


def test_sampled_negatives_exclude_training_items():
  # The user saw items 100..199, every item above held-out item 99, so the
  # only candidates are items 0..98 (99 of them), all below 99: rank 0
  # whether 99 or 150 negatives are asked for (the pool has only 99).
  score_fn = _item_index_scorer(200)
  seen = np.arange(100, 200)
  for n in (99, 150):
    got = rm.sampled_metrics(score_fn, np.zeros_like(seen), seen, [0], [99],
                             num_items=200, num_negatives=n, ks=(1,))
    assert got["sampled_hr@1"] == 1.0


def test_sampled_with_the_whole_pool_equals_full_catalog():
  # Asking for at least as many negatives as there are candidates samples
  # every candidate once, so sampled ranks must equal full-catalog ranks:
  # duplicates or a seen item in the sample would break this.
  rng = np.random.default_rng(3)
  num_users, num_items = 12, 30
  table = np.round(rng.random((num_users, num_items)), 1)  # Many ties.
  tu = rng.integers(0, num_users, 80)
  ti = rng.integers(0, num_items, 80)
  eu = rng.integers(0, num_users, 40)
  ei = rng.integers(0, num_items, 40)
  ks = tuple(range(1, num_items + 1))
  full = rm.full_catalog_metrics(_table_scorer(table), tu, ti, eu, ei,
                                 num_items, ks=ks)
  sampled = rm.sampled_metrics(_table_scorer(table), tu, ti, eu, ei,
                               num_items, num_negatives=num_items, ks=ks)
  for k in ks:
    assert sampled[f"sampled_hr@{k}"] == full[f"hr@{k}"]
    assert sampled[f"sampled_ndcg@{k}"] == pytest.approx(full[f"ndcg@{k}"])


def test_sampled_negatives_are_uniform():
  # Held-out item 500 of 1000, scored by index, no training items: the
  # number of the 99 negatives above it is hypergeometric with mean
  # 99 * 499 / 999 = 49.45 and s.d. ~4.7. E[rank] = sum_{K>=1} P(rank >= K)
  # = sum_{K=1..100} (1 - HR@K). 2000 pairs: s.e. of the mean ~0.1.
  n = 2000
  ks = tuple(range(1, 101))
  got = rm.sampled_metrics(_item_index_scorer(1000), [], [],
                           np.arange(n) % 50, np.full(n, 500),
                           num_items=1000, ks=ks, seed=7)
  mean_rank = sum(1 - got[f"sampled_hr@{k}"] for k in ks)
  assert mean_rank == pytest.approx(99 * 499 / 999, abs=0.6)
  # Another seed draws other negatives.
  other = rm.sampled_metrics(_item_index_scorer(1000), [], [],
                             np.arange(n) % 50, np.full(n, 500),
                             num_items=1000, ks=ks, seed=8)
  assert other != got


def _brute_force_ranks(table, train_users, train_items, eval_users,
                       eval_items, num_items):
  """Reference: one Python loop per pair, straight from the definition."""
  ranks = []
  for u, i in zip(eval_users, eval_items):
    if u < 0 or not 0 <= i < num_items:
      ranks.append(None)
      continue
    seen = {t for tu, t in zip(train_users, train_items) if tu == u}
    ranks.append(sum(1 for j in range(num_items)
                     if j != i and j not in seen and table[u][j] >= table[u][i]))
  return ranks


def test_chunking_invariance_against_brute_force():
  rng = np.random.default_rng(0)
  num_users, num_items = 40, 25
  # One decimal: plenty of ties.
  table = np.round(rng.random((num_users, num_items)), 1).astype(np.float32)
  tu = rng.integers(0, num_users, 300)
  ti = rng.integers(0, num_items, 300)
  # Several pairs per user, some held-out items also in train, some misses.
  eu = rng.integers(0, num_users, 120)
  ei = rng.integers(0, num_items, 120)
  eu[::17] = -1
  ei[::13] = -1
  eu[5], ei[5] = tu[0], ti[0]
  ks = (1, 3, 10, 30)
  ranks = _brute_force_ranks(table, tu, ti, eu, ei, num_items)
  expected = {}
  for k in ks:
    expected[f"hr@{k}"] = np.mean([r is not None and r < k for r in ranks])
    expected[f"ndcg@{k}"] = np.mean(
        [1 / math.log2(r + 2) if r is not None and r < k else 0.0
         for r in ranks])
  results = [rm.full_catalog_metrics(_table_scorer(table), tu, ti, eu, ei,
                                     num_items, ks=ks, user_chunk=chunk)
             for chunk in (1, 7, 1000)]
  assert results[0] == results[1] == results[2]
  for key, value in expected.items():
    assert results[0][key] == pytest.approx(value, rel=1e-12), key
  sampled = [rm.sampled_metrics(_table_scorer(table), tu, ti, eu, ei,
                                num_items, num_negatives=10, ks=ks,
                                user_chunk=chunk)
             for chunk in (1, 7, 1000)]
  assert sampled[0] == sampled[1] == sampled[2]


def test_rejects_bad_input():
  score_fn = _table_scorer(_SCORES)
  with pytest.raises(ValueError, match="shape"):
    rm.full_catalog_metrics(score_fn, [], [], [0], [1], num_items=4)
  with pytest.raises(ValueError, match="training indices"):
    rm.full_catalog_metrics(score_fn, [0], [7], [0], [1], num_items=5)
  with pytest.raises(ValueError, match="no evaluation pairs"):
    rm.full_catalog_metrics(score_fn, [], [], [], [], num_items=5)
  with pytest.raises(ValueError, match="integer"):
    rm.full_catalog_metrics(score_fn, [], [], [0.0], [1], num_items=5)


# --- Baselines ---------------------------------------------------------------


def test_popularity_scores_are_training_counts():
  from benchmarks import baselines  # pylint: disable=g-import-not-at-top
  # Item 2 three times, item 0 twice, item 1 once, item 3 never.
  model = baselines.Popularity().fit([0, 1, 2, 0, 1, 2], [2, 2, 2, 0, 0, 1],
                                     num_users=3, num_items=4)
  scores = model.score_fn(np.array([0, 2]))
  np.testing.assert_array_equal(scores, [[2, 1, 3, 0], [2, 1, 3, 0]])
  assert list(np.argsort(-scores[0], kind="stable")) == [2, 0, 1, 3]


def test_ease_matches_the_closed_form():
  pytest.importorskip("scipy")
  from benchmarks import baselines  # pylint: disable=g-import-not-at-top
  x = np.array([[1, 1, 0, 0],
                [0, 1, 1, 0],
                [1, 0, 1, 1],
                [0, 0, 1, 1],
                [1, 1, 1, 0]], dtype=np.float64)
  users, items = np.nonzero(x)
  l2 = 0.5
  # Duplicated training rows must not change the binary X.
  model = baselines.EASE(l2).fit(np.append(users, users[:3]),
                                 np.append(items, items[:3]), 5, 4)
  p = np.linalg.inv(x.T @ x + l2 * np.eye(4))
  b = np.eye(4) - p @ np.diag(1 / np.diag(p))
  assert np.allclose(np.diag(b), 0)
  np.testing.assert_allclose(model.weights, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.score_fn(np.array([3, 0])),
                             x[[3, 0]] @ b, rtol=1e-5, atol=1e-6)


def _block_data(seed):
  """Two user groups, each consuming a disjoint half of the items.

  Returns:
    (train_users, train_items, test_users, test_items, num_users,
    num_items): 60 users x 60 items; users < 30 use items < 30, the others
    items >= 30; per user 20 train items and 1 held-out item, all in block.
  """
  rng = np.random.default_rng(seed)
  num_users, num_items, half = 60, 60, 30
  tu, ti, eu, ei = [], [], [], []
  for u in range(num_users):
    block = np.arange(half) + (half if u >= half else 0)
    picked = rng.choice(block, 21, replace=False)
    tu += [u] * 20
    ti += list(picked[:20])
    eu.append(u)
    ei.append(picked[20])
  return (np.array(tu), np.array(ti), np.array(eu), np.array(ei), num_users,
          num_items)


def test_ials_learns_planted_blocks():
  pytest.importorskip("implicit")
  from benchmarks import baselines  # pylint: disable=g-import-not-at-top
  tu, ti, eu, ei, num_users, num_items = _block_data(0)
  # Few factors and firm regularization: the planted structure is rank 2,
  # and more freedom fits within-block noise (8 factors, l2 0.1: HR ~0.83).
  model = baselines.IALS(factors=4, regularization=1.0, iterations=10,
                         alpha=1.0, seed=0).fit(tu, ti, num_users, num_items)
  assert model.user_factors.shape == (num_users, 4)
  assert model.item_factors.shape == (num_items, 4)
  got = rm.full_catalog_metrics(model.score_fn, tu, ti, eu, ei, num_items,
                                ks=(10,))
  # 40 candidates per user: the 10 unseen items of the user's block (one of
  # them held out) and the 30 of the other block. Random scores: HR@10 =
  # 10/40 = 0.25. Scoring the own block above the other: HR@10 = 1.
  # (Over 10 data x 3 model seeds the lowest was 0.983.)
  assert got["hr@10"] >= 0.9


def test_tune_on_validation_picks_by_validation_metric():
  pytest.importorskip("scipy")
  from benchmarks import baselines  # pylint: disable=g-import-not-at-top
  tu, ti, eu, ei, num_users, num_items = _block_data(1)
  # Popularity cannot see the blocks (items are about equally popular);
  # EASE can. The table keeps grid order.
  make = {"pop": baselines.Popularity, "ease": lambda: baselines.EASE(10.0)}
  best, table = baselines.tune_on_validation(
      lambda name: make[name](), ["pop", "ease"], tu, ti, eu, ei, num_users,
      num_items)
  assert best == "ease"
  assert [row["param"] for row in table] == ["pop", "ease"]
  assert table[1]["ndcg@10"] > table[0]["ndcg@10"]
  assert {"hr@10", "ndcg@10", "fit_seconds", "eval_seconds"} <= set(table[0])
