"""Graceful stop on SIGTERM (preemption) and SIGINT (Ctrl-C): finish the step, save, exit non-zero.

  with preemption.PreemptionHandler() as stop:
    for step in ...:
      train_step(...)
      if stop.requested:
        save_checkpoint(...)
        raise stop.stopped(f"after step {step}; checkpoint saved in {path}")   # exit 143 / 130 via cli.run

The first signal only sets `requested`: the running step finishes, the loop (which polls the flag after
each step) writes a checkpoint and raises `Preempted`, which `dml_jax.cli.run` prints as one line and
turns into exit status 128 + signal number (143 for SIGTERM, 130 for SIGINT), so a scheduler sees a
failure and a resume picks up the saved step. The first signal also restores the system's default
action, so a second one ends the process at once, even while Python waits inside a long computation
(the shell reports 143 / 130 as well); nothing is saved then, the last committed checkpoint stays.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from dml_jax.cli import Stopped

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Stopped):
  """Raised by the training loop after it saved on a signal; cli.run exits with 128 + the signal number."""

  def __init__(self, signum: int, detail: str = ""):
    self.signum = signum
    self.signal_name = signal.Signals(signum).name
    self.exit_status = 128 + signum
    text = f"stopped by {self.signal_name}" + (f" {detail}" if detail else "")
    super().__init__(f"{text}; rerun the same command to resume")


def _default_echo(line: str) -> None:
  # os.write, not print: the handler may interrupt a print to stderr, and a buffered stream is not reentrant.
  try:
    os.write(sys.stderr.fileno(), (line + "\n").encode())
  except (OSError, ValueError, AttributeError):
    pass


class PreemptionHandler:
  """Turns the first SIGTERM / SIGINT into a flag; the second one ends the process at once.

  Install it in the main thread (Python delivers signals there only); `uninstall` (or leaving the
  `with` block) restores the previous handlers. `requested` is safe to poll from any thread.
  """

  def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, *, echo: Callable[[str], None] = _default_echo):
    self.signals = tuple(signals)
    self._echo = echo
    self._event = threading.Event()
    self._previous: dict[int, object] = {}
    self.signum: int | None = None
    self.received_at: float | None = None

  @property
  def requested(self) -> bool:
    """True once a signal arrived: finish the current step, save, then raise `stopped()`."""
    return self._event.is_set()

  @property
  def signal_name(self) -> str | None:
    return None if self.signum is None else signal.Signals(self.signum).name

  def install(self) -> PreemptionHandler:
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionHandler.install() must run in the main thread (signals are delivered there)")
    for signum in self.signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      # A second signal already reset the handler to the default; restoring the previous one is still right.
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()

  def __enter__(self) -> PreemptionHandler:
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def _handle(self, signum, frame) -> None:
    del frame
    if self._event.is_set():  # only if the default action could not be restored below
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = signum
    self.received_at = time.time()
    self._event.set()
    # From now on the kernel handles these signals: a second one terminates at once, even while the
    # main thread is blocked in XLA or I/O where no Python handler could run.
    for s in self.signals:
      signal.signal(s, signal.SIG_DFL)
    name = signal.Signals(signum).name
    self._echo(f"received {name}: finishing the current step, then saving a checkpoint and exiting "
               f"(send it again to stop at once without saving)")

  def stopped(self, detail: str = "") -> Preempted:
    """The exception to raise once the checkpoint is written; `detail` e.g. 'after step 120; saved in ...'."""
    if self.signum is None:
      raise RuntimeError("stopped() called without a signal")
    return Preempted(self.signum, detail)

  def request(self, signum: int = signal.SIGTERM) -> None:
    """Sets the flag as a signal would (tests, or a cluster's preemption notice read from elsewhere)."""
    self.signum = signum
    self.received_at = time.time()
    self._event.set()
