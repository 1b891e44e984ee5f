"""The engine's config keys (every key declared, so a typo on the command line is an error with close
matches) and the checks run before anything is built. Method keys (`config.method.*`) belong to the
method: `dml_jax.methods.method_config(name)` gives them.

A config file is one `get_config()` that starts from `default_config()`, puts the method's defaults under
`config.method` and sets every value of its recipe visibly (see configs/*.py).

Keys:
  seed                      model init, sampling, augmentation (the loader derives its streams from it)
  num_epochs                epochs to train
  compute_dtype             'float32' | 'bfloat16' | 'auto' (bfloat16 on GPU/TPU, float32 on CPU): the forward/
                            backward; parameters, optimizer state and the loss stay float32
  method.*                  the method's own keys; `method.name` is its registry name (dml_jax.methods)
  dataset.*                 name, data_root ('' = the dataset's default; digits: ~/.cache/dml_jax), source,
                            image_size, resize_size (eval: Resize -> CenterCrop image_size),
                            val_fraction (> 0: hold out that fraction of the TRAINING classes as a
                            validation split for model selection), skip_corrupt, folder (how your own
                            `folder` dataset splits its classes: train_fraction, seed, classes_file,
                            classes_file_split; recorded in <workdir>/split.json), vehicleid_test_size
                            ('small' | 'medium' | 'large': the VehicleID test list evaluated)
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
  log.*                     every_steps, tensorboard, progress (tqdm bars), plots (PNGs of the run in
                            <workdir>/plots at the end: curves, Recall@K, retrieval grid, embedding map)
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from dml_jax.errors import InvalidValueError

COMPUTE_DTYPES = ("float32", "bfloat16", "auto")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_epochs = 60
  c.compute_dtype = "float32"
  c.method = ml_collections.ConfigDict(dict(name="metric_loss"))
  c.dataset = ml_collections.ConfigDict(dict(
      name="cub200", data_root="", source="auto", image_size=224, resize_size=256, val_fraction=0.0,
      skip_corrupt=False, vehicleid_test_size="small",
      folder=ml_collections.ConfigDict(dict(train_fraction=0.5, seed=0, classes_file="", classes_file_split="test"))))
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
  c.log = ml_collections.ConfigDict(dict(every_steps=20, tensorboard=True, progress=True, plots=True))
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
    raise InvalidValueError(f"config.method: unknown keys {unknown} for method {name!r} (close matches: {hints})",
                            f"its keys: {sorted(declared)}")
  if missing:
    raise InvalidValueError(f"config.method: method {name!r} needs the keys {missing}",
                            f"start the config's method section from dml_jax.methods.method_config({name!r})")


def _check_types(given: Any, declared: Any, prefix: str) -> None:
  """Every engine key holds a value of its default's type (an int where a float is expected is fine)."""
  for key, default in declared.items():
    if key not in given or key in _FREE_FORM:
      continue
    value, where = given[key], prefix + key
    if isinstance(default, dict):
      if not isinstance(value, dict):
        raise InvalidValueError(f"config.{where} must be a section of keys, got {value!r}")
      _check_types(value, default, where + ".")
      continue
    if isinstance(default, bool):
      ok = isinstance(value, bool)
    elif isinstance(default, float):
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, int):
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (tuple, list)):
      ok = isinstance(value, (tuple, list))
    else:
      ok = isinstance(value, type(default))
    if not ok:
      raise InvalidValueError(f"config.{where} must be a {type(default).__name__}, got {value!r}",
                              f"e.g. --config.{where}={default!r}")


# Sections whose keys are free (keyword arguments passed through) or owned by the method.
_FREE_FORM = ("method", "backbone_overrides", "options", "groups", "schedule")


def _require(condition: bool, key: str, value: Any, rule: str, example: str) -> None:
  if not condition:
    raise InvalidValueError(f"config.{key} must be {rule}, got {value!r}", f"e.g. --config.{key}={example}")


def check_config(config: Any, *, num_devices: int = 1) -> None:
  """Stops, before anything is built or written, on values the engine cannot run: unknown method keys, wrong
  types, out-of-range values, unknown choices (each error names the key and an example of a valid value)."""
  check_method_keys(config)
  _check_types(_as_dict(config), _as_dict(default_config()), "")
  c = config
  for key in ("batch_size", "eval_batch_size"):
    value = c.data[key]
    _require(value >= 1 and value % num_devices == 0, f"data.{key}", value,
             f"a positive multiple of the {num_devices} devices", str(max(num_devices, 1) * 16))
  _require(c.num_epochs >= 1, "num_epochs", c.num_epochs, ">= 1", "60")
  _require(c.compute_dtype in COMPUTE_DTYPES, "compute_dtype", c.compute_dtype, f"one of {COMPUTE_DTYPES}",
           "bfloat16")
  _require(c.eval.select_on in ("test", "val"), "eval.select_on", c.eval.select_on, "'test' or 'val'", "val")
  if c.eval.select_on == "val" and not c.dataset.val_fraction > 0:
    raise InvalidValueError("config.eval.select_on='val' needs config.dataset.val_fraction > 0 (the held-out share "
                            "of the training classes)", "e.g. --config.dataset.val_fraction=0.2")
  _require(0 <= c.dataset.val_fraction < 1, "dataset.val_fraction", c.dataset.val_fraction, "in [0, 1)", "0.2")
  _require(c.dataset.vehicleid_test_size in ("small", "medium", "large"), "dataset.vehicleid_test_size",
           c.dataset.vehicleid_test_size, "'small', 'medium' or 'large' (VehicleID's test lists)", "large")
  _require(c.dataset.image_size >= 1, "dataset.image_size", c.dataset.image_size, ">= 1", "224")
  _require(c.dataset.resize_size >= c.dataset.image_size, "dataset.resize_size", c.dataset.resize_size,
           f">= dataset.image_size ({c.dataset.image_size}): evaluation resizes, then crops", "256")
  _require(c.data.samples_per_class >= 1, "data.samples_per_class", c.data.samples_per_class, ">= 1", "2")
  _require(c.data.steps_per_epoch >= 0, "data.steps_per_epoch", c.data.steps_per_epoch, ">= 0 (0: the data's)", "0")
  _require(c.data.num_threads >= 1, "data.num_threads", c.data.num_threads, ">= 1", "8")
  _require(c.data.num_workers >= 0, "data.num_workers", c.data.num_workers, ">= 0", "0")
  lo, hi = c.data.scale
  _require(0 < lo <= hi <= 1, "data.scale", tuple(c.data.scale), "0 < low <= high <= 1", "'(0.08, 1.0)'")
  lo, hi = c.data.ratio
  _require(0 < lo <= hi, "data.ratio", tuple(c.data.ratio), "0 < low <= high", "'(0.75, 1.3333)'")
  o = c.optim
  _require(o.lr > 0 and o.lr == o.lr, "optim.lr", o.lr, "> 0", "1e-4")
  _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0", "1e-4")
  _require(o.clip_value >= 0, "optim.clip_value", o.clip_value, ">= 0 (0: off)", "10.0")
  _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", (o.b1, o.b2), "in [0, 1)", "0.9")
  _require(o.eps > 0, "optim.eps", o.eps, "> 0", "1e-8")
  _require(o.momentum >= 0, "optim.momentum", o.momentum, ">= 0", "0.9")
  for i, rule in enumerate(o.groups or ()):
    spec = dict(rule[1]) if isinstance(rule, (tuple, list)) and len(rule) == 2 else {}
    for key in ("lr", "lr_mult", "weight_decay", "clip_value"):
      if key in spec:
        _require(spec[key] >= 0, f"optim.groups[{i}].{key}", spec[key], ">= 0", "1e-3")
  _require(c.eval.every_epochs >= 0, "eval.every_epochs", c.eval.every_epochs, ">= 0 (0: never)", "1")
  _require(c.eval.start_epoch >= 0, "eval.start_epoch", c.eval.start_epoch, ">= 0", "0")
  _require(c.checkpoint.keep_last >= 1, "checkpoint.keep_last", c.checkpoint.keep_last, ">= 1", "1")
  _require(c.checkpoint.every_steps >= 0, "checkpoint.every_steps", c.checkpoint.every_steps, ">= 0 (0: epoch "
           "ends only)", "0")
  _require(c.log.every_steps >= 1, "log.every_steps", c.log.every_steps, ">= 1", "20")
