"""What both launchers share: the sdist, the pinned TensorFlow, trainer flags."""

import datetime
import glob
import os
import subprocess
import sys
import tempfile
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pinned in setup.py (a test checks they agree). Every target installs exactly
# this version: no prebuilt Vertex AI image carries it (see README).
TENSORFLOW_VERSION = "2.20.0"
# The Cloud TPU index that holds libtpu for the tensorflow-tpu wheels.
LIBTPU_INDEX = "https://storage.googleapis.com/libtpu-tf-releases/index.html"
TPU_TENSORFLOW = f"tensorflow-tpu=={TENSORFLOW_VERSION}"
GPU_TENSORFLOW = f"tensorflow[and-cuda]=={TENSORFLOW_VERSION}"


def build_sdist(out_dir: str = "") -> str:
  """Builds this package's source distribution, offline.

  Args:
    out_dir: Folder for the archive; a new temporary folder if empty.

  Returns:
    The path of the .tar.gz.

  Raises:
    FileNotFoundError: Outside a source checkout (no setup.py).
    RuntimeError: If setuptools fails (its output is in the message).
  """
  setup_py = os.path.join(REPO, "setup.py")
  if not os.path.exists(setup_py):
    raise FileNotFoundError(
        f"No setup.py in {REPO}: launch from a source checkout.")
  out_dir = out_dir or tempfile.mkdtemp(prefix="cf-trainer-sdist-")
  # egg_info goes to out_dir too, so the checkout is left untouched.
  proc = subprocess.run(
      [sys.executable, setup_py, "-q", "egg_info", "--egg-base", out_dir,
       "sdist", "--dist-dir", out_dir], cwd=REPO, capture_output=True,
      text=True, check=False)
  archives = glob.glob(os.path.join(out_dir, "*.tar.gz"))
  if proc.returncode or len(archives) != 1:
    raise RuntimeError(f"Building the sdist failed:\n{proc.stdout}{proc.stderr}")
  return archives[0]


def default_name(prefix: str = "cf-trainer") -> str:
  """A job or TPU name unique to the second, e.g. cf-trainer-20250101-120000."""
  now = datetime.datetime.now(datetime.timezone.utc)
  return f"{prefix}-{now:%Y%m%d-%H%M%S}"


def has_flag(args: Sequence[str], name: str) -> bool:
  """Whether trainer arguments already set --name (as --name=v or --name v)."""
  return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def with_defaults(args: Sequence[str], **defaults: str) -> list:
  """Trainer arguments plus --key=value for each default the user did not set.

  Args:
    args: Trainer flags as given after `--`.
    **defaults: Flag values to add when absent, in this order, before args.

  Returns:
    The new argument list; the user's flags always win.
  """
  added = [f"--{k}={v}" for k, v in defaults.items() if not has_flag(args, k)]
  return added + list(args)
