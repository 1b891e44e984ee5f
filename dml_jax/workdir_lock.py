"""One run per workdir: an exclusive lock file naming its holder (host, process, start time, command).

  with WorkdirLock(workdir):        # WorkdirLockedError (a UserError) when another run holds it
    train(...)

The lock is `fcntl.flock` on `<workdir>/run.lock`, held for the life of the process: the kernel drops it
when the holder exits in any way, kill -9 included, so a lock left by a killed run is free and the next
run takes it over (saying whose it was). The file holds the holder's host, pid and start time, which
name it in the error a second run stops with. On a clean release the file is removed.

File systems without flock (some network or FUSE mounts) fall back to creating the file with O_EXCL:
a lock whose holder ran on this host and no longer exists is taken over; one from another host cannot
be checked from here, so the error says to remove the file once that run is known to be gone.

Several processes of one multi-host run share its workdir: only one of them (process 0) should lock it.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable

from dml_jax.errors import UserError

LOCK_NAME = "run.lock"
# flock is not supported here: fall back to O_EXCL.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
# A fallback lock file still empty after this long was left by a process killed while writing it.
_EMPTY_LOCK_GRACE_S = 10.0


@dataclasses.dataclass(frozen=True)
class LockHolder:
  """Who holds (or held) a lock: read from the lock file."""

  host: str
  pid: int
  started: str  # ISO 8601, local time with offset
  command: str = ""
  pid_start: str | None = None  # the process start tick (Linux /proc), to tell a reused pid apart

  def describe(self) -> str:
    text = f"process {self.pid} on host {self.host} (started {self.started}"
    return text + (f": {self.command})" if self.command else ")")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def parse(cls, text: str) -> LockHolder | None:
    try:
      data = json.loads(text)
      return cls(host=str(data["host"]), pid=int(data["pid"]), started=str(data["started"]),
                 command=str(data.get("command", "")), pid_start=data.get("pid_start"))
    except (ValueError, KeyError, TypeError):
      return None


class WorkdirLockedError(UserError):
  """Another run holds the workdir's lock."""

  def __init__(self, workdir: str, holder: LockHolder | None, lock_path: str, *, checked: bool = True):
    self.holder = holder
    who = holder.describe() if holder else "another process (its lock file is still being written)"
    if checked:
      hint = "wait for that run to end, stop it, or pass another --workdir"
    else:
      hint = (f"this file system cannot tell whether it still runs: once it is gone, remove {lock_path}; "
              "or pass another --workdir")
    super().__init__(f"workdir {workdir} is in use by {who}", hint)


def _pid_start(pid: int) -> str | None:
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      stat = f.read()
  except OSError:
    return None
  # Field 22 (starttime), counted after the parenthesised command name, which may hold spaces.
  fields = stat.rsplit(")", 1)[-1].split()
  return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int, pid_start: str | None = None) -> bool:
  """Whether process `pid` of this host exists (and, given its start tick, is the same process)."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: it exists
  if pid_start is not None:
    current = _pid_start(pid)
    if current is not None and current != pid_start:
      return False  # the pid was reused by a later process
  return True


def _this_holder() -> LockHolder:
  now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  return LockHolder(host=socket.gethostname(), pid=os.getpid(), started=now,
                    command=shlex.join([os.path.basename(sys.executable)] + sys.argv)[:500],
                    pid_start=_pid_start(os.getpid()))


def _echo_stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class WorkdirLock:
  """An exclusive, non-blocking lock on a workdir (see the module docstring).

  acquire() creates the workdir if needed; release() removes the lock file, and the workdir too when
  acquire() created it and nothing else was written into it (a run that failed early leaves no trace).
  `stale_holder` is the holder of a stale lock taken over by acquire(), else None.
  """

  def __init__(self, workdir: str | os.PathLike, *, name: str = LOCK_NAME,
               echo: Callable[[str], None] = _echo_stderr):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.path = os.path.join(self.workdir, name)
    self._echo = echo
    self._fd: int | None = None
    self._mode: str | None = None  # 'flock' | 'exclusive_file'
    self._created_workdir = False
    self.stale_holder: LockHolder | None = None
    self.holder: LockHolder | None = None

  @property
  def locked(self) -> bool:
    return self._fd is not None

  def acquire(self) -> WorkdirLock:
    if self.locked:
      raise RuntimeError(f"{self.path} is already locked by this object")
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise UserError(f"workdir {self.workdir} exists and is not a folder", "pass a folder as --workdir")
    os.makedirs(os.path.dirname(self.workdir), exist_ok=True)
    try:
      os.mkdir(self.workdir)  # atomic: of two runs creating it, one learns it did
      self._created_workdir = True
    except FileExistsError:
      pass
    try:
      self._acquire_flock()
    except OSError as e:
      if e.errno not in _NO_FLOCK:
        raise
      self._acquire_exclusive_file()
    if self.stale_holder is not None:
      self._echo(f"taking over the lock of {self.stale_holder.describe()} in {self.workdir}: "
                 "that run ended without releasing it (killed?)")
    return self

  def _acquire_flock(self) -> None:
    import fcntl  # pylint: disable=import-outside-toplevel

    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except FileNotFoundError:  # a finishing run removed the workdir it had created, just now
        os.makedirs(self.workdir, exist_ok=True)
        continue
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = LockHolder.parse(_read_fd(fd))
        os.close(fd)
        raise WorkdirLockedError(self.workdir, holder, self.path) from None
      except OSError as e:
        if e.errno in _NO_FLOCK and not _read_fd(fd).strip():
          # The empty file this attempt created would read as a lock being written to the O_EXCL fallback.
          try:
            os.unlink(self.path)
          except FileNotFoundError:
            pass
        os.close(fd)
        raise
      # The holder we waited on may have removed the file on release (or another run replaced it):
      # a lock on an unlinked inode locks nothing, so lock the file that is there now.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      previous = _read_fd(fd)
      if previous.strip():
        # The lock is free, yet the file names a holder: that process died without releasing it.
        self.stale_holder = LockHolder.parse(previous) or LockHolder("unknown", -1, "unknown")
      self._write_holder(fd)
      self._fd, self._mode = fd, "flock"
      return

  def _acquire_exclusive_file(self) -> None:
    for _ in range(5):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        try:
          with open(self.path, encoding="utf-8") as f:
            text = f.read()
          age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
          continue  # released meanwhile
        holder = LockHolder.parse(text)
        if holder is None:
          if age < _EMPTY_LOCK_GRACE_S:
            raise WorkdirLockedError(self.workdir, None, self.path) from None
          stale = LockHolder("unknown", -1, "unknown")
        elif holder.host != socket.gethostname():
          raise WorkdirLockedError(self.workdir, holder, self.path, checked=False) from None
        elif pid_alive(holder.pid, holder.pid_start):
          raise WorkdirLockedError(self.workdir, holder, self.path) from None
        else:
          stale = holder
        try:
          os.unlink(self.path)
        except FileNotFoundError:
          pass
        self.stale_holder = stale
        continue
      self._write_holder(fd)
      self._fd, self._mode = fd, "exclusive_file"
      return
    raise WorkdirLockedError(self.workdir, None, self.path)

  def _write_holder(self, fd: int) -> None:
    self.holder = _this_holder()
    data = (self.holder.to_json() + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      # Remove the file while still holding the lock, so no one reads our name from a released lock.
      if os.path.samestat(os.fstat(fd), os.stat(self.path)):
        os.unlink(self.path)
    except FileNotFoundError:
      pass
    finally:
      os.close(fd)  # releases the flock
    if self._created_workdir:
      try:
        os.rmdir(self.workdir)  # only succeeds when the run wrote nothing
      except OSError:
        pass

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_fd(fd: int) -> str:
  try:
    return os.pread(fd, 65536, 0).decode("utf-8", "replace")
  except OSError:
    return ""
