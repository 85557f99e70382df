"""Histories without look-ahead, MovieLens side features, the sequence-aware baseline."""

import os

import numpy as np
import tensorflow as tf

from benchmarks import baselines
from input import history
from input import movielens


class HistoryTest(tf.test.TestCase):

  def test_only_earlier_items_in_time_order(self):
    # Rows out of order; user 1 has a tie at t=5 (log order breaks it).
    users = np.array([1, 2, 1, 1, 2, 1])
    items = np.array([10, 20, 11, 12, 21, 13])
    times = np.array([5, 1, 3, 5, 2, 9])
    got = history.add_history(users, items, times, max_len=2)
    # User 1 in time order: 11 (t3), 10 (t5, row 0), 12 (t5, row 3), 13 (t9).
    self.assertEqual(list(got), ["11", "", "", "11|10", "20", "10|12"])
    u, last = history.last_items(users, items, times, max_len=3)
    self.assertAllEqual(u, [1, 2])
    self.assertEqual(list(last), ["10|12|13", "20|21"])


def _write(path, text, encoding="utf-8"):
  with open(path, "wb") as f:
    f.write(text.encode(encoding))


class SideFeaturesTest(tf.test.TestCase):

  def test_ml_100k_ml_1m_and_ml_latest(self):
    src = self.get_temp_dir()
    d100 = os.path.join(src, "ml-100k")
    os.makedirs(d100)
    _write(f"{d100}/u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = ["0"] * 19
    flags[1] = flags[5] = "1"  # Action, Comedy.
    _write(f"{d100}/u.item", "7|Café (1995)|01-Jan-1995||http://x|" +
           "|".join(flags) + "\n", "latin-1")
    side = movielens.read_side_features("ml-100k", d100)
    self.assertEqual(side["user"].to_pylist()[1], {
        "user_id": 2, "age": 53, "gender": "F", "occupation": "other"})
    self.assertEqual(side["item"].to_pylist(), [{
        "item_id": 7, "title": "Café (1995)", "genres": "Action|Comedy",
        "year": 1995}])
    d1m = os.path.join(src, "ml-1m")
    os.makedirs(d1m)
    _write(f"{d1m}/users.dat", "1::F::1::10::48067\n")
    _write(f"{d1m}/movies.dat", "1::Toy Story (1995)::Animation|Children's\n",
           "latin-1")
    side = movielens.read_side_features("ml-1m", d1m)
    self.assertEqual(side["user"].to_pylist(), [{
        "user_id": 1, "age": 1, "gender": "F", "occupation": "10"}])
    self.assertEqual(side["item"].to_pylist()[0]["genres"],
                     "Animation|Children's")
    self.assertEqual(side["item"].to_pylist()[0]["year"], 1995)
    dl = os.path.join(src, "ml-latest-small")
    os.makedirs(dl)
    _write(f"{dl}/movies.csv", 'movieId,title,genres\n1,"Heat, The (1995)",'
           "Action|Crime\n2,Untitled,(no genres listed)\n")
    side = movielens.read_side_features("ml-latest", dl)
    self.assertNotIn("user", side)
    self.assertEqual(side["item"].to_pylist(), [
        {"item_id": 1, "title": "Heat, The (1995)", "genres": "Action|Crime",
         "year": 1995},
        {"item_id": 2, "title": "Untitled", "genres": "", "year": 0}])
    paths = movielens.write_side_features("ml-latest", dl, f"{src}/side")
    self.assertEqual(list(paths), ["item"])


class RecencyEASETest(tf.test.TestCase):

  def test_profile_weights_by_position_from_the_end(self):
    # One user took items 0, 1, 2 at times 3, 1, 2: in time order 1, 2, 0.
    users, items = np.array([0, 0, 0, 1]), np.array([0, 1, 2, 1])
    times = np.array([3.0, 1.0, 2.0, 1.0])
    model = baselines.RecencyEASE(l2=1.0, decay=0.5, timestamps=times).fit(
        users, items, 2, 3)
    # Latest (item 0) weight 1, item 2 weight 0.5, item 1 weight 0.25.
    profile = np.array([1.0, 0.25, 0.5])
    self.assertAllClose(model.score_fn(np.array([0]))[0],
                        profile @ model.weights, rtol=1e-5)
    plain = baselines.EASE(l2=1.0).fit(users, items, 2, 3)
    self.assertAllClose(model.weights, plain.weights)
    same = baselines.RecencyEASE(l2=1.0, decay=1.0, timestamps=times).fit(
        users, items, 2, 3)
    self.assertAllClose(same.score_fn(np.array([0, 1])),
                        plain.score_fn(np.array([0, 1])))


if __name__ == "__main__":
  tf.test.main()
