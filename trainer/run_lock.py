"""One writer per model_dir: a lease file that the running trainer keeps renewing.

A supervisor that restarts a job whose old process is still alive would
otherwise get two trainers writing (and deleting) checkpoints in one folder.
The lease, `MODEL_DIR/RUN_LOCK`, names its holder (host, pid, start time) and
is renewed every `timeout / 4` seconds. A new run refuses a live lease with a
message naming the holder; it takes over a lease whose holder stopped
renewing for more than `timeout` seconds (a SIGKILLed process, a lost VM), or
at once when the holder was on this host and its pid is gone.

Works through tf.io.gfile, so on local disk and on gs://. Creating the lease
is atomic on local disk (O_EXCL). On gs:// two starts within the same second
could both write it: each reads it back after a short pause and only the one
whose record is there proceeds; a later renewal that finds another holder's
record stops renewing and says so.
"""

import json
import os
import socket
import threading
import time
import uuid

from absl import logging
import tensorflow as tf

LOCK_NAME = "RUN_LOCK"


class RunLockHeld(RuntimeError):
  """Another live run holds the model_dir."""


def _now() -> float:
  return time.time()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunLock:
  """The lease on one model_dir.

  Args:
    model_dir: The run's folder (local or gs://).
    timeout_secs: A lease not renewed for this long is taken over.
  """

  def __init__(self, model_dir: str, timeout_secs: float = 60.0):
    self.path = os.path.join(model_dir, LOCK_NAME)
    self._timeout = timeout_secs
    self._record = {"host": socket.gethostname(), "pid": os.getpid(),
                    "token": uuid.uuid4().hex,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    self._stop = threading.Event()
    self._lost = threading.Event()
    self._thread = None

  def _read(self):
    try:
      with tf.io.gfile.GFile(self.path) as f:
        return json.load(f)
    except (tf.errors.NotFoundError, ValueError):
      return None

  def _write(self, exclusive: bool) -> bool:
    record = dict(self._record, heartbeat=_now())
    data = json.dumps(record)
    if exclusive and "://" not in self.path:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(data)
      return True
    tmp = f"{self.path}.{self._record['token']}"
    with tf.io.gfile.GFile(tmp, "w") as f:
      f.write(data)
    tf.io.gfile.rename(tmp, self.path, overwrite=True)
    return True

  def _stale(self, holder) -> str:
    """Why the holder's lease may be taken over ("" if it may not)."""
    age = _now() - float(holder.get("heartbeat", 0))
    if age > self._timeout:
      return f"no heartbeat for {age:.0f}s"
    if (holder.get("host") == self._record["host"] and
        not _pid_alive(int(holder.get("pid", -1)))):
      return f"pid {holder.get('pid')} is gone"
    return ""

  def acquire(self) -> None:
    """Takes the lease, or raises RunLockHeld naming the live holder."""
    tf.io.gfile.makedirs(os.path.dirname(self.path))
    holder = self._read()
    if holder is not None:
      reason = self._stale(holder)
      if not reason:
        raise RunLockHeld(self._held_message(holder))
      logging.warning("Taking over %s from host %s pid %s: %s.", self.path,
                      holder.get("host"), holder.get("pid"), reason)
      tf.io.gfile.remove(self.path)
    if not self._write(exclusive=True):
      raise RunLockHeld(self._held_message(self._read() or {}))
    time.sleep(0.5)  # Let a concurrent writer's record land, then check.
    mine = self._read()
    if not mine or mine.get("token") != self._record["token"]:
      raise RunLockHeld(self._held_message(mine or {}))
    logging.info("Holding %s (host %s, pid %d); a second run on this "
                 "model_dir is refused while this one renews it.", self.path,
                 self._record["host"], self._record["pid"])
    self._thread = threading.Thread(target=self._renew, daemon=True,
                                    name="run-lock-heartbeat")
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self._timeout / 4):
      current = self._read()
      if not current or current.get("token") != self._record["token"]:
        self._lost_to = current or {}
        logging.error("%s is now held by host %s pid %s: this run lost its "
                      "lease and stops.", self.path,
                      (current or {}).get("host"), (current or {}).get("pid"))
        self._lost.set()
        return
      try:
        self._write(exclusive=False)
      except tf.errors.OpError as e:  # A passing storage error: next time.
        logging.warning("Could not renew %s: %s", self.path, e)

  def check(self) -> None:
    """Raises RunLockHeld if another run took the lease (e.g. two starts on
    gs:// within the same instant): the caller stops before writing more."""
    if self._lost.is_set():
      raise RunLockHeld(
          f"This run lost {self.path} to host {self._lost_to.get('host')} "
          f"pid {self._lost_to.get('pid')} and stopped; that run goes on.")

  def release(self) -> None:
    """Stops renewing and removes the lease if it is still this run's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    current = self._read()
    if current and current.get("token") == self._record["token"]:
      tf.io.gfile.remove(self.path)

  def _held_message(self, holder) -> str:
    age = _now() - float(holder.get("heartbeat", _now()))
    return (f"{os.path.dirname(self.path)} is held by a live run: host "
            f"{holder.get('host')}, pid {holder.get('pid')}, since "
            f"{holder.get('started')} (last heartbeat {age:.0f}s ago). Stop "
            f"it or use another --model_dir; a holder that stops renewing is "
            f"taken over after {self._timeout:.0f}s (at once on the same "
            "host when its pid is gone).")

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
