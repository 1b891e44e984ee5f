"""The workdir lock with real processes: a second run stops at once naming the holder; a killed run's lock is
taken over; a clean release leaves no trace; file systems without flock fall back to O_EXCL."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from dml_jax import workdir_lock
from dml_jax.errors import UserError
from dml_jax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A holder that locks the workdir, says so, and waits to be killed (or for stdin to close).
_HOLDER = textwrap.dedent("""
    import sys
    from dml_jax.workdir_lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.read()
    lock.release()
    print("released", flush=True)
    """)


def _start_holder(workdir):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPO, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
  assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
  return proc


def test_second_run_stops_at_once_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  holder = _start_holder(workdir)
  try:
    start = time.monotonic()
    with pytest.raises(WorkdirLockedError) as info:
      WorkdirLock(workdir).acquire()
    assert time.monotonic() - start < 1.0  # no waiting
    message = info.value.headline
    assert f"process {holder.pid} on host {socket.gethostname()}" in message and str(workdir) in message
    assert "another --workdir" in message and isinstance(info.value, UserError)
    assert info.value.holder.pid == holder.pid
  finally:
    holder.stdin.close()
    assert holder.stdout.readline().strip() == "released"
    holder.wait(timeout=30)
  # Released cleanly: no lock file, and the workdir the holder created (and left empty) is gone too.
  assert not workdir.exists()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("{}\n")
  holder = _start_holder(workdir)
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)
  holder.stdin.close()
  assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == holder.pid  # the stale lock file is there
  lines = []
  lock = WorkdirLock(workdir, echo=lines.append).acquire()
  try:
    assert lock.stale_holder is not None and lock.stale_holder.pid == holder.pid
    assert len(lines) == 1 and f"taking over the lock of process {holder.pid}" in lines[0]
    assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == os.getpid()
  finally:
    lock.release()
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]  # a workdir with results stays


def test_two_processes_racing_for_one_workdir_one_wins(tmp_path):
  workdir = tmp_path / "run"
  script = textwrap.dedent("""
      import sys, time
      from dml_jax.workdir_lock import WorkdirLock, WorkdirLockedError
      time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
      try:
        lock = WorkdirLock(sys.argv[1]).acquire()
      except WorkdirLockedError as e:
        print("refused", e.holder.pid if e.holder else None, flush=True)
        sys.exit(2)
      print("locked", flush=True)
      time.sleep(2.0)
      lock.release()
      """)
  start_at = str(time.time() + 1.5)
  procs = [subprocess.Popen([sys.executable, "-c", script, str(workdir), start_at], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO})
           for _ in range(3)]
  outputs = [p.communicate(timeout=60) for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 2, 2], outputs
  winner = next(p for p in procs if p.returncode == 0)
  for (out, _), p in zip(outputs, procs):
    if p.returncode == 2:
      assert out.split() in (["refused", str(winner.pid)], ["refused", "None"]), out


def test_lock_is_exclusive_within_a_process_and_reusable_after_release(tmp_path):
  first = WorkdirLock(tmp_path).acquire()
  with pytest.raises(WorkdirLockedError, match=f"process {os.getpid()}"):
    WorkdirLock(tmp_path).acquire()
  first.release()
  with WorkdirLock(tmp_path) as again:
    assert again.locked and again.stale_holder is None
  assert not (tmp_path / LOCK_NAME).exists() and tmp_path.is_dir()  # a workdir it did not create stays


def test_a_file_as_workdir_is_a_user_error(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(UserError, match="is not a folder"):
    WorkdirLock(tmp_path / "f").acquire()


def test_fallback_without_flock(tmp_path, monkeypatch):
  import fcntl

  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_flock)
  lock = WorkdirLock(tmp_path).acquire()
  assert lock._mode == "exclusive_file"  # pylint: disable=protected-access
  with pytest.raises(WorkdirLockedError, match=f"process {os.getpid()}"):
    WorkdirLock(tmp_path).acquire()
  lock.release()
  assert not (tmp_path / LOCK_NAME).exists()
  # A dead holder on this host is stale; one on another host cannot be checked and is refused.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  stale = workdir_lock.LockHolder(socket.gethostname(), int(dead.stdout), "2020-01-01T00:00:00")
  (tmp_path / LOCK_NAME).write_text(stale.to_json())
  lines = []
  lock = WorkdirLock(tmp_path, echo=lines.append).acquire()
  assert lock.stale_holder == stale and "taking over" in lines[0]
  lock.release()
  remote = workdir_lock.LockHolder("elsewhere", 1, "2020-01-01T00:00:00")
  (tmp_path / LOCK_NAME).write_text(remote.to_json())
  with pytest.raises(WorkdirLockedError, match=r"process 1 on host elsewhere.*once it is gone, remove"):
    WorkdirLock(tmp_path).acquire()
