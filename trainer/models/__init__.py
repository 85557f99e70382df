"""The model kinds: matrix factorization (ranking) and two-tower retrieval."""

from trainer.models import mf
from trainer.models import two_tower


def build_model(config, on_tpu: bool = False, total_steps: int = 0):
  """The model `config.model.kind` names: MatrixFactorization or TwoTower.

  Args:
    config: The run's Config.
    on_tpu: Whether built under a TPUStrategy.
    total_steps: Steps of the run, for decaying learning-rate schedules.
  """
  if config.model.kind == "two_tower":
    return two_tower.TwoTower(config, on_tpu=on_tpu, total_steps=total_steps)
  return mf.MatrixFactorization(config, on_tpu=on_tpu, total_steps=total_steps)
