"""Experiment tracking beyond TensorBoard: the run's settings, metrics and artifacts in MLflow."""

import json
import os
import tempfile
from typing import Any, Dict, List

from absl import logging
import tensorflow as tf


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      text = json.dumps(v) if not isinstance(v, str) else v
      out[key] = text[:500]  # MLflow caps parameter values.
  return out


def log_run(config, summary: Dict[str, Any], artifacts: List[str]) -> str:
  """Logs one finished run to config.runtime.mlflow_uri; returns its run id.

  Parameters are the whole config, flattened (section.field); metrics the
  summary's numbers (eval metrics as eval.<name>); artifacts the given files
  (local or gs://, copied through a temporary folder).

  Raises:
    ImportError: With the install command, if mlflow is missing.
  """
  try:
    import mlflow  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("--mlflow_uri needs MLflow: pip install '.[mlflow]'.") from None
  runtime = config.runtime
  mlflow.set_tracking_uri(runtime.mlflow_uri)
  mlflow.set_experiment(runtime.mlflow_experiment)
  metrics = {k: float(v) for k, v in summary.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
  metrics.update({f"eval.{k}".replace("@", "_at_"): float(v)
                  for k, v in summary.get("eval", {}).items()})
  metrics = {k.replace("@", "_at_"): v for k, v in metrics.items()}
  params = _flatten(config.to_dict())
  params.pop("retrieval.features", None)  # Too long: kept as an artifact.
  with mlflow.start_run(run_name=os.path.basename(
      runtime.model_dir.rstrip("/"))) as run:
    mlflow.log_params(params)
    mlflow.log_metrics(metrics, step=int(summary.get("steps", 0)))
    with tempfile.TemporaryDirectory() as tmp:
      for path in artifacts:
        if path and tf.io.gfile.exists(path):
          local = os.path.join(tmp, os.path.basename(path))
          tf.io.gfile.copy(path, local, overwrite=True)
          mlflow.log_artifact(local)
  logging.info("Logged run %s to MLflow at %s (experiment %s).",
               run.info.run_id, runtime.mlflow_uri, runtime.mlflow_experiment)
  return run.info.run_id
