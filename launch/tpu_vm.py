r"""Runs the trainer on a Cloud TPU VM through the gcloud CLI (or prints how).

  python -m launch.tpu_vm --project=P --zone=Z --accelerator=v5litepod-8 \
      [--spot] [--name=N] [--keep] [--dry_run] -- --train_files=gs://... ...

Creates the TPU as a queued resource, waits for it, copies this package's
sdist to every host, installs it (Python 3.11, the pinned tensorflow-tpu and
libtpu), runs `python -m trainer.task --strategy=tpu --tpu=local` on all hosts
with their logs streamed here, and deletes the TPU at the end (also after a
failure) unless --keep.
"""

import dataclasses
import os
import re
import shlex
import subprocess
import time
from typing import List, Sequence, Tuple

from absl import app, flags, logging

from launch import packaging

# TPU VM software (runtime) version per accelerator family.
RUNTIME_VERSIONS = {
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
_ACCELERATOR = re.compile(r"^(v\d+[a-z]*)-(\d+)$")
VENV = "~/cf-trainer-venv"


@dataclasses.dataclass(frozen=True)
class TpuRequest:
  """A TPU VM run; no credentials (gcloud holds them).

  Attributes:
    project: Google Cloud project ID.
    zone: Zone with the accelerator, e.g. us-west4-a.
    accelerator: Accelerator type, e.g. v5litepod-8, v5p-8, v6e-8.
    name: TPU (and queued resource) name.
    trainer_args: Flags for trainer.task, as given after `--`.
    spot: Spot capacity (preemptible).
    runtime_version: TPU VM software version; "" picks RUNTIME_VERSIONS'.
    keep: Leave the TPU running at the end.
  """
  project: str
  zone: str
  accelerator: str
  name: str
  trainer_args: Tuple[str, ...] = ()
  spot: bool = False
  runtime_version: str = ""
  keep: bool = False

  @property
  def runtime(self) -> str:
    if self.runtime_version:
      return self.runtime_version
    return RUNTIME_VERSIONS[_ACCELERATOR.match(self.accelerator).group(1)]


def check(request: TpuRequest) -> None:
  """Raises ValueError, saying what to fix, for a request gcloud would refuse."""
  if not (request.project and request.zone and request.name):
    raise ValueError("Set --project and --zone.")
  m = _ACCELERATOR.match(request.accelerator)
  if not m:
    raise ValueError(f"--accelerator={request.accelerator} is not like "
                     "v5litepod-8, v5p-8 or v6e-8.")
  if not request.runtime_version and m.group(1) not in RUNTIME_VERSIONS:
    raise ValueError(f"No default runtime for {m.group(1)}; set "
                     "--runtime_version.")


@dataclasses.dataclass(frozen=True)
class Step:
  """One gcloud command.

  Attributes:
    what: What it does, printed above it.
    argv: The command.
    wait_for: If set, run argv until it prints this (polling).
    cleanup: Runs at the end whatever happened before.
  """
  what: str
  argv: Tuple[str, ...]
  wait_for: str = ""
  cleanup: bool = False


def steps(request: TpuRequest, sdist_path: str) -> List[Step]:
  """The gcloud commands of a run, in order.

  Args:
    request: The run; check(request) must pass.
    sdist_path: Local path of the package archive.

  Returns:
    The steps; the last one deletes the TPU unless request.keep.
  """
  check(request)
  where = (f"--project={request.project}", f"--zone={request.zone}")
  tpus = ("gcloud", "compute", "tpus")
  on_all = (*tpus, "tpu-vm", "ssh", request.name, *where, "--worker=all")
  sdist = os.path.basename(sdist_path)
  pip = f"{VENV}/bin/pip install --quiet"
  install = " && ".join([
      # TPU VM images ship Python 3.10; the package needs 3.11.
      "sudo apt-get update -qq",
      "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
      "python3.11 python3.11-venv python3.11-dev g++",
      f"python3.11 -m venv {VENV}",
      f"{pip} --upgrade pip",
      f"{pip} ~/{sdist}",
      # The TPU build of the pinned TensorFlow, and libtpu.
      f"{pip} {packaging.TPU_TENSORFLOW} -f {packaging.LIBTPU_INDEX}"])
  args = packaging.with_defaults(request.trainer_args, strategy="tpu",
                                 tpu="local")
  run = f"{VENV}/bin/python -m trainer.task {shlex.join(args)}"
  result = [
      Step("Create the TPU (queued resource).",
           (*tpus, "queued-resources", "create", request.name,
            f"--node-id={request.name}", *where,
            f"--accelerator-type={request.accelerator}",
            f"--runtime-version={request.runtime}",
            *(("--spot",) if request.spot else ()))),
      Step("Wait until it is ACTIVE (repeat until it prints ACTIVE).",
           (*tpus, "queued-resources", "describe", request.name, *where,
            "--format=value(state.state)"), wait_for="ACTIVE"),
      Step("Copy the package to every host.",
           (*tpus, "tpu-vm", "scp", sdist_path, f"{request.name}:{sdist}",
            *where, "--worker=all")),
      Step("Install it on every host.", (*on_all, f"--command={install}")),
      Step("Train on all hosts; their logs stream here.",
           (*on_all, f"--command={run}")),
  ]
  if not request.keep:
    result.append(Step(
        "Delete the TPU (also after a failure; --keep skips this).",
        (*tpus, "queued-resources", "delete", request.name, *where,
         "--force", "--quiet"), cleanup=True))
  return result


def dry_run_text(request: TpuRequest, sdist_path: str) -> str:
  """The commands of a run as shell text, each under a comment."""
  return "".join(f"# {s.what}\n{shlex.join(s.argv)}\n"
                 for s in steps(request, sdist_path))


def _wait(step: Step, timeout_s: float = 3 * 3600, every_s: float = 30) -> None:
  """Polls a describe command until it prints step.wait_for."""
  deadline = time.time() + timeout_s
  while True:
    state = subprocess.run(step.argv, capture_output=True, text=True,
                           check=True).stdout.strip()
    logging.info("Queued resource state: %s", state)
    if state == step.wait_for:
      return
    if state in ("FAILED", "SUSPENDED"):
      raise RuntimeError(f"The TPU request ended {state}.")
    if time.time() > deadline:
      raise TimeoutError(f"The TPU was not {step.wait_for} in {timeout_s} s.")
    time.sleep(every_s)


def run(request: TpuRequest, sdist_path: str) -> None:
  """Runs the steps; the cleanup step runs even if one fails."""
  todo = steps(request, sdist_path)
  try:
    for step in (s for s in todo if not s.cleanup):
      logging.info("%s\n  %s", step.what, shlex.join(step.argv))
      if step.wait_for:
        _wait(step)
      else:
        subprocess.run(step.argv, check=True)
  finally:
    for step in (s for s in todo if s.cleanup):
      logging.info("%s\n  %s", step.what, shlex.join(step.argv))
      subprocess.run(step.argv, check=False)


def _define_flags() -> None:
  """The command line; defined only when this module is the program."""
  flags.DEFINE_string("project", None, "Google Cloud project ID.")
  flags.DEFINE_string("zone", None, "Zone, e.g. us-west4-a.")
  flags.DEFINE_string("accelerator", "v5litepod-8",
                      "TPU type: v5litepod-8, v5p-8, v6e-8, ...")
  flags.DEFINE_string("name", None, "TPU name (default: cf-trainer-TIME).")
  flags.DEFINE_bool("spot", False, "Spot capacity.")
  flags.DEFINE_string("runtime_version", "",
                      "TPU VM software version (default per accelerator).")
  flags.DEFINE_bool("keep", False, "Do not delete the TPU at the end.")
  flags.DEFINE_string("package", "", "Use this sdist instead of building one.")
  flags.DEFINE_bool("dry_run", False,
                    "Print the gcloud commands; run nothing.")


def main(argv: Sequence[str]) -> None:
  """Flags -> TpuRequest -> the gcloud commands, printed or run."""
  f = flags.FLAGS
  request = TpuRequest(
      project=f.project or "", zone=f.zone or "", accelerator=f.accelerator,
      name=f.name or packaging.default_name(), trainer_args=tuple(argv[1:]),
      spot=f.spot, runtime_version=f.runtime_version, keep=f.keep)
  try:
    check(request)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  sdist = f.package or packaging.build_sdist()
  if f.dry_run:
    print(dry_run_text(request, sdist), end="")
    return
  run(request, sdist)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
