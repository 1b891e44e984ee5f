"""Runs train.py with one fault injected at a chosen point, for tests/test_fault_injection.py.

  DML_JAX_FAULT=kill_in_step:5 python tests/fault_driver.py --config configs/demo.py --workdir W ...
  DML_JAX_FAULT=pause:5,slow_signal_save DML_JAX_FAULT_GO=FILE python tests/fault_driver.py ...   (several)

The arguments are train.py's; the driver patches the named point, then runs train.py as `__main__`, so the child
is a real training process (its own signal handlers, lock, grain threads, exit status). Points (N is a global
step: the step that step N's update produces; K counts this process's evaluations from 1):

  kill_in_step:N       SIGKILL while step N computes (its update dispatched, not finished)
  kill_in_orbax:N      SIGKILL while orbax writes step N's folder (inside its temporary folder, before the rename)
  disk_full_in_orbax:N the same write fails with ENOSPC (No space left on device) instead
  kill_in_manifest:N   SIGKILL once the manifest committing step N is written and fsynced under its temporary
                       name, before the rename that commits it
  kill_after_commit:N  SIGKILL right after that rename: step N is committed; its evaluation's log rows, the best
                       embeddings and the removal of old steps have not happened yet
  kill_in_eval:K       SIGKILL during evaluation number K, after its first embedded batch
  pause:N              before step N: print 'fault: paused before step N' on stderr, then wait until the file
                       $DML_JAX_FAULT_GO exists or a signal arrives
  slow_signal_save     the save that follows a SIGTERM / SIGINT first prints 'fault: saving after signal' and
                       sleeps 120 s (so that a second signal surely arrives during it)

Every fault prints one 'fault: ...' line on stderr when it fires, so a test can tell that it did.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import runpy
import signal
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _say(text: str) -> None:
  os.write(2, f"fault: {text}\n".encode())


def _kill(text: str) -> None:
  _say(f"SIGKILL {text}")
  os.kill(os.getpid(), signal.SIGKILL)


_SIGNALLED: list[int] = []  # the signals the trainer's PreemptionHandler received


def _watch_signals() -> None:
  from dml_jax import preemption

  real_handle = preemption.PreemptionHandler._handle

  def handle(self, signum, frame):
    _SIGNALLED.append(signum)
    real_handle(self, signum, frame)

  preemption.PreemptionHandler._handle = handle


def _install(point: str, arg: int | None) -> None:
  from dml_jax.eval import embed as embed_lib
  from dml_jax.train import checkpoint as ckpt_lib
  from dml_jax.train import step as step_lib

  signalled = _SIGNALLED

  if point in ("kill_in_step", "pause"):
    real_update_fn = step_lib.StepCache.update_fn

    def update_fn(self, *args, **kwargs):
      update = real_update_fn(self, *args, **kwargs)

      def wrapped(state, *rest):
        number = int(state["step"]) + 1
        if point == "pause" and number == arg:
          go = os.environ["DML_JAX_FAULT_GO"]
          _say(f"paused before step {number}")
          while not os.path.exists(go) and not signalled:
            time.sleep(0.02)
        out = update(state, *rest)
        if point == "kill_in_step" and number == arg:
          _kill(f"during step {number}")
        return out

      return wrapped

    step_lib.StepCache.update_fn = update_fn

  elif point in ("kill_in_orbax", "disk_full_in_orbax"):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    real_save_fn = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
      match = re.search(r"/steps/(\d+)\.", str(directory))  # the step's temporary folder
      if match and int(match.group(1)) == arg:
        if point == "kill_in_orbax":
          _kill(f"while orbax writes step {arg} into {directory}")
        _say(f"ENOSPC while orbax writes step {arg}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
      return await real_save_fn(self, x, directory)

    json_checkpoint_handler.JsonCheckpointHandler._save_fn = save_fn

  elif point == "kill_in_manifest":
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
      if str(dst).endswith(ckpt_lib.MANIFEST_FILE) and json.loads(pathlib.Path(src).read_text())["last"][:1] == [arg]:
        _kill(f"before renaming {src} (the manifest committing step {arg})")
      return real_replace(src, dst, *args, **kwargs)

    ckpt_lib.os.replace = replace

  elif point == "kill_after_commit":
    real_write = ckpt_lib._write_json_atomically

    def write(path, value):
      real_write(path, value)
      if path.name == ckpt_lib.MANIFEST_FILE and value["last"] and value["last"][0] == arg:
        _kill(f"after committing step {arg}")

    ckpt_lib._write_json_atomically = write

  elif point == "kill_in_eval":
    real_embed = embed_lib.embed_dataset
    calls = []

    class KillAfterFirst:
      def __init__(self, loader):
        self.loader = loader

      def __len__(self):
        return len(self.loader)

      def __iter__(self):
        for number, batch in enumerate(self.loader):
          if number == 1:
            _kill(f"during evaluation {len(calls)} (one batch embedded)")
          yield batch

    def embed_dataset(fn, loader, **kwargs):
      calls.append(1)
      return real_embed(fn, KillAfterFirst(loader) if len(calls) == arg else loader, **kwargs)

    embed_lib.embed_dataset = embed_dataset

  elif point == "slow_signal_save":
    real_save = ckpt_lib.Checkpoints.save

    def save(self, *args, **kwargs):
      if signalled:
        _say("saving after signal")
        time.sleep(120)
      return real_save(self, *args, **kwargs)

    ckpt_lib.Checkpoints.save = save

  elif point:
    raise SystemExit(f"fault_driver: unknown fault {point!r}")


def main() -> None:
  _watch_signals()
  for spec in filter(None, os.environ.get("DML_JAX_FAULT", "").split(",")):
    point, _, arg = spec.partition(":")
    _install(point, int(arg) if arg else None)
  sys.argv = [str(REPO / "train.py"), *sys.argv[1:]]
  runpy.run_path(str(REPO / "train.py"), run_name="__main__")


if __name__ == "__main__":
  main()
