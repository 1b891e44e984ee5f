"""Trains (or resumes, or evaluates) a config: the command line of dml_jax.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/proxy_anchor_cub_resnet50.py --workdir runs/pa_cub \
      --config.dataset.data_root=/data --config.model.weights=weights/resnet50
  python train.py --config configs/demo.py --workdir runs/demo --eval_only     # best checkpoint

Any config key can be overridden with --config.KEY=VALUE; an unknown key stops with close matches.
When the workdir already holds a checkpoint, training resumes from it. The workdir receives
checkpoints/{last,best}, metrics.jsonl and tensorboard/ event files.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/.")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate a checkpoint of --workdir instead of training.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint --eval_only evaluates.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() first "
                                 "(coordinator from the cluster environment); each process loads its share of "
                                 "every global batch.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # orbax and jax log every save and backend probe at INFO; the trainer prints its own progress.
    logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  # The imports (jax, flax, grain), the dataset and the first compiled step take tens of seconds on a CPU
  # before the trainer prints anything: say so at once.
  print(f"{'evaluating' if _EVAL_ONLY.value else 'training'} in {_WORKDIR.value}: importing jax and dml_jax, then "
        "loading the dataset and compiling the model...", flush=True)
  from dml_jax.train import loop  # after flag parsing: grain workers read the parsed flags

  config = _CONFIG.value
  if _EVAL_ONLY.value:
    loop.evaluate_only(config, _WORKDIR.value, which=_CHECKPOINT.value)
  else:
    loop.fit(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
