"""The one place that knows whether the run is on CPU, GPU, several workers or TPU."""

import os

from absl import logging
import tensorflow as tf

from trainer import environment


def make_strategy(runtime) -> tf.distribute.Strategy:
  """Builds the tf.distribute strategy a RuntimeConfig asks for.

  Args:
    runtime: A RuntimeConfig; uses strategy, tpu, the thread counts and
      num_cpu_devices.

  Returns:
    The strategy; everything after this runs under its scope.

  Under parameter_server, a process whose TF_CONFIG task is a worker or a
  parameter server does not return: it serves the chief until it is stopped.

  Raises:
    ValueError: For an unknown strategy name.
  """
  set_threads(runtime)
  if runtime.num_cpu_devices > 1:
    # Logical CPU devices let the mirrored strategy run (and be tested) on one
    # host; this must happen before TF initialises its devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * runtime.num_cpu_devices)
  name = runtime.strategy
  if name == "default":
    strategy = tf.distribute.get_strategy()
  elif name == "one_device":
    gpus = tf.config.list_logical_devices("GPU")
    strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else
                                               "/cpu:0")
  elif name == "mirrored":
    devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if not devices:
      devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
  elif name == "multi_worker":
    # On Vertex AI the cluster may come as CLUSTER_SPEC only.
    environment.export_tf_config(os.environ)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  elif name == "parameter_server":
    environment.export_tf_config(os.environ)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if resolver.task_type in ("worker", "ps"):
      _serve(resolver)
    num_ps = len(resolver.cluster_spec().as_dict().get("ps", []))
    if not num_ps:
      raise ValueError("--strategy=parameter_server needs parameter servers "
                       "in TF_CONFIG's cluster (a 'ps' job).")
    # Each table is split by rows over the parameter servers (shards of at
    # least min_shard_bytes), so no host needs to hold a whole table.
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=runtime.min_shard_bytes, max_shards=num_ps)
    strategy = tf.distribute.experimental.ParameterServerStrategy(
        resolver, variable_partitioner=partitioner)
  elif name == "tpu":
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu="" if runtime.tpu == "local" else runtime.tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    strategy = tf.distribute.TPUStrategy(resolver)
  else:
    raise ValueError(f"Unknown strategy {name!r}.")
  logging.info("Strategy: %s with %d replica(s).", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy


def set_threads(runtime) -> None:
  """Sets TensorFlow's thread pools as the RuntimeConfig asks.

  Like the logical devices, they are fixed once TensorFlow's runtime has
  started: a process that has run ops already (a second run in one process,
  as in tests) keeps the pools it has, and says so.
  """
  threading = tf.config.threading
  for name, want, get, put in (
      ("intra", max(0, runtime.intra_op_threads),
       threading.get_intra_op_parallelism_threads,
       threading.set_intra_op_parallelism_threads),
      ("inter", runtime.inter_op_threads,
       threading.get_inter_op_parallelism_threads,
       threading.set_inter_op_parallelism_threads)):
    if get() == want:
      continue
    try:
      put(want)
    except RuntimeError:
      logging.warning("TensorFlow has started already: %s-op threads stay "
                      "%s (asked for %s).", name, get() or "its choice",
                      want or "its choice")


def _serve(resolver) -> None:
  """Runs this worker or parameter server for the chief; never returns."""
  server = tf.distribute.Server(
      resolver.cluster_spec(), job_name=resolver.task_type,
      task_index=resolver.task_id, protocol=resolver.rpc_layer or "grpc",
      start=True)
  logging.info("Serving as %s %d of the parameter-server cluster; the chief "
               "drives training.", resolver.task_type, resolver.task_id)
  server.join()


def is_parameter_server(strategy: tf.distribute.Strategy) -> bool:
  return isinstance(strategy,
                    tf.distribute.experimental.ParameterServerStrategy)


def is_tpu(strategy: tf.distribute.Strategy) -> bool:
  return isinstance(strategy, (tf.distribute.TPUStrategy,
                               tf.distribute.experimental.TPUStrategy))


def worker_dir(strategy: tf.distribute.Strategy, model_dir: str) -> str:
  """Where this worker writes: model_dir on the chief, a private dir elsewhere.

  Under MultiWorkerMirroredStrategy every worker must take part in saving a
  checkpoint (the variables are synchronised by collectives), but only the
  chief's copy is kept; the others write to a folder of their own.
  """
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return model_dir
  task_type, task_id = resolver.task_type, resolver.task_id
  spec = resolver.cluster_spec().as_dict()
  chief = (task_type == "chief" or
           (task_type == "worker" and task_id == 0 and "chief" not in spec))
  return model_dir if chief else os.path.join(
      model_dir, "workers", f"{task_type}-{task_id}")
