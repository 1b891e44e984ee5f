"""The engine's config keys (every key declared, so a typo on the command line is an error with close
matches) and the checks run before anything is built. Method keys (`config.method.*`) belong to the
method: `dml_jax.methods.method_config(name)` gives them.

A config file is one `get_config()` that starts from `default_config()`, puts the method's defaults under
`config.method` and sets every value of its recipe visibly (see configs/*.py).

Keys:
  seed                      model init, sampling, augmentation (the loader derives its streams from it)
  num_epochs                epochs to train
  compute_dtype             'float32' | 'bfloat16' (forward/backward; parameters and optimizer stay float32)
  method.*                  the method's own keys; `method.name` is its registry name (dml_jax.methods)
  dataset.*                 name, data_root ('' = the dataset's default; digits: ~/.cache/dml_jax), source,
                            image_size, resize_size (eval: Resize -> CenterCrop image_size),
                            val_fraction (> 0: hold out that fraction of the TRAINING classes as a
                            validation split for model selection), skip_corrupt
  data.*                    batch_size (global), sampler ('random' | 'm_per_class' | 'm_per_class_replace';
                            a method may supply its own per epoch), samples_per_class, steps_per_epoch
                            (0 = len(train) // batch), eval_batch_size, num_threads, num_workers,
                            augment ('base' | 'autoaugment': AutoAugment's ImageNet policy first), scale,
                            ratio, flip, interpolation (RandomResizedCrop + flip)
  model.*                   backbone (registry name, optionally 'name.tag' for the preprocessing of that
                            tag), weights (converted weights directory, '' = random init),
                            backbone_overrides (architecture kwargs), embedding_dim
  optim.*                   optimizer settings and parameter groups, see dml_jax/train/optim.py
  eval.*                    every_epochs (0 = never), start_epoch (no evaluation, hence no selection, before
                            it except at the last epoch), before_training, protocol ('' = dataset.name),
                            metrics, options (protocols.evaluate keywords), select_on ('test' as the seeds,
                            or 'val'), select_metric ('recall@1', 'map@r', ...)
  checkpoint.*              keep_last, keep_best, every_steps (0 = at epoch ends only)
  log.*                     every_steps, tensorboard, progress (tqdm bars)
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

COMPUTE_DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_epochs = 60
  c.compute_dtype = "float32"
  c.method = ml_collections.ConfigDict(dict(name="metric_loss"))
  c.dataset = ml_collections.ConfigDict(dict(
      name="cub200", data_root="", source="auto", image_size=224, resize_size=256, val_fraction=0.0,
      skip_corrupt=False))
  c.data = ml_collections.ConfigDict(dict(
      batch_size=120, sampler="random", samples_per_class=2, steps_per_epoch=0, eval_batch_size=128,
      num_threads=8, num_workers=0, augment="base", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True,
      interpolation="bilinear"))
  c.model = ml_collections.ConfigDict(dict(
      backbone="resnet50", weights="", backbone_overrides=ml_collections.ConfigDict(), embedding_dim=512))
  c.optim = ml_collections.ConfigDict(dict(
      optimizer="adamw", lr=1e-4, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, nesterov=False,
      clip_value=0.0,
      schedule=ml_collections.ConfigDict(dict(name="constant", step_size=10, gamma=0.5, milestones=(), t_max=1,
                                              eta_min=0.0, offset=0)),
      groups=()))
  c.eval = ml_collections.ConfigDict(dict(
      every_epochs=1, start_epoch=0, before_training=False, protocol="", metrics=("recall", "r_precision", "map@r"),
      options=ml_collections.ConfigDict(), select_on="test", select_metric="recall@1"))
  c.checkpoint = ml_collections.ConfigDict(dict(keep_last=1, keep_best=True, every_steps=0))
  c.log = ml_collections.ConfigDict(dict(every_steps=20, tensorboard=True, progress=True))
  return c


def _as_dict(value: Any) -> Any:
  return value.to_dict() if hasattr(value, "to_dict") else value


def check_method_keys(config: Any) -> None:
  """config.method holds exactly the keys its method declares (`method_config(name)`).

  Top-level keys only: sections such as a loss's keyword arguments are free-form, and a command-line typo
  inside them is already caught by the locked config with close matches.
  """
  from dml_jax import methods  # local: config files import this module and must stay light

  name = config.method.name
  declared = _as_dict(methods.method_config(name))
  given = _as_dict(config.method)
  unknown = sorted(set(given) - set(declared))
  missing = sorted(set(declared) - set(given))
  if unknown:
    hints = {k: difflib.get_close_matches(k, list(declared), n=2) for k in unknown}
    raise ValueError(f"config.method: unknown keys {unknown} for method {name!r} (close matches: {hints}); its "
                     f"keys: {sorted(declared)}")
  if missing:
    raise ValueError(f"config.method: method {name!r} needs the keys {missing}; start the config's method "
                     f"section from dml_jax.methods.method_config({name!r})")


def check_config(config: Any, *, num_devices: int = 1) -> None:
  """Stops, before anything is built, on values the engine cannot run."""
  check_method_keys(config)
  for key in ("batch_size", "eval_batch_size"):
    value = config.data[key]
    if value < 1 or value % num_devices:
      raise ValueError(f"config.data.{key}={value} must be a positive multiple of the {num_devices} devices")
  if config.eval.select_on not in ("test", "val"):
    raise ValueError(f"config.eval.select_on must be 'test' or 'val', got {config.eval.select_on!r}")
  if config.eval.select_on == "val" and not config.dataset.val_fraction > 0:
    raise ValueError("config.eval.select_on='val' needs config.dataset.val_fraction > 0 (the held-out share of "
                     "the training classes)")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.compute_dtype must be one of {COMPUTE_DTYPES}, got {config.compute_dtype!r}")
  if config.num_epochs < 1:
    raise ValueError(f"config.num_epochs must be >= 1, got {config.num_epochs}")
