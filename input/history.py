"""Each interaction's history: the items its user took before it, from the log itself.

A retrieval model's history feature must see only the past: for a row at
time t, the user's items strictly before it in time order (ties kept in log
order), never the row's own item or a later one. Histories are written as a
"|"-joined column, most recent last, which the two-tower model's `history`
feature reads.
"""

from typing import Tuple

import numpy as np


def time_order(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
  """Row order by user, then time, then log position (a stable sort)."""
  return np.lexsort((np.arange(len(users)), timestamps, users))


def add_history(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
                max_len: int) -> np.ndarray:
  """The history of every row: its user's previous `max_len` items.

  Args:
    users: [N] user of each row (any order).
    items: [N] item of each row.
    timestamps: [N] event time of each row.
    max_len: Items kept, the most recent.

  Returns:
    [N] strings (object array), in the rows' own order: "|"-joined item IDs
    of the user's earlier rows, oldest first; "" for a user's first row.
  """
  order = time_order(users, timestamps)
  u, it = users[order], items[order]
  text = it.astype(str)
  out = np.empty(len(users), dtype=object)
  start = 0
  while start < len(u):
    end = start + int(np.searchsorted(u[start:], u[start], side="right"))
    run = text[start:end]
    for k in range(end - start):
      out[order[start + k]] = "|".join(run[max(0, k - max_len):k])
    start = end
  return out


def last_items(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
               max_len: int) -> Tuple[np.ndarray, np.ndarray]:
  """Each user's latest `max_len` items: the history a query at the end of
  the log sees (e.g. for a held-out item after all of these rows).

  Returns:
    (sorted distinct users [U], [U] "|"-joined items, oldest first).
  """
  order = time_order(users, timestamps)
  u, it = users[order], items[order].astype(str)
  starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
  ends = np.r_[starts[1:], len(u)]
  return u[starts], np.array(
      ["|".join(it[max(s, e - max_len):e]) for s, e in zip(starts, ends)],
      dtype=object)
