"""Trains (or resumes, or evaluates) a config: the command line of dml_jax.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/proxy_anchor_cub_resnet50.py --workdir runs/pa_cub \
      --config.dataset.data_root=/data --config.model.weights=weights/resnet50
  python train.py --config configs/demo.py --workdir runs/demo --eval_only     # best checkpoint

Any config key can be overridden with --config.KEY=VALUE; an unknown key stops with close matches, and
--print_config prints every key of the resolved config. When the workdir already holds a checkpoint,
training resumes from it. The workdir receives checkpoints/{last,best}, metrics.jsonl and tensorboard/
event files.

A mistake (a typo, a missing path, a bad value) ends with one `error:` line naming it and the fix, exit
status 2; --debug adds the traceback. docs/reliability.md lists what a run guarantees.
"""

from __future__ import annotations

import os

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
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() first "
                                 "(coordinator from the cluster environment); each process loads its share of "
                                 "every global batch.")
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
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  from dml_jax.train import loop  # after flag parsing: grain workers read the parsed flags

  config = _CONFIG.value
  if _EVAL_ONLY.value:
    loop.evaluate_only(config, _WORKDIR.value, which=_CHECKPOINT.value)
  else:
    loop.fit(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_flags_parser("config", usage=_USAGE))
