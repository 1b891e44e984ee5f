"""Faults injected into real training processes: kill -9 at chosen points, a full disk during a save, SIGTERM /
SIGINT (and a second signal), a corrupted newest checkpoint, two runs on one workdir. Nothing is lost, and the
finished run equals one that never stopped.

Each test starts `train.py` in a child process (through tests/fault_driver.py, which injects the fault at a chosen
point), then finishes the run in this process with `loop.fit` on the same workdir, as rerunning the command would,
and compares what it leaves with one uninterrupted run of the same config (the `uninterrupted` fixture): the train
loss of every step in metrics.jsonl (each step once), the evaluation rows, the manifest's `last` and `best`, every
array of the final train state bit for bit, and the best test embeddings.

The run: the embedded digits, a ViT of depth 2 and width 64 at 32 px, 2 epochs of 3 steps of 16 images, evaluation
after each epoch, a mid-epoch checkpoint every 2 steps, the 2 newest steps kept. It commits step 2 (mid-epoch 0),
3 (end of epoch 0, best), 4 (mid-epoch 1) and 6 (end of epoch 1, new best): last = [6, 4], best = 6.

The converter's `--out` on a foreign folder (refused, nothing touched) is
tests/test_convert_cli.py::test_out_refuses_what_is_not_a_weights_directory; the lock alone (racing starts, the
O_EXCL fallback) is tests/test_workdir_lock.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dml_jax import cli
from dml_jax import pytree as tree_lib
from dml_jax.eval import saved as saved_lib
from dml_jax.train import checkpoint as ckpt_lib
from dml_jax.train import loop
from dml_jax.workdir_lock import LOCK_NAME, WorkdirLockedError

pytestmark = pytest.mark.integration  # whole train.py processes: `pytest -m integration`

REPO = pathlib.Path(__file__).resolve().parents[1]

# The run, as train.py flags over configs/demo.py (the child) and as a config (this process): the same values.
OVERRIDES = {
    "num_epochs": 2,
    "data.batch_size": 16,
    "data.steps_per_epoch": 3,
    "data.num_threads": 2,
    "eval.every_epochs": 1,
    "eval.before_training": False,
    "checkpoint.every_steps": 2,
    "checkpoint.keep_last": 2,
    "log.every_steps": 1,
    "log.progress": False,
    "log.tensorboard": False,
    "log.plots": False,
}


def run_config():
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.update_from_flattened_dict(OVERRIDES)
  return c


def start_child(workdir: pathlib.Path, fault: str = "", go: pathlib.Path | None = None) -> subprocess.Popen:
  """train.py (through the fault driver) on the run's config, in a process of its own."""
  args = [sys.executable, str(REPO / "tests" / "fault_driver.py"), "--config", "configs/demo.py",
          *[f"--config.{k}={v}" for k, v in OVERRIDES.items()], "--workdir", str(workdir)]
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "DML_JAX_FAULT": fault,
         "DML_JAX_FAULT_GO": str(go or "")}
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 240) -> list[str]:
  """Reads the child's stderr until a line holds `text`; returns the lines read."""
  lines, deadline = [], time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = proc.stderr.readline()
    if not line:
      break
    lines.append(line.rstrip("\n"))
    if text in line:
      return lines
  proc.kill()
  out, err = proc.communicate()
  raise AssertionError(f"the child never said {text!r}; stderr:\n" + "\n".join(lines) + err[-3000:])


def run_killed(workdir: pathlib.Path, fault: str) -> str:
  proc = start_child(workdir, fault)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  assert "fault: SIGKILL" in err, err[-3000:]
  return err


def resume(workdir: pathlib.Path, capsys) -> str:
  """Reruns the same config on the workdir (in this process); returns what it printed."""
  capsys.readouterr()
  loop.fit(run_config(), workdir)
  out = capsys.readouterr()
  assert "differs from the checkpoint's" not in out.out  # the same config as the child's
  return out.out + out.err


# ------------------------------------------------------------------------------------------- what a run left


def records(workdir: pathlib.Path, kind: str) -> list[dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train_losses(workdir):
  return [(r["step"], r["epoch"], r["loss"]) for r in records(workdir, "train")]


def evaluations(workdir):
  """The evaluation rows of training (not those of --eval_only, which name their checkpoint), timings aside."""
  return [{k: v for k, v in r.items() if k not in ("time", "kind")} for r in records(workdir, "eval")
          if "checkpoint" not in r]


def manifest(workdir) -> dict:
  return json.loads((workdir / "checkpoints" / ckpt_lib.MANIFEST_FILE).read_text())


def final_state(workdir) -> dict[str, np.ndarray]:
  step = manifest(workdir)["last"][0]
  path = workdir.absolute() / "checkpoints" / ckpt_lib.STEPS_DIR / str(step) / "state"
  return {p: np.asarray(x) for p, x in tree_lib.flatten(ocp.StandardCheckpointer().restore(path)).items()}


def assert_same_run(workdir: pathlib.Path, reference: pathlib.Path) -> None:
  """Everything a finished run leaves equals the uninterrupted run's (timings aside)."""
  assert train_losses(workdir) == train_losses(reference)  # every step once, the same losses bit for bit
  assert evaluations(workdir) == evaluations(reference)
  assert records(workdir, "summary")[-1]["best"] == records(reference, "summary")[-1]["best"]
  ours, theirs = manifest(workdir), manifest(reference)
  assert ours["best"] == theirs["best"] and ours["last"][0] == theirs["last"][0]
  a, b = final_state(workdir), final_state(reference)
  assert sorted(a) == sorted(b)
  for path in a:
    assert a[path].dtype == b[path].dtype and a[path].tobytes() == b[path].tobytes(), path
  ea, eb = (saved_lib.load_embeddings(saved_lib.best_test_path(w)) for w in (workdir, reference))
  assert (ea.step, ea.epoch) == (eb.step, eb.epoch) and ea.embeddings.tobytes() == eb.embeddings.tobytes()
  # Nothing half-written stays behind, and the lock is released.
  leftovers = [p for p in workdir.rglob("*") if "tmp" in p.name or p.name == LOCK_NAME]
  assert not leftovers, leftovers


def assert_consistent(workdir: pathlib.Path) -> None:
  """After a kill: the manifest names only complete steps, which restore with verified checksums, and no log row
  names a step after the newest commit."""
  m = manifest(workdir)
  checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True, keep_last=2)
  try:
    for step in checkpoints.committed_steps():
      meta = checkpoints.read_meta(step)
      restored = checkpoints._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
      assert ckpt_lib.checksums(restored.state) == meta["checksums"]["state"], step
  finally:
    checkpoints.close()
  newest = m["last"][0]
  assert all(r["step"] <= newest for r in records(workdir, "eval")), (newest, evaluations(workdir))
  if m["best"] is not None:
    assert m["best"]["step"] <= newest


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  loop.fit(run_config(), workdir)
  assert [s for s, _, _ in train_losses(workdir)] == [1, 2, 3, 4, 5, 6]
  assert manifest(workdir)["last"] == [6, 4] and manifest(workdir)["best"]["step"] == 6
  assert [r["step"] for r in records(workdir, "eval")] == [3, 6]
  return workdir


# ------------------------------------------------------------------------------------------------- kill -9


@pytest.mark.parametrize("fault, resumes_from", [
    ("kill_in_step:5", 4),          # during a step, after a mid-epoch commit: resumes mid-epoch
    ("kill_in_orbax:3", 2),         # while orbax writes the step folder: its temporary folder is removed
    ("kill_in_manifest:6", 4),      # step 6 on disk, its manifest (last and best together) not yet renamed
    ("kill_after_commit:6", 6),     # committed; its evaluation rows and best embeddings not yet written
    ("kill_in_eval:2", 4),          # during the evaluation after epoch 1
])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, capsys, uninterrupted, fault, resumes_from):
  workdir = tmp_path / "run"
  run_killed(workdir, fault)
  assert_consistent(workdir)
  assert manifest(workdir)["last"][0] == resumes_from
  pid = json.loads((workdir / LOCK_NAME).read_text())["pid"]  # the killed run's lock, stale now

  out = resume(workdir, capsys)
  assert f"taking over the lock of process {pid}" in out
  assert f"resumed from {workdir.absolute()}/checkpoints/steps/{resumes_from}:" in out
  assert_same_run(workdir, uninterrupted)
  # The log rows the killed run wrote after its last commit were computed again: they were moved aside,
  # not duplicated.
  superseded = workdir / "metrics.superseded.jsonl"
  moved = [json.loads(line) for line in superseded.read_text().splitlines()] if superseded.exists() else []
  assert all(r["step"] > resumes_from for r in moved)
  resumed = [r for r in records(workdir, "event") if r.get("event") == "resumed"]
  assert [r["step"] for r in resumed] == [resumes_from]


def test_disk_full_during_a_save_is_said_first_and_the_rerun_is_identical(tmp_path, capsys, uninterrupted):
  workdir = tmp_path / "run"
  proc = start_child(workdir, "disk_full_in_orbax:3")  # the write of step 3 fails with ENOSPC
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-3000:]
  lines = [line for line in err.strip().splitlines() if not line.startswith("fault: ")]
  where = f"{workdir.absolute()}/checkpoints/steps/3.orbax-checkpoint-tmp/"
  assert lines[0].startswith(f"error: disk full while writing {where}"), err[-3000:]  # first, before any noise
  assert lines[-1].startswith("error: disk full while writing"), err[-3000:]  # and last, if anything followed
  assert manifest(workdir)["last"] == [2] and not (workdir / LOCK_NAME).exists()

  out = resume(workdir, capsys)
  assert f"resumed from {workdir.absolute()}/checkpoints/steps/2:" in out
  assert_same_run(workdir, uninterrupted)  # the half-written step folder is gone too


# ------------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("signum, step, stopped, resumed", [
    # In the middle of epoch 1: the step finishes, a mid-epoch checkpoint with the data position.
    (signal.SIGTERM, 5, "after step 5 (epoch 1, batch 2 of 3)", "epoch 1, step 5, batch 2 of the epoch"),
    # In the last step of epoch 1: the epoch-end checkpoint, its evaluation left to the resumed run (which
    # then commits step 6 as the best).
    (signal.SIGINT, 6, "after epoch 1 (step 6), before its evaluation (the resumed run does it first)",
     "epoch 2, step 6"),
])
def test_signal_finishes_the_step_saves_and_the_rerun_is_identical(tmp_path, capsys, uninterrupted, signum, step,
                                                                   stopped, resumed):
  workdir, go = tmp_path / "run", tmp_path / "go"
  proc = start_child(workdir, f"pause:{step}", go)  # waits before the step for the signal
  wait_for_line(proc, f"fault: paused before step {step}")
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=300)
  name = signal.Signals(signum).name
  assert proc.returncode == 128 + signum, err[-3000:]
  lines = err.strip().splitlines()
  assert lines[0].startswith(f"received {name}: finishing the current step, then saving"), err[-3000:]
  saved = workdir.absolute() / "checkpoints" / "steps" / str(step)
  assert lines[-1] == f"stopped by {name} {stopped}; checkpoint saved in {saved}; rerun the same command to resume"
  assert len(lines) == 2, err  # no traceback, no messages of the loader's threads
  assert manifest(workdir)["last"] == [step, 4] and manifest(workdir)["best"]["step"] == 3
  assert not (workdir / LOCK_NAME).exists()

  out = resume(workdir, capsys)
  assert f"resumed from {saved}: {resumed}" in out
  assert_same_run(workdir, uninterrupted)


def test_second_signal_exits_at_once_without_saving(tmp_path, capsys, uninterrupted):
  workdir, go = tmp_path / "run", tmp_path / "go"
  proc = start_child(workdir, "pause:5,slow_signal_save", go)
  wait_for_line(proc, "fault: paused before step 5")
  proc.send_signal(signal.SIGTERM)
  wait_for_line(proc, "fault: saving after signal")  # the save after the first signal has begun (and sleeps)
  start = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=60)
  assert time.monotonic() - start < 10
  assert proc.returncode == -signal.SIGTERM  # the default action: the shell reports 143
  assert manifest(workdir)["last"] == [4, 3]  # nothing committed after the first signal
  assert_consistent(workdir)

  out = resume(workdir, capsys)
  assert "resumed from" in out and "steps/4:" in out
  assert_same_run(workdir, uninterrupted)


# ---------------------------------------------------------------------------------------------- corruption


def flip_a_bit(step_dir: pathlib.Path) -> pathlib.Path:
  """Flips one bit in the middle of the largest array file of a step's state."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x10
  target.write_bytes(bytes(data))
  return target


def test_corrupted_newest_step_falls_back_to_the_older_intact_one(tmp_path, capsys, uninterrupted):
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted, workdir)
  flip_a_bit(workdir / "checkpoints" / "steps" / "6")
  step_6, step_4 = (workdir.absolute() / "checkpoints" / "steps" / str(s) for s in (6, 4))

  # What a NaN message would name: the newest step that verifies.
  checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True, keep_last=2)
  assert checkpoints.newest_intact_step() == 4
  checkpoints.close()

  # --eval_only names the damaged step and the one it evaluates instead, and changes nothing.
  capsys.readouterr()
  loop.evaluate_only(run_config(), workdir)
  out = capsys.readouterr().out
  assert f"checkpoint step 6 ({step_6}) is damaged or unreadable" in out
  assert (f"evaluating the checkpoint of step 4 (epoch 1, batch 1 of 3) instead of the best one: step(s) 6 damaged, "
          f"see above: {step_4}") in out
  assert manifest(workdir) == manifest(uninterrupted)

  # Training falls back to step 4, sets step 6 aside and computes it again.
  out = resume(workdir, capsys)
  assert f"checkpoint step 6 ({step_6}) is damaged or unreadable" in out
  assert "restored step 4 instead (1 newer step(s) damaged)" in out
  assert f"moved the damaged step 6 to {workdir.absolute()}/checkpoints/damaged/6" in out
  assert (workdir / "checkpoints" / "damaged" / "6" / "state").is_dir()
  eval_only = [r for r in records(workdir, "eval") if "checkpoint" in r]
  assert [(r["step"], r["damaged"]) for r in eval_only] == [(4, [str(step_6)])]  # the --eval_only row stays
  assert_same_run(workdir, uninterrupted)


# ----------------------------------------------------------------------------------------- two runs, one dir


def test_second_run_on_a_busy_workdir_stops_at_once_and_changes_nothing(tmp_path, capsys, uninterrupted):
  workdir, go = tmp_path / "run", tmp_path / "go"
  first = start_child(workdir, "pause:2", go)  # holds the lock, paused before its second step
  try:
    wait_for_line(first, "fault: paused before step 2")
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    log = (workdir / "metrics.jsonl").read_bytes()

    capsys.readouterr()
    assert cli.run(lambda: loop.fit(run_config(), workdir)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: workdir {workdir.absolute()} is in use by process "
                                                   f"{first.pid} on host {socket.gethostname()} (started ")
    assert err.rstrip().endswith("-- wait for that run to end, stop it, or pass another --workdir")
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before  # nothing written, nothing removed
    assert (workdir / "metrics.jsonl").read_bytes() == log
    with pytest.raises(WorkdirLockedError):
      loop.evaluate_only(run_config(), workdir)  # --eval_only waits its turn as well
  finally:
    go.touch()
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert_same_run(workdir, uninterrupted)
