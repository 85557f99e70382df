r"""Submits the trainer to Vertex AI as a CustomJob (or prints it: --dry_run).

  python -m launch.vertex --project=P --region=R --staging_bucket=gs://B \
      --machine=a100x8 [--workers=N] [--parameter_servers=M] [--spot] \
      [--service_account=SA] [--tensorboard=RESOURCE] [--dry_run] \
      -- --train_files=gs://... [other trainer flags]

Every replica runs `python -m trainer.task` with the flags after `--`, on a
Python 3.11 image that first pip-installs this package's sdist (uploaded to
the staging bucket, read through Vertex AI's /gcs mount), and with it the
pinned TensorFlow. The job writes under gs://B/cf-trainer/JOB_NAME, which
the trainer reads back from AIP_* variables (trainer/environment.py).
"""

import dataclasses
import json
import os
import shlex
from typing import Dict, Optional, Sequence, Tuple

from absl import app, flags, logging

from launch import packaging

# A stock Python 3.11 image: Vertex AI's prebuilt TensorFlow training images
# stop at TF 2.17 on Python 3.10, which cannot install this package's pins.
DEFAULT_IMAGE = "docker.io/library/python:3.11-slim"
# CPU machine of the parameter-server pool.
PS_MACHINE_TYPE = "n2-standard-16"


@dataclasses.dataclass(frozen=True)
class Machine:
  """One --machine kind: a Vertex AI MachineSpec and the strategy it implies.

  Attributes:
    machine_type: Compute Engine machine type.
    accelerator_type: AcceleratorType enum name, "" for none (TPU v5e slices
      are named by machine type and topology instead).
    accelerator_count: GPUs per machine.
    tpu_topology: Slice shape for TPU machine types, e.g. "2x4".
    strategy: --strategy the trainer gets when the user sets none ("" keeps
      the trainer's default).
  """
  machine_type: str
  accelerator_type: str = ""
  accelerator_count: int = 0
  tpu_topology: str = ""
  strategy: str = ""

  @property
  def kind(self) -> str:
    if self.tpu_topology:
      return "tpu"
    return "gpu" if self.accelerator_count else "cpu"


MACHINES: Dict[str, Machine] = {
    "cpu": Machine("n2-standard-16"),
    "a100x1": Machine("a2-highgpu-1g", "NVIDIA_TESLA_A100", 1,
                      strategy="mirrored"),
    "a100x8": Machine("a2-highgpu-8g", "NVIDIA_TESLA_A100", 8,
                      strategy="mirrored"),
    "h100x8": Machine("a3-highgpu-8g", "NVIDIA_H100_80GB", 8,
                      strategy="mirrored"),
    # TPU v5e: 4 and 8 chips on one host, 16 chips over 4 hosts.
    "v5e-4": Machine("ct5lp-hightpu-4t", tpu_topology="2x2", strategy="tpu"),
    "v5e-8": Machine("ct5lp-hightpu-8t", tpu_topology="2x4", strategy="tpu"),
    "v5e-16": Machine("ct5lp-hightpu-4t", tpu_topology="4x4", strategy="tpu"),
}
# Accept the machine type itself for the CPU kind, as the README's examples.
MACHINES["n2-standard-16"] = MACHINES["cpu"]


@dataclasses.dataclass(frozen=True)
class JobRequest:
  """Everything a CustomJob is built from; no credentials.

  Attributes:
    project: Google Cloud project ID.
    region: Vertex AI region, e.g. us-central1.
    staging_bucket: gs://bucket (optionally with a folder) for the package
      and the job's outputs.
    machine: A key of MACHINES.
    job_name: Display name, also the job's folder in the staging bucket.
    trainer_args: Flags for trainer.task, as given after `--`.
    workers: Machines beside the chief (worker pool 1).
    parameter_servers: Parameter-server machines (worker pool 2).
    spot: Run on Spot VMs (preemptible; the trainer resumes from checkpoints).
    service_account: Service account the job runs as.
    tensorboard: Vertex AI TensorBoard resource name to stream events to.
    container_image: Image every replica runs; it must have Python 3.11.
  """
  project: str
  region: str
  staging_bucket: str
  machine: str
  job_name: str
  trainer_args: Tuple[str, ...] = ()
  workers: int = 0
  parameter_servers: int = 0
  spot: bool = False
  service_account: str = ""
  tensorboard: str = ""
  container_image: str = ""

  @property
  def job_dir(self) -> str:
    return f"{self.staging_bucket.rstrip('/')}/cf-trainer/{self.job_name}"

  def package_uri(self, sdist_name: str) -> str:
    return f"{self.job_dir}/package/{sdist_name}"


def check(request: JobRequest) -> None:
  """Raises ValueError, saying what to fix, for a request Vertex would refuse."""
  if request.machine not in MACHINES:
    raise ValueError(f"Unknown --machine={request.machine}; use one of "
                     f"{', '.join(sorted(MACHINES))}.")
  if not (request.project and request.region and request.job_name):
    raise ValueError("Set --project and --region.")
  if not request.staging_bucket.startswith("gs://"):
    raise ValueError("--staging_bucket must be a gs:// path.")
  if request.workers < 0 or request.parameter_servers < 0:
    raise ValueError("--workers and --parameter_servers must be >= 0.")
  if request.parameter_servers and not request.workers:
    raise ValueError("--parameter_servers needs --workers >= 1 to train.")
  tpu = MACHINES[request.machine].kind == "tpu"
  if tpu and (request.workers or request.parameter_servers):
    raise ValueError("TPU kinds run as one slice: pick a bigger slice "
                     "instead of --workers or --parameter_servers.")
  if request.tensorboard and not request.service_account:
    raise ValueError("--tensorboard needs --service_account (Vertex AI "
                     "writes to TensorBoard as that account).")


def trainer_args(request: JobRequest) -> list:
  """The trainer's flags: the user's, plus the strategy the job implies."""
  machine = MACHINES[request.machine]
  if request.parameter_servers:
    strategy = "parameter_server"
  elif request.workers:
    strategy = "multi_worker"
  else:
    strategy = machine.strategy
  defaults = {"strategy": strategy} if strategy else {}
  if machine.kind == "tpu":
    defaults["tpu"] = "local"
  return packaging.with_defaults(request.trainer_args, **defaults)


def _container(request: JobRequest, sdist_name: str, kind: str):
  """The ContainerSpec of every replica: install the package, run the trainer.

  Args:
    request: The job.
    sdist_name: File name of the uploaded package.
    kind: "cpu", "gpu" or "tpu": which TensorFlow build to install.

  Returns:
    A google.cloud.aiplatform_v1.types.ContainerSpec.
  """
  from google.cloud.aiplatform_v1 import types  # pylint: disable=g-import-not-at-top
  # Vertex AI mounts the job's buckets at /gcs/BUCKET (Cloud Storage FUSE).
  package = "/gcs/" + request.package_uri(sdist_name)[len("gs://"):]
  pip = "python -m pip install --quiet --no-cache-dir"
  # install_requires pins tensorflow==2.20.0; GPUs also need its CUDA wheels,
  # TPUs its TPU build and libtpu.
  steps = []
  if not request.container_image:
    # The slim image has no compiler: g++ (and gcc) build the input's native
    # loops at install and the training step's fused CPU kernels. Both are
    # optional, so a job that cannot reach Debian's mirrors goes on without.
    steps.append("(apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                 "apt-get install -y -qq --no-install-recommends g++ "
                 ">/dev/null || echo 'No C++ compiler: the trainer runs "
                 "without its native parts.')")
  steps.append(f"{pip} {shlex.quote(package)}" + (
      f" {shlex.quote(packaging.GPU_TENSORFLOW)}" if kind == "gpu" else ""))
  if kind == "tpu":
    steps.append(f"{pip} {packaging.TPU_TENSORFLOW} -f {packaging.LIBTPU_INDEX}")
  if kind == "cpu":
    # Compiled once here rather than by the trainer's first step (optional).
    steps.append("(python -m trainer.kernels || true)")
  steps.append('exec python -m trainer.task "$@"')
  # sh -c SCRIPT NAME ARGS...: the job's args become "$@".
  return types.ContainerSpec(
      image_uri=request.container_image or DEFAULT_IMAGE,
      command=["sh", "-c", " && ".join(steps), "trainer"],
      args=trainer_args(request))


def build_custom_job(request: JobRequest, sdist_name: str):
  """Builds the CustomJob proto for a request.

  Worker pools follow Vertex AI's convention: 0 is the chief, 1 the other
  workers, 2 the parameter servers; each replica learns its role from
  TF_CONFIG / CLUSTER_SPEC.

  Args:
    request: The job to build; check(request) must pass.
    sdist_name: File name of the package archive (uploaded to
      request.package_uri(sdist_name)).

  Returns:
    A google.cloud.aiplatform_v1.types.CustomJob.
  """
  # Protos only: importing them needs no credentials and no network.
  from google.cloud.aiplatform_v1 import types  # pylint: disable=g-import-not-at-top
  check(request)
  machine = MACHINES[request.machine]
  container = _container(request, sdist_name, machine.kind)
  spec = types.MachineSpec(machine_type=machine.machine_type)
  if machine.accelerator_type:
    spec.accelerator_type = types.AcceleratorType[machine.accelerator_type]
    spec.accelerator_count = machine.accelerator_count
  if machine.tpu_topology:
    spec.tpu_topology = machine.tpu_topology
  disk = types.DiskSpec(boot_disk_type="pd-ssd", boot_disk_size_gb=100)
  pools = [types.WorkerPoolSpec(machine_spec=spec, replica_count=1,
                                container_spec=container, disk_spec=disk)]
  if request.workers:
    pools.append(types.WorkerPoolSpec(
        machine_spec=spec, replica_count=request.workers,
        container_spec=container, disk_spec=disk))
  if request.parameter_servers:
    pools.append(types.WorkerPoolSpec(
        machine_spec=types.MachineSpec(machine_type=PS_MACHINE_TYPE),
        replica_count=request.parameter_servers,
        container_spec=_container(request, sdist_name, "cpu"), disk_spec=disk))
  several = len(pools) > 1
  # Synchronous training cannot continue without a lost worker: restart them
  # all, and the trainer resumes from the last checkpoint.
  scheduling = types.Scheduling(restart_job_on_worker_restart=several)
  if request.spot:
    scheduling.strategy = types.Scheduling.Strategy.SPOT
  job_spec = types.CustomJobSpec(
      worker_pool_specs=pools, scheduling=scheduling,
      base_output_directory=types.GcsDestination(
          output_uri_prefix=request.job_dir))
  if request.service_account:
    job_spec.service_account = request.service_account
  if request.tensorboard:
    job_spec.tensorboard = request.tensorboard
  return types.CustomJob(display_name=request.job_name, job_spec=job_spec,
                         labels={"launcher": "cf-trainer"})


def plan(request: JobRequest, sdist_name: str) -> dict:
  """What a submission does: the upload and the job, as plain JSON data."""
  job = build_custom_job(request, sdist_name)
  return {
      "parent": f"projects/{request.project}/locations/{request.region}",
      "uploads": [{"file": sdist_name,
                   "to": request.package_uri(sdist_name)}],
      "custom_job": json.loads(type(job).to_json(
          job, use_integers_for_enums=False,
          always_print_fields_with_no_presence=False)),
  }


def dry_run_text(request: JobRequest, sdist_name: str) -> str:
  """The dry run's output: plan() as sorted, indented JSON."""
  return json.dumps(plan(request, sdist_name), indent=2, sort_keys=True) + "\n"


def upload_package(request: JobRequest, sdist_path: str) -> str:
  """Uploads the sdist to the staging bucket; returns its gs:// URI.

  google-cloud-storage finds credentials (or, in tests, the emulator named by
  STORAGE_EMULATOR_HOST) itself; nothing secret passes through here.
  """
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  uri = request.package_uri(os.path.basename(sdist_path))
  bucket, _, blob = uri[len("gs://"):].partition("/")
  storage.Client(project=request.project).bucket(bucket).blob(
      blob).upload_from_filename(sdist_path)
  logging.info("Uploaded %s to %s.", sdist_path, uri)
  return uri


def submit(request: JobRequest, sdist_path: str) -> str:
  """Uploads the package and creates the job; returns its resource name."""
  from google.cloud import aiplatform_v1  # pylint: disable=g-import-not-at-top
  job = build_custom_job(request, os.path.basename(sdist_path))
  upload_package(request, sdist_path)
  client = aiplatform_v1.JobServiceClient(client_options={
      "api_endpoint": f"{request.region}-aiplatform.googleapis.com"})
  created = client.create_custom_job(
      parent=f"projects/{request.project}/locations/{request.region}",
      custom_job=job)
  return created.name


def links(request: JobRequest, job_resource: str) -> str:
  """Console link and log command for a created job."""
  job_id = job_resource.rsplit("/", 1)[-1]
  return (f"Console: https://console.cloud.google.com/vertex-ai/locations/"
          f"{request.region}/training/{job_id}/cpu?project={request.project}\n"
          f"Logs:    gcloud ai custom-jobs stream-logs {job_resource} "
          f"--region={request.region} --project={request.project}\n")


def _define_flags() -> None:
  """The command line; defined only when this module is the program."""
  flags.DEFINE_string("project", None, "Google Cloud project ID.")
  flags.DEFINE_string("region", None, "Vertex AI region, e.g. us-central1.")
  flags.DEFINE_string("staging_bucket", None,
                      "gs://bucket[/folder] for the package and the outputs.")
  flags.DEFINE_enum("machine", "cpu", sorted(MACHINES), "Machine kind.")
  flags.DEFINE_integer("workers", 0, "Machines beside the chief.")
  flags.DEFINE_integer("parameter_servers", 0, "Parameter-server machines.")
  flags.DEFINE_bool("spot", False, "Run on Spot VMs.")
  flags.DEFINE_string("service_account", "", "Service account of the job.")
  flags.DEFINE_string("tensorboard", "", "Vertex AI TensorBoard resource "
                      "(projects/P/locations/R/tensorboards/N).")
  flags.DEFINE_string("container_image", "", "Image of every replica (with "
                      f"Python 3.11); default {DEFAULT_IMAGE}.")
  flags.DEFINE_string("job_name", None, "Job name (default: cf-trainer-TIME).")
  flags.DEFINE_string("package", "", "Use this sdist instead of building one.")
  flags.DEFINE_bool("dry_run", False,
                    "Print the job and the upload as JSON; upload nothing, "
                    "submit nothing, need no credentials.")


def main(argv: Sequence[str]) -> None:
  """Flags -> JobRequest -> dry-run JSON, or upload and submit."""
  f = flags.FLAGS
  request = JobRequest(
      project=f.project or "", region=f.region or "",
      staging_bucket=f.staging_bucket or "", machine=f.machine,
      job_name=f.job_name or packaging.default_name(),
      trainer_args=tuple(argv[1:]), workers=f.workers,
      parameter_servers=f.parameter_servers, spot=f.spot,
      service_account=f.service_account, tensorboard=f.tensorboard,
      container_image=f.container_image)
  try:
    check(request)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  sdist = f.package or packaging.build_sdist()
  if f.dry_run:
    logging.info("Dry run: built %s; nothing uploaded or submitted.", sdist)
    print(dry_run_text(request, os.path.basename(sdist)), end="")
    return
  print(links(request, submit(request, sdist)), end="")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
