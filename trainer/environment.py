"""What the platform running the trainer says through environment variables.

Vertex AI custom jobs set `AIP_MODEL_DIR`, `AIP_CHECKPOINT_DIR` and
`AIP_TENSORBOARD_LOG_DIR` (under the job's base output directory), and
describe the cluster in `CLUSTER_SPEC` (and usually `TF_CONFIG`). Everything
here takes the environment as a mapping, so it is tested with a plain dict.
"""

import json
import os
from typing import Mapping, MutableMapping, Optional

# Vertex AI worker pools, in order, and the TF_CONFIG task type of each.
_POOL_TASK_TYPES = {"workerpool0": "chief", "workerpool1": "worker",
                    "workerpool2": "ps", "workerpool3": "evaluator"}
# RuntimeConfig field -> the Vertex AI variable that supplies its default.
_DIR_VARIABLES = {"model_dir": "AIP_CHECKPOINT_DIR",
                  "export_dir": "AIP_MODEL_DIR",
                  "tensorboard_dir": "AIP_TENSORBOARD_LOG_DIR"}


def default_dirs(env: Mapping[str, str]) -> dict:
  """The output folders the platform asks for, by RuntimeConfig field.

  Checkpoints (and config.json, metrics.json) go to `AIP_CHECKPOINT_DIR`, the
  SavedModel to `AIP_MODEL_DIR` (where Vertex AI looks for a model to import),
  TensorBoard events to `AIP_TENSORBOARD_LOG_DIR`.

  Args:
    env: Environment variables, e.g. os.environ.

  Returns:
    {"model_dir": ..., "export_dir": ..., "tensorboard_dir": ...}, holding
    only the fields whose variable is set and non-empty; flags given by the
    user take precedence over these.
  """
  return {field: env[var].rstrip("/") for field, var in _DIR_VARIABLES.items()
          if env.get(var)}


def tf_config_from_cluster_spec(cluster_spec: str) -> str:
  """Turns Vertex AI's CLUSTER_SPEC into the TF_CONFIG tf.distribute reads.

  Vertex AI names its pools workerpool0..3; TensorFlow calls them chief,
  worker, ps and evaluator. For example
  `{"cluster": {"workerpool0": ["a:2222"], "workerpool1": ["b:2222"]},
  "task": {"type": "workerpool1", "index": 0}}` becomes
  `{"cluster": {"chief": ["a:2222"], "worker": ["b:2222"]},
  "task": {"type": "worker", "index": 0}}`.

  Args:
    cluster_spec: The CLUSTER_SPEC JSON string.

  Returns:
    The equivalent TF_CONFIG JSON string.

  Raises:
    ValueError: If the spec names a pool Vertex AI does not have.
  """
  spec = json.loads(cluster_spec)
  def task_type(pool):
    if pool not in _POOL_TASK_TYPES:
      raise ValueError(f"CLUSTER_SPEC names an unknown worker pool {pool!r}.")
    return _POOL_TASK_TYPES[pool]
  cluster = {task_type(pool): list(hosts)
             for pool, hosts in spec.get("cluster", {}).items() if hosts}
  task = spec.get("task", {})
  return json.dumps({
      "cluster": cluster,
      "task": {"type": task_type(task.get("type", "workerpool0")),
               "index": int(task.get("index", 0))}}, sort_keys=True)


def export_tf_config(env: MutableMapping[str, str]) -> Optional[str]:
  """Makes sure TF_CONFIG is set when the platform described a cluster.

  TF_CONFIG, if set, wins (Vertex AI sets it for TensorFlow jobs); otherwise
  it is derived from CLUSTER_SPEC. Call before building a multi-worker or
  parameter-server strategy, which read TF_CONFIG from the environment.

  Args:
    env: Environment variables; updated in place (pass os.environ).

  Returns:
    The TF_CONFIG in effect, or None when neither variable is set.
  """
  if env.get("TF_CONFIG"):
    return env["TF_CONFIG"]
  if env.get("CLUSTER_SPEC"):
    env["TF_CONFIG"] = tf_config_from_cluster_spec(env["CLUSTER_SPEC"])
    return env["TF_CONFIG"]
  return None


def summary_dir(runtime, write_dir: str) -> str:
  """Where this worker writes TensorBoard events (train/ and eval/ below it).

  Args:
    runtime: The RuntimeConfig; uses model_dir and tensorboard_dir.
    write_dir: This worker's output folder (model_dir on the chief).

  Returns:
    runtime.tensorboard_dir on the chief when it is set, else write_dir: the
    other workers keep their events in their private folder, as before.
  """
  if runtime.tensorboard_dir and write_dir == runtime.model_dir:
    return runtime.tensorboard_dir
  return write_dir


def apply_defaults(runtime_fields: dict,
                   env: Mapping[str, str] = os.environ) -> dict:
  """Adds the platform's folders to runtime fields the user left unset.

  Args:
    runtime_fields: RuntimeConfig fields given by flags, by name.
    env: Environment variables.

  Returns:
    A new dict: the given fields, plus default_dirs(env) for the others.
  """
  return {**default_dirs(env), **runtime_fields}
