"""One-line errors: UserError and the environment failures as one `error:` line with status 2, bugs with their
traceback; train.py's argument handling (--help, --print_config, config-key typos at any depth)."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys

import pytest

from dml_jax import cli
from dml_jax.data import CorruptImageError, DatasetLayoutError, MissingFilesError
from dml_jax.errors import UnknownNameError, UserError, close_matches, unknown_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raise(error):
  def fn():
    raise error
  return fn


def test_user_error_is_one_line_with_status_2(capsys):
  error = UserError("no checkpoint under runs/x", "train first with the same --workdir", ["  looked at: runs/x"])
  assert cli.run(_raise(error)) == 2
  err = capsys.readouterr().err
  assert err == "  looked at: runs/x\nerror: no checkpoint under runs/x -- train first with the same --workdir\n"


def test_debug_adds_the_traceback(capsys):
  assert cli.run(_raise(UserError("bad")), debug=True) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.strip().splitlines()[-1] == "error: bad"


def test_bugs_keep_their_traceback():
  with pytest.raises(ZeroDivisionError):
    cli.run(lambda: 1 / 0)


def test_return_value_is_the_status():
  assert cli.run(lambda: 3) == 3 and cli.run(lambda: {"a": 1}) == 0 and cli.run(lambda: None) == 0


def test_keyboard_interrupt_is_one_line(capsys):
  assert cli.run(_raise(KeyboardInterrupt())) == 130
  assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/7/params"),
     "error: disk full while writing /runs/x/checkpoints/7/params (No space left on device)"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/runs/x/m.jsonl"),
     "error: disk quota exceeded while writing /runs/x/m.jsonl"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/ro"), "error: permission denied: /runs/ro"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), "error: read-only file system: /mnt/ro/x"),
    # orbax / tensorstore wrap the OS error in their own exception and keep only its text.
    (ValueError('Error writing local file "/runs/x/checkpoints/3/d/0": No space left on device [OSError]'),
     "error: disk full while writing /runs/x/checkpoints/3/d/0"),
])
def test_environment_failures_say_so_first(capsys, monkeypatch, error, line):
  monkeypatch.setattr(cli, "_background_work", lambda: False)  # no repeat at the test process's exit
  assert cli.run(_raise(error)) == 2
  err = capsys.readouterr().err
  assert err.startswith(line), err
  assert err.count("\n") == 1


def test_environment_cause_found_through_the_chain(capsys, monkeypatch):
  monkeypatch.setattr(cli, "_background_work", lambda: False)

  def fn():
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/w/f")
    except OSError as e:
      raise RuntimeError("checkpoint save failed") from e

  assert cli.run(fn) == 2
  assert capsys.readouterr().err.startswith("error: disk full while writing /w/f")


def test_existing_error_classes_are_user_errors_and_keep_their_bases():
  layout = DatasetLayoutError("cub200", "no layout", looked_at=["/a"], hint="set data_root")
  assert isinstance(layout, (UserError, ValueError)) and "looked at:\n  /a" in str(layout)
  assert layout.headline == "dataset 'cub200': no layout -- set data_root"
  missing = MissingFilesError("sop", ["/x/1.jpg", "/x/2.jpg"], "Ebay_train.txt")
  assert isinstance(missing, (UserError, FileNotFoundError)) and "e.g. /x/1.jpg" in missing.headline
  corrupt = CorruptImageError("/x/1.jpg", "truncated")
  assert isinstance(corrupt, (UserError, OSError)) and "skip_corrupt" in corrupt.headline
  # grain workers send exceptions through pickle: the fields survive.
  again = pickle.loads(pickle.dumps(corrupt))
  assert type(again) is CorruptImageError and again.ref == "/x/1.jpg" and again.headline == corrupt.headline
  assert pickle.loads(pickle.dumps(layout)).details == layout.details


def test_close_matches_keep_only_the_nearly_best():
  assert close_matches("recal@1", ["recall@1", "recall@2", "recall@4", "map@r"]) == ["recall@1"]
  assert close_matches("zzz", ["recall@1", "map@r"]) == []
  error = unknown_name("dataset", "cub2000", ["cub200", "cars196"])
  assert isinstance(error, (UnknownNameError, KeyError)) and str(error) == "unknown dataset 'cub2000'; did you " \
                                                                            "mean 'cub200'?"
  assert "known: cars196, cub200" in str(unknown_name("dataset", "xyz", ["cub200", "cars196"]))


class _Config(dict):
  """A stand-in for ConfigDict: items() of nested mappings."""


def test_unknown_config_key_at_any_depth():
  config = _Config(optim=_Config(lr=0.1, weight_decay=0.0, schedule=_Config(name="cosine", warmup=1)),
                   data=_Config(batch_size=32), seed=0)
  assert "did you mean 'optim.lr'?" in str(cli.unknown_config_key_error("optim.lrr", config))
  assert "did you mean 'optim.schedule.warmup'?" in str(cli.unknown_config_key_error("optim.schedule.warmpu", config))
  assert "did you mean 'optim.lr'?" in str(cli.unknown_config_key_error("optimm.lr", config))
  assert "did you mean 'data.batch_size'?" in str(cli.unknown_config_key_error("optim.batch_size", config))
  far = str(cli.unknown_config_key_error("optim.zzzzzz", config))
  assert "keys under 'optim': lr, weight_decay, schedule" in far and "--print_config" in far
  assert "top-level keys: optim, data, seed" in str(cli.unknown_config_key_error("qqq.x", config))
  assert "'seed' is a value, not a group of keys" in str(cli.unknown_config_key_error("seed.x", config))


def _train(*args, cwd=REPO):
  return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=cwd, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})


def test_train_help_exits_0():
  done = _train("--help")
  assert done.returncode == 0 and "--workdir" in done.stdout and "--print_config" in done.stdout


def test_train_print_config_needs_only_the_config():
  done = _train("--config", "configs/demo.py", "--print_config", "--config.optim.lr=0.5")
  assert done.returncode == 0, done.stderr
  assert "lr: 0.5" in done.stdout and "select_metric:" in done.stdout


@pytest.mark.parametrize("args, line", [
    (["--config.optim.lrr=1"], "error: unknown config key 'optim.lrr' (--config.optim.lrr); did you mean 'optim.lr'?"),
    (["--config.eval.selct_metric=x"], "did you mean 'eval.select_metric'?"),
    (["--config.optimm.lr=1"], "did you mean 'optim.lr'?"),
    (["--config.optim.zzzzzz=1"], "keys under 'optim': "),
    (["--config.optim.lr=abc"], "error: flag --config.optim.lr=abc: could not convert string to float: 'abc'"),
    (["--workdr=x"], "error: unknown flag --workdr -- did you mean --workdir?"),
    (["stray"], "error: unexpected arguments ['stray']"),
])
def test_train_flag_mistakes_are_one_line(tmp_path, args, line):
  workdir = tmp_path / "run"
  done = _train("--config", "configs/demo.py", "--workdir", str(workdir), *args)
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and line in lines[0], done.stderr
  assert not workdir.exists()  # nothing created for a mistake


def test_train_missing_flags_and_config_file():
  done = _train("--workdir", "x")
  assert done.returncode == 2 and done.stderr.startswith("error: --config is required -- python train.py --config")
  done = _train("--config", "configs/demo.py")
  assert done.returncode == 2 and done.stderr.startswith("error: --workdir is required")
  done = _train("--config", "configs/dmeo.py", "--workdir", "x")
  assert done.returncode == 2
  assert done.stderr == "error: config file configs/dmeo.py not found -- did you mean configs/demo.py?\n"


def test_disk_full_is_said_first_and_again_last_when_background_work_runs():
  script = (
      "import errno, sys, threading, time\n"
      "from dml_jax import cli\n"
      "def noisy():\n"
      "  time.sleep(0.3)\n"
      "  print('worker: shutdown noise', file=sys.stderr, flush=True)\n"
      "threading.Thread(target=noisy).start()\n"
      "def fail():\n"
      "  raise OSError(errno.ENOSPC, 'No space left on device', '/w/ckpt')\n"
      "sys.exit(cli.run(fail))\n")
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PYTHONPATH": REPO})
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2
  assert lines[0].startswith("error: disk full while writing /w/ckpt") and "shutdown noise" in lines[1]
  assert lines[-1].startswith("error: disk full while writing /w/ckpt") and lines[-1].endswith("shutdown messages]")


def test_missing_weights_name_the_convert_command(tmp_path):
  from dml_jax.convert.weights_dir import read_weights_dir

  with pytest.raises(FileNotFoundError) as info:  # still a FileNotFoundError for code that catches one
    read_weights_dir(tmp_path / "w", model="vit_small_patch16_224")
  assert isinstance(info.value, UserError)
  assert info.value.headline == (
      f"weights directory {tmp_path / 'w'} does not exist -- convert the weights once: python "
      f"convert_timm_weights.py --model vit_small_patch16_224 --out {tmp_path / 'w'} (with --checkpoint FILE "
      "offline)")
