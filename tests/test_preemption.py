"""SIGTERM / SIGINT with real signals to a child running a tiny training loop: the first signal finishes the step,
saves and exits 143 / 130 with one line; a second signal ends the process at once without saving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dml_jax import cli
from dml_jax.preemption import Preempted, PreemptionHandler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A loop shaped as the trainer's: steps of `step_s` seconds, the flag polled after each, a save, then Preempted.
_LOOP = textwrap.dedent("""
    import json, sys, time
    from dml_jax import cli
    from dml_jax.preemption import PreemptionHandler

    out, step_s = sys.argv[1], float(sys.argv[2])

    def train():
      with PreemptionHandler() as stop:
        for step in range(1, 10_000):
          print(f"step {step}", flush=True)
          deadline = time.time() + step_s
          while time.time() < deadline:  # busy, as a step is; a signal does not cut it short
            pass
          if stop.requested:
            with open(out, "w") as f:
              json.dump({"step": step}, f)
            raise stop.stopped(f"after step {step}; checkpoint saved in {out}")
      return 0

    sys.exit(cli.run(train))
    """)


def _start(tmp_path, step_s: float):
  out = tmp_path / "saved.json"
  proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(out), str(step_s)], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
  assert proc.stdout.readline().startswith("step 1"), proc.stderr.read()
  return proc, out


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_first_signal_finishes_the_step_saves_and_exits_nonzero(tmp_path, signum, status):
  proc, out = _start(tmp_path, step_s=0.3)
  proc.send_signal(signum)
  stdout, stderr = proc.communicate(timeout=60)
  assert proc.returncode == status, stderr
  saved = json.loads(out.read_text())["step"]
  steps = [int(line.split()[1]) for line in ("step 1\n" + stdout).splitlines() if line.startswith("step")]
  assert saved == max(steps)  # the step that was running finished, then the save, no further step
  name = signal.Signals(signum).name
  lines = stderr.strip().splitlines()
  assert lines[0].startswith(f"received {name}: finishing the current step")
  assert lines[-1] == f"stopped by {name} after step {saved}; checkpoint saved in {out}; rerun the same command " \
                      "to resume"
  assert "Traceback" not in stderr


def test_second_signal_exits_at_once_without_saving(tmp_path):
  proc, out = _start(tmp_path, step_s=30.0)  # a step far longer than the test waits
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  start = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=20)
  assert time.monotonic() - start < 10
  assert proc.returncode == -signal.SIGTERM  # killed by the signal: the shell reports 143
  assert not out.exists()


def test_handler_restores_previous_handlers_and_request():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionHandler(echo=lambda line: None) as stop:
    assert signal.getsignal(signal.SIGTERM) != before and not stop.requested
    stop.request(signal.SIGTERM)
    assert stop.requested and stop.signal_name == "SIGTERM"
    error = stop.stopped("after step 3")
  assert signal.getsignal(signal.SIGTERM) == before
  assert isinstance(error, Preempted) and error.exit_status == 143
  assert cli.run(lambda: (_ for _ in ()).throw(error)) == 143
