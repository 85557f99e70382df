"""The launchers: golden dry runs, no secrets, and what submission calls.

The golden files under tests/golden/ are the exact dry-run outputs. After an
intended change, regenerate them and review the diff:

  UPDATE_GOLDEN=1 python -m pytest tests/test_launch.py
"""

import json
import os
import re
import subprocess
import sys
from unittest import mock

from absl.testing import parameterized
import tensorflow as tf

from launch import packaging
from launch import tpu_vm
from launch import vertex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")
SDIST = "cf-trainer-0.1.0.tar.gz"
TRAINER_ARGS = ("--train_files=gs://my-bucket/data/train-*.csv.gz",
                "--eval_files=gs://my-bucket/data/eval-*.csv.gz",
                "--id_mode=hash", "--num_bins=2000000", "--epochs=3")
VERTEX = dict(project="my-project", region="us-central1",
              staging_bucket="gs://my-bucket/staging", job_name="mf-1",
              trainer_args=TRAINER_ARGS)
TPU = dict(project="my-project", zone="us-west4-a", name="mf-tpu",
           trainer_args=TRAINER_ARGS)
# Fake secrets a user's shell might hold; none may reach any output.
SECRETS = {
    "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/sa-key-S3CRET1.json",
    "GOOGLE_OAUTH_ACCESS_TOKEN": "ya29.S3CRET2",
    "CLOUDSDK_AUTH_ACCESS_TOKEN": "ya29.S3CRET3",
    "GOOGLE_API_KEY": "AIzaS3CRET4",
    # Any network use fails at once: the dry run must not need it.
    "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
    "NO_GCE_CHECK": "true",
}
FORBIDDEN = ("S3CRET", "token", "signature", "x-goog-", "access_token",
             "private_key", "credentials")


def normalise(text):
  """Replaces the built sdist's folder and name (they vary) with SDIST."""
  text = re.sub(r"[^\s'\"]*cf-trainer-sdist-[^/\s]+/", "", text)
  return re.sub(r"cf[-_]trainer-\d[\w.]*?\.tar\.gz", SDIST, text)


def check_golden(test, name, text):
  path = os.path.join(GOLDEN, name)
  if os.environ.get("UPDATE_GOLDEN"):
    os.makedirs(GOLDEN, exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  with open(path) as f:
    test.assertEqual(text, f.read(), f"{name} differs; see tests/test_launch.py "
                     "on regenerating golden files.")


def run_cli(module, *args):
  env = {**os.environ, **SECRETS}
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=120)
  return proc


class VertexGoldenTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("cpu", dict(machine="cpu")),
      ("a100x1", dict(machine="a100x1")),
      ("a100x8", dict(machine="a100x8")),
      ("h100x8", dict(machine="h100x8")),
      ("v5e_4", dict(machine="v5e-4")),
      ("v5e_8", dict(machine="v5e-8")),
      ("v5e_16_multihost", dict(machine="v5e-16")),
      ("workers", dict(machine="a100x8", workers=3, spot=True,
                       service_account="trainer@my-project.iam.gserviceaccount.com",
                       tensorboard="projects/my-project/locations/us-central1/"
                       "tensorboards/123")),
      ("parameter_servers", dict(machine="cpu", workers=4,
                                 parameter_servers=2,
                                 container_image="us-docker.pkg.dev/my-project/"
                                 "images/cf-trainer:latest")),
  )
  def test_dry_run_matches_golden(self, fields):
    request = vertex.JobRequest(**VERTEX, **fields)
    text = vertex.dry_run_text(request, SDIST)
    name = self._testMethodName.split("_golden_")[-1]
    check_golden(self, f"vertex_{name}.json", text)
    # The JSON is the API's: it parses back into the same CustomJob.
    from google.cloud.aiplatform_v1 import types  # pylint: disable=g-import-not-at-top
    job = types.CustomJob.from_json(
        json.dumps(json.loads(text)["custom_job"]))
    self.assertEqual(job, vertex.build_custom_job(request, SDIST))

  def test_strategy_follows_the_machine_unless_given(self):
    def args(**fields):
      return vertex.trainer_args(vertex.JobRequest(
          **{**VERTEX, "trainer_args": ()}, **fields))
    self.assertEqual(args(machine="cpu"), [])
    self.assertEqual(args(machine="h100x8"), ["--strategy=mirrored"])
    self.assertEqual(args(machine="v5e-8"), ["--strategy=tpu", "--tpu=local"])
    self.assertEqual(args(machine="cpu", workers=2), ["--strategy=multi_worker"])
    self.assertEqual(args(machine="a100x8", workers=1, parameter_servers=1),
                     ["--strategy=parameter_server"])
    given = vertex.trainer_args(vertex.JobRequest(
        **{**VERTEX, "trainer_args": ("--strategy", "one_device")},
        machine="a100x1"))
    self.assertEqual(given, ["--strategy", "one_device"])

  def test_impossible_jobs_are_refused(self):
    for fields, message in (
        (dict(machine="v5e-8", workers=2), "one slice"),
        (dict(machine="cpu", parameter_servers=1), "needs --workers"),
        (dict(machine="cpu", tensorboard="projects/p/x"), "service_account"),
        (dict(machine="tpu-9000"), "Unknown --machine"),
        (dict(machine="cpu", staging_bucket="/tmp/b"), "gs://")):
      with self.assertRaisesRegex(ValueError, message):
        vertex.check(vertex.JobRequest(**{**VERTEX, **fields}))

  def test_submit_uploads_then_creates_the_same_job(self):
    request = vertex.JobRequest(**VERTEX, machine="a100x1")
    with mock.patch("google.cloud.storage.Client") as storage_client, \
         mock.patch("google.cloud.aiplatform_v1.JobServiceClient") as jobs:
      jobs.return_value.create_custom_job.return_value.name = (
          "projects/123/locations/us-central1/customJobs/456")
      name = vertex.submit(request, f"/tmp/dist/{SDIST}")
    bucket = storage_client.return_value.bucket
    bucket.assert_called_once_with("my-bucket")
    bucket.return_value.blob.assert_called_once_with(
        f"staging/cf-trainer/mf-1/package/{SDIST}")
    bucket.return_value.blob.return_value.upload_from_filename \
        .assert_called_once_with(f"/tmp/dist/{SDIST}")
    jobs.assert_called_once_with(
        client_options={"api_endpoint": "us-central1-aiplatform.googleapis.com"})
    jobs.return_value.create_custom_job.assert_called_once_with(
        parent="projects/my-project/locations/us-central1",
        custom_job=vertex.build_custom_job(request, SDIST))
    self.assertIn("training/456/cpu?project=my-project",
                  vertex.links(request, name))
    self.assertIn(f"gcloud ai custom-jobs stream-logs {name}",
                  vertex.links(request, name))

  def test_cli_dry_run_needs_no_credentials_and_leaks_none(self):
    proc = run_cli("launch.vertex", "--project=my-project",
                   "--region=us-central1", "--staging_bucket=gs://my-bucket/staging",
                   "--machine=cpu", "--job_name=mf-1", "--dry_run", "--",
                   *TRAINER_ARGS)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    with open(os.path.join(GOLDEN, "vertex_cpu.json")) as f:
      self.assertEqual(normalise(proc.stdout), f.read())
    for word in FORBIDDEN:
      self.assertNotIn(word.lower(), (proc.stdout + proc.stderr).lower())
    # Dry runs never load the client libraries that look for credentials.
    self.assertNotIn("google.cloud.storage", proc.stderr)


class TpuVmGoldenTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("v5litepod_8_spot", dict(accelerator="v5litepod-8", spot=True)),
      ("v6e_8_keep", dict(accelerator="v6e-8", keep=True)),
  )
  def test_dry_run_matches_golden(self, fields):
    text = tpu_vm.dry_run_text(tpu_vm.TpuRequest(**TPU, **fields), SDIST)
    name = self._testMethodName.split("_golden_")[-1]
    check_golden(self, f"tpu_vm_{name}.txt", text)

  def test_cli_dry_run_leaks_nothing(self):
    proc = run_cli("launch.tpu_vm", "--project=my-project", "--zone=us-west4-a",
                   "--accelerator=v5litepod-8", "--spot", "--name=mf-tpu",
                   "--dry_run", "--", *TRAINER_ARGS)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    with open(os.path.join(GOLDEN, "tpu_vm_v5litepod_8_spot.txt")) as f:
      self.assertEqual(normalise(proc.stdout), f.read())
    for word in FORBIDDEN:
      self.assertNotIn(word.lower(), (proc.stdout + proc.stderr).lower())

  def test_tpu_is_deleted_even_when_training_fails(self):
    calls = []
    def fake_run(argv, **kwargs):
      calls.append(argv)
      if "--command=" in " ".join(argv) and "trainer.task" in " ".join(argv):
        raise subprocess.CalledProcessError(1, argv)
      return mock.Mock(stdout="ACTIVE\n")
    request = tpu_vm.TpuRequest(**TPU, accelerator="v5p-8")
    with mock.patch.object(subprocess, "run", fake_run):
      with self.assertRaises(subprocess.CalledProcessError):
        tpu_vm.run(request, SDIST)
    self.assertEqual([c[3:5] for c in calls],
                     [("queued-resources", "create"),
                      ("queued-resources", "describe"), ("tpu-vm", "scp"),
                      ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
                      ("queued-resources", "delete")])

  def test_bad_accelerator_is_refused(self):
    with self.assertRaisesRegex(ValueError, "not like"):
      tpu_vm.check(tpu_vm.TpuRequest(**TPU, accelerator="v5e"))
    with self.assertRaisesRegex(ValueError, "runtime_version"):
      tpu_vm.check(tpu_vm.TpuRequest(**TPU, accelerator="v9x-8"))


class PackagingTest(tf.test.TestCase):

  def test_tensorflow_version_is_the_pinned_one(self):
    with open(os.path.join(REPO, "setup.py")) as f:
      pins = re.findall(r'"tensorflow==([\d.]+)"', f.read())
    self.assertEqual(pins, [packaging.TENSORFLOW_VERSION])

  def test_user_flags_win(self):
    self.assertEqual(packaging.with_defaults(["--tpu=my-tpu"], strategy="tpu",
                                             tpu="local"),
                     ["--strategy=tpu", "--tpu=my-tpu"])
