"""Vocabulary builder and the flags -> Config path."""

import gzip
import json
import os

from absl import flags
from absl.testing import flagsaver
import tensorflow as tf

from input import vocab
from trainer import config as config_lib
from trainer import task  # Defines the trainer's flags.

FLAGS = flags.FLAGS


class VocabTest(tf.test.TestCase):

  def test_most_frequent_first_with_min_count_and_max_size(self):
    d = self.get_temp_dir()
    rows = ["1,7,1,0", "2,7,1,0", "2,8,1,0", "3,9,0,0", "2,9,1,0", "1,9,1,0"]
    for i, part in enumerate((rows[:3], rows[3:])):
      with gzip.open(os.path.join(d, f"s{i}.csv.gz"), "wt") as f:
        f.write("\n".join(part) + "\n")
    data = config_lib.DataConfig(train_files=("x",))
    files = [os.path.join(d, f"s{i}.csv.gz") for i in range(2)]
    out = os.path.join(d, "vocab")
    summary = vocab.build(data, files, out, min_count=2)
    # users: 2 x3, 1 x2, 3 x1 (dropped by min_count=2).
    self.assertEqual(open(f"{out}/user_id.txt").read().split(), ["2", "1"])
    # items: 9 x3, 7 x2, 8 x1 (dropped).
    self.assertEqual(open(f"{out}/item_id.txt").read().split(), ["9", "7"])
    self.assertEqual(summary["user_id"]["distinct"], 3)
    self.assertAlmostEqual(summary["user_id"]["coverage"], 5 / 6)
    self.assertEqual(json.load(open(f"{out}/vocab.json")), summary)
    vocab.build(data, files, out, max_size=1)
    # max_size keeps the most frequent IDs only.
    self.assertEqual(open(f"{out}/item_id.txt").read().split(), ["9"])


class FlagsTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    FLAGS(["task"])  # Parse defaults once so flag values can be read.

  @flagsaver.flagsaver
  def test_unset_flags_keep_the_defaults(self):
    FLAGS.train_files = ["a*"]
    FLAGS.model_dir = "m"
    config = task.config_from_flags()
    self.assertEqual(config.model, config_lib.ModelConfig())
    self.assertEqual(config.data.train_files, ("a*",))

  @flagsaver.flagsaver
  def test_negatives_imply_implicit_labels_and_table_options_apply(self):
    FLAGS.train_files = ["a*"]
    FLAGS.model_dir = "m"
    FLAGS.num_negatives = 4
    FLAGS.num_bins = 4096
    FLAGS.item_num_bins = 512
    FLAGS.embedding_optimizer = "lazy_adam"
    FLAGS.table_options = ["item_id.learning_rate=0.01", "user_id.l2=1e-5"]
    config = config_lib.validate(task.config_from_flags())
    self.assertEqual(config.data.label_mode, "implicit")
    user, item = config.model.tables
    self.assertEqual((user.num_bins, item.num_bins), (4096, 512))
    self.assertEqual((user.optimizer, item.optimizer), ("lazy_adam",) * 2)
    self.assertEqual((user.l2, item.learning_rate), (1e-5, 0.01))
    self.assertEqual((user.salt, item.salt), (1, 2))

  @flagsaver.flagsaver
  def test_demo_preset_without_train_files(self):
    FLAGS.work_dir = "/tmp/w"
    config = task.config_from_flags()
    self.assertEqual(config, config_lib.demo_preset("/tmp/w"))

  def test_validation_says_what_to_fix(self):
    base = config_lib.Config(data=config_lib.DataConfig(train_files=("a",)),
                             runtime=config_lib.RuntimeConfig(model_dir="m"))
    config_lib.validate(base)
    for fields, message in (
        (dict(data=dict(num_negatives=2)), "needs --label_mode=implicit"),
        (dict(data=dict(columns=("a", "b"))), "has 2 names but"),
        (dict(model=dict(id_mode="vocab", min_count=0)), "--min_count"),
        (dict(runtime=dict(strategy="tpu")), "needs --tpu"),
        (dict(retrieval=dict(scann=True)), "--scann .* needs --model=two_tower"),
        (dict(runtime=dict(intra_op_threads=-2)), "--intra_op_threads"),
    ):
      with self.assertRaisesRegex(ValueError, message):
        config_lib.validate(config_lib.replace(base, **fields))
    # Threads per op: automatic is 1 for MF, TensorFlow's choice for
    # two-tower; a number given is kept.
    self.assertEqual(config_lib.validate(base).runtime.intra_op_threads, 1)
    self.assertEqual(config_lib.validate(config_lib.replace(
        base, runtime=dict(intra_op_threads=3))).runtime.intra_op_threads, 3)
    self.assertEqual(config_lib.validate(config_lib.replace(
        base, runtime=dict(strategy="tpu", tpu="local"))
    ).runtime.intra_op_threads, 0)  # The TPU path keeps TensorFlow's pools.

  def test_config_json_round_trip(self):
    config = config_lib.demo_preset("/w")
    self.assertEqual(config_lib.Config.from_dict(json.loads(config.to_json())),
                     config)


if __name__ == "__main__":
  tf.test.main()
