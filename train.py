"""Trains (or resumes, or evaluates) a config: the command line of dml_jax.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/proxy_anchor_cub_resnet50.py --workdir runs/pa_cub \
      --config.dataset.data_root=/data --config.model.weights=weights/resnet50
  python train.py --config configs/demo.py --workdir runs/demo --eval_only     # best checkpoint

Any config key can be overridden with --config.KEY=VALUE; an unknown key stops with close matches, and
--print_config prints every key of the resolved config. When the workdir already holds a checkpoint,
training resumes from it. The workdir receives checkpoints/{last,best}, metrics.jsonl and tensorboard/
event files. Several hosts run the same command (README, "Several hosts"), with --coordinator_address,
--num_processes and --process_id, or under SLURM's srun without them.

A mistake (a typo, a missing path, a bad value) ends with one `error:` line naming it and the fix, exit
status 2; --debug adds the traceback. docs/reliability.md lists what a run guarantees.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dml_jax import cli  # noqa: E402
from dml_jax.errors import UserError  # noqa: E402

_USAGE = "python train.py --config configs/demo.py --workdir runs/demo"

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/.")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate a checkpoint of --workdir instead of training.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint --eval_only evaluates.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (with "
                                   "--num_processes and --process_id; under SLURM's srun all three are found in "
                                   "its environment).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes (one per host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes - 1.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (every key, after the "
                                  "--config.KEY overrides) and exit; needs only --config.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of user errors too.")


def main(argv):
  return cli.run(lambda: _main(argv), debug=_DEBUG.value)


def _main(argv):
  # Argument checks first: nothing is imported, created or read before the command line is valid.
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}", f"flags take the form --name=value; {_USAGE}")
  if _CONFIG.value is None:
    raise UserError("--config is required", _USAGE)
  if _PRINT_CONFIG.value:
    print(_CONFIG.value)
    return 0
  if not _WORKDIR.value:
    raise UserError("--workdir is required", _USAGE)
  if not flags.FLAGS["verbosity"].present:
    # orbax and jax log every save and backend probe at INFO; the trainer prints its own progress.
    logging.set_verbosity(logging.WARNING)
  cli.quiet_background_errors(debug=_DEBUG.value)
  from dml_jax.train import distributed  # before anything touches a device
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from dml_jax.train import loop  # after flag parsing: grain workers read the parsed flags

  config = _CONFIG.value
  if _EVAL_ONLY.value:
    loop.evaluate_only(config, _WORKDIR.value, which=_CHECKPOINT.value)
  else:
    loop.fit(config, _WORKDIR.value)


def _announce(argv: list[str]) -> None:
  """The first line, before anything heavy: loading a config file imports jax and the method, and the dataset
  and the first compiled step take tens of seconds more on a CPU before the trainer prints anything."""
  if any(a in ("--help", "-h", "--helpfull", "--print_config") or a.startswith("--print_config=") for a in argv):
    return
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
  if workdir is None and "--workdir" in argv[:-1]:
    workdir = argv[argv.index("--workdir") + 1]
  if workdir:
    print(f"{'evaluating' if '--eval_only' in argv else 'training'} in {workdir}: loading the config, importing jax "
          "and dml_jax, then the dataset and compiling the model...", flush=True)


if __name__ == "__main__":
  _announce(sys.argv[1:])
  app.run(main, flags_parser=cli.absl_flags_parser("config", usage=_USAGE))
