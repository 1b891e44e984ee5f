"""Every mistake the trainer can find is found before the first step and before the workdir exists: one `error:`
line naming the culprit and the fix, exit status 2, no traceback, nothing created.

The cases run `loop.fit` / `loop.evaluate_only` under `cli.run` in this process, as train.py calls them (its own
argument handling, --help, --print_config and config-key typos are tests/test_errors.py); one case runs train.py
itself, for the real exit status of a mistake found after the dataset is read.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from dml_jax import cli
from dml_jax.data import ensure_digits_tree

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_config(**changes):
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.num_epochs, c.data.batch_size, c.data.steps_per_epoch, c.data.num_threads = 1, 16, 2, 2
  c.eval.before_training, c.log.progress, c.log.tensorboard, c.log.plots = False, False, False, False
  c.update_from_flattened_dict(changes)  # dotted keys, e.g. {"optim.lr": 0.1}
  return c


@pytest.fixture(scope="module")
def damaged_digits(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Copies of the digits tree with one unreadable image: in a test class ('eval') or a training class."""
  source = pathlib.Path(ensure_digits_tree())
  roots = {}
  for split, folder in (("eval", "007.digit_6"), ("train", "002.digit_1")):
    root = tmp_path_factory.mktemp(f"digits_bad_{split}")
    shutil.copytree(source, root / "digits")
    victim = sorted((root / "digits" / "images" / folder).iterdir())[0]
    victim.write_bytes(b"not a png")
    roots[split] = root
  return roots


def _fails(fn, capsys) -> str:
  capsys.readouterr()
  assert cli.run(fn) == 2
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, err
  assert "Traceback" not in err
  return lines[-1]


@pytest.mark.parametrize("changes, expected", [
    ({"eval.select_metric": "recal@1"}, "error: eval.select_metric 'recal@1' is not among the evaluated metrics "
                                        "(recall@1, recall@2, recall@4, recall@8, map@r); did you mean 'recall@1'?"),
    ({"eval.metrics": ("recal", "map@r")}, "error: eval.metrics: unknown metric 'recal'; did you mean 'recall'?"),
    ({"eval.protocol": "cub2000"}, "did you mean 'cub200'?"),
    ({"optim.lr": -1.0}, "error: config.optim.lr must be > 0, got -1.0 -- e.g. --config.optim.lr=1e-4"),
    ({"method.loss.hparams.alpha": -32.0}, "error: config.method.loss.hparams.alpha must be > 0, got -32.0"),
    ({"num_epochs": 0}, "error: config.num_epochs must be >= 1, got 0"),
    ({"num_epochs": -3}, "error: config.num_epochs must be >= 1, got -3"),
    ({"dataset.name": "cub200", "dataset.data_root": "/nonexistent"},
     "error: dataset 'cub200': data root /nonexistent does not exist or is not a folder -- set data_root to the "
     "folder that holds the dataset folder (train.py: --config.dataset.data_root=DIR)"),
    ({"model.weights": "/nonexistent/w"}, "error: weights directory /nonexistent/w does not exist -- convert the "
                                          "weights once: python convert_timm_weights.py --model vit_small_patch16_224"),
])
def test_mistakes_stop_before_the_workdir_exists(tmp_path, capsys, changes, expected):
  from dml_jax.train import loop

  workdir = tmp_path / "run"
  line = _fails(lambda: loop.fit(demo_config(**changes), workdir), capsys)
  assert expected in line
  assert not workdir.exists()


@pytest.mark.parametrize("split", ["eval", "train"])
def test_an_unreadable_image_in_any_split_stops_before_the_first_step(tmp_path, capsys, damaged_digits, split):
  from dml_jax.train import loop

  workdir = tmp_path / "run"
  line = _fails(lambda: loop.fit(demo_config(**{"dataset.data_root": str(damaged_digits[split])}), workdir), capsys)
  name = "test" if split == "eval" else "train"
  assert line.startswith(f"error: dataset 'digits' {name}: 1 of ") and "cannot be decoded, e.g. " in line
  assert "--config.dataset.skip_corrupt=True" in line
  assert not workdir.exists()


def test_eval_only_without_a_checkpoint_creates_nothing(tmp_path, capsys):
  from dml_jax.train import loop

  workdir = tmp_path / "run"
  line = _fails(lambda: loop.evaluate_only(demo_config(), workdir), capsys)
  assert line == (f"error: no checkpoint under {workdir.absolute()}/checkpoints -- train first (the same --workdir), "
                  "or pass the --workdir of a training run")
  assert not workdir.exists()


def test_train_py_exit_status_and_one_line_for_a_late_mistake(tmp_path, damaged_digits):
  workdir = tmp_path / "run"
  done = subprocess.run(
      [sys.executable, str(REPO / "train.py"), "--config", "configs/demo.py", "--workdir", str(workdir),
       f"--config.dataset.data_root={damaged_digits['eval']}", "--config.data.num_threads=2"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert done.returncode == 2, done.stderr[-3000:]
  lines = done.stderr.rstrip().splitlines()
  assert lines[-1].startswith("error: dataset 'digits' test: 1 of 896 image(s) cannot be decoded")
  assert len(lines) == 2 and lines[0].startswith("  ")  # the list of unreadable files, then the error
  assert not workdir.exists()
