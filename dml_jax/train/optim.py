"""Optimizers from parameter groups (big_vision style): regex rules on parameter paths.

Config (`config.optim`; every key of a group rule overrides the same top-level key for that group):

  optimizer       'adam' (torch Adam: coupled L2, wd*p added to the gradient before the moments),
                  'adamw' (torch AdamW: decoupled, p <- p - lr*wd*p), 'sgd' (torch SGD: coupled L2, then
                  momentum without dampening, optional Nesterov)
  lr, weight_decay, b1, b2, eps, momentum, nesterov
  clip_value      element-wise clamp of every gradient to [-v, v] before the optimizer (torch
                  `clip_grad_value_`, so before the coupled-L2 term); 0 / None = off
  schedule        per-epoch schedule, see schedules.py
  warmup_epochs   W: during epochs [0, W) only parameters matching `warmup_trainable` train
  warmup_trainable  regex (re.fullmatch on paths such as 'model/head/kernel', 'loss/proxies')
  frozen          regex (or tuple of regexes) of parameters frozen for the whole run
  groups          ((regex, {name, lr | lr_mult, optimizer, weight_decay, ..., frozen, start_epoch}), ...):
                  the first matching rule assigns a parameter to a group; unmatched ones form group 'base'

A frozen parameter gets no update, no weight decay and no optimizer state, and its gradient is never
computed: the update step differentiates with respect to the trainable parameters only. Every group is a
separate optax chain with its own state, like a separate torch optimizer. A parameter that starts
training late (warm-up, `start_epoch`) belongs to a group labelled '<name>_from_epoch<E>' whose state is
created when that epoch begins, so its Adam step count starts at 1 then, exactly as torch's per-parameter
state does; learning rates follow the global epoch (schedules.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from dml_jax.train import tree as tree_lib
from dml_jax.train.schedules import EpochSchedule

OPTIMIZERS = ("adam", "adamw", "sgd")
_SETTING_KEYS = ("optimizer", "lr", "weight_decay", "b1", "b2", "eps", "momentum", "nesterov", "clip_value",
                 "schedule")
_GROUP_KEYS = _SETTING_KEYS + ("name", "lr_mult", "frozen", "start_epoch")
_OPTIM_KEYS = _SETTING_KEYS + ("warmup_epochs", "warmup_trainable", "frozen", "groups")
_LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
BASE_GROUP = "base"


def _as_dict(cfg: Any) -> dict[str, Any]:
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


def _check_keys(given: Iterable[str], known: Sequence[str], where: str) -> None:
  unknown = [k for k in given if k not in known]
  if unknown:
    hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
    raise ValueError(f"{where}: unknown keys {unknown} (close matches: {hints}); known keys: {sorted(known)}")


@dataclasses.dataclass(frozen=True)
class GroupSettings:
  """Resolved optimizer settings of one parameter group (a separate optax chain)."""

  name: str
  optimizer: str
  lr: float  # initial learning rate of the group (the schedule scales it per epoch)
  weight_decay: float
  b1: float
  b2: float
  eps: float
  momentum: float
  nesterov: bool
  clip_value: float | None
  schedule: EpochSchedule
  frozen: bool = False
  start_epoch: int = 0

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      close = difflib.get_close_matches(str(self.optimizer), OPTIMIZERS, n=1)
      raise ValueError(f"group {self.name!r}: unknown optimizer {self.optimizer!r}; expected one of "
                       f"{OPTIMIZERS}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if not _LABEL_RE.fullmatch(self.name):
      raise ValueError(f"group name {self.name!r} must match {_LABEL_RE.pattern} (it names checkpoint entries)")

  def learning_rate(self, epoch: int) -> float:
    return self.schedule.learning_rate(epoch, self.lr)


def scale_by_learning_rate_arg() -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by -learning_rate, read from the `learning_rate` extra argument of `update`.

  The trainer passes each group's rate for the current epoch (a float32 scalar computed on the host),
  so the rate follows the global epoch and not this group's own step count.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, learning_rate, **extra_args):
    del params, extra_args
    lr = jnp.asarray(learning_rate, jnp.float32)
    return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_group_transform(settings: GroupSettings) -> optax.GradientTransformationExtraArgs:
  """The optax chain reproducing the torch optimizer of one group (learning rate from `update`)."""
  parts = []
  if settings.clip_value:
    parts.append(optax.clip(settings.clip_value))
  wd = settings.weight_decay
  if settings.optimizer == "adam":
    if wd:
      parts.append(optax.add_decayed_weights(wd))  # coupled L2: part of the gradient the moments see
    parts.append(optax.scale_by_adam(b1=settings.b1, b2=settings.b2, eps=settings.eps))
  elif settings.optimizer == "adamw":
    parts.append(optax.scale_by_adam(b1=settings.b1, b2=settings.b2, eps=settings.eps))
    if wd:
      parts.append(optax.add_decayed_weights(wd))  # decoupled: lr * wd * p, outside the moments
  else:  # sgd
    if wd:
      parts.append(optax.add_decayed_weights(wd))
    if settings.momentum:
      # optax.trace starts from zeros, so its first step equals torch's buffer initialised to the gradient.
      parts.append(optax.trace(decay=settings.momentum, nesterov=settings.nesterov))
  parts.append(scale_by_learning_rate_arg())
  return optax.chain(*parts)


def _rule_list(groups: Any) -> list[tuple[str, dict[str, Any]]]:
  rules = []
  for i, rule in enumerate(groups or ()):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"optim.groups[{i}] must be a (regex, settings) pair, got {rule!r}")
    regex, spec = rule
    spec = _as_dict(spec)
    _check_keys(spec, _GROUP_KEYS, f"optim.groups[{i}] ({regex!r})")
    if "lr" in spec and "lr_mult" in spec:
      raise ValueError(f"optim.groups[{i}] ({regex!r}) sets both lr and lr_mult; give one")
    spec.setdefault("name", f"group{i}")
    rules.append((regex, spec))
  return rules


def _regexes(value: Any) -> list[str]:
  if not value:
    return []
  if isinstance(value, str):
    return [value]
  return [str(v) for v in value]


@dataclasses.dataclass(frozen=True)
class Phase:
  """What trains during an epoch: (label, settings, sorted paths) per group; everything else is frozen."""

  groups: tuple[tuple[str, GroupSettings, tuple[str, ...]], ...]
  frozen: tuple[str, ...]

  @property
  def labels(self) -> tuple[str, ...]:
    return tuple(label for label, _, _ in self.groups)

  @property
  def trainable(self) -> tuple[str, ...]:
    return tuple(p for _, _, paths in self.groups for p in paths)

  def learning_rates(self, epoch: int) -> dict[str, float]:
    return {label: settings.learning_rate(epoch) for label, settings, _ in self.groups}

  def transforms(self) -> dict[str, optax.GradientTransformationExtraArgs]:
    return {label: make_group_transform(settings) for label, settings, _ in self.groups}


class ParamPlan:
  """Assigns every parameter path a group, a frozen flag and the epoch it starts training."""

  def __init__(self, optim_config: Any, paths: Sequence[str], *, method_frozen: Iterable[str] = ()):
    cfg = _as_dict(optim_config)
    _check_keys(cfg, _OPTIM_KEYS, "config.optim")
    self.paths = tuple(paths)
    base = {k: cfg[k] for k in _SETTING_KEYS if k in cfg}
    missing = [k for k in ("optimizer", "lr") if k not in base]
    if missing:
      raise ValueError(f"config.optim needs {missing}")
    rules = _rule_list(cfg.get("groups"))
    frozen_res = _regexes(cfg.get("frozen"))
    method_frozen = set(method_frozen)
    unknown_frozen = sorted(method_frozen - set(self.paths))
    if unknown_frozen:
      raise ValueError(f"method marks unknown parameters as frozen: {unknown_frozen[:5]}")
    warmup = int(cfg.get("warmup_epochs") or 0)
    warm_re = cfg.get("warmup_trainable") or ""
    if warmup < 0:
      raise ValueError(f"optim.warmup_epochs must be >= 0, got {warmup}")

    used = [False] * len(rules)
    self.settings: dict[str, GroupSettings] = {}
    self.group_of: dict[str, str] = {}
    self.start_epoch: dict[str, float] = {}  # math.inf = frozen for the whole run
    for path in self.paths:
      spec = {}
      for i, (regex, rule_spec) in enumerate(rules):
        if re.fullmatch(regex, path):
          spec, used[i] = rule_spec, True
          break
      name = spec.get("name", BASE_GROUP)
      if name not in self.settings:
        self.settings[name] = self._resolve(name, base, spec)
      elif spec and self._resolve(name, base, spec) != self.settings[name]:
        raise ValueError(f"two group rules named {name!r} give different settings")
      settings = self.settings[name]
      self.group_of[path] = name
      frozen = (settings.frozen or path in method_frozen or any(re.fullmatch(r, path) for r in frozen_res))
      start = settings.start_epoch
      if warmup and not re.fullmatch(warm_re, path):
        start = max(start, warmup)
      self.start_epoch[path] = math.inf if frozen else start

    unused = [rules[i][0] for i, u in enumerate(used) if not u]
    if unused:
      raise ValueError(f"optim.groups rules {unused} match no parameter; paths look like "
                       f"{list(self.paths[:4])} ... (regexes use re.fullmatch)")
    for r in frozen_res:
      if not any(re.fullmatch(r, p) for p in self.paths):
        raise ValueError(f"optim.frozen regex {r!r} matches no parameter; paths look like {list(self.paths[:4])}")
    if warmup and not any(re.fullmatch(warm_re, p) for p in self.paths):
      raise ValueError(f"optim.warmup_trainable {warm_re!r} matches no parameter, so nothing would train "
                       f"during warm-up; paths look like {list(self.paths[:4])}")

  @staticmethod
  def _resolve(name: str, base: Mapping[str, Any], spec: Mapping[str, Any]) -> GroupSettings:
    merged = {**base, **{k: v for k, v in spec.items() if k in _SETTING_KEYS}}
    lr = float(merged["lr"]) * float(spec.get("lr_mult", 1.0))
    schedule = EpochSchedule.from_config(_as_dict(merged.get("schedule") or {}))
    clip = merged.get("clip_value")
    return GroupSettings(
        name=name, optimizer=str(merged["optimizer"]), lr=lr,
        weight_decay=float(merged.get("weight_decay", 0.0) or 0.0), b1=float(merged.get("b1", 0.9)),
        b2=float(merged.get("b2", 0.999)), eps=float(merged.get("eps", 1e-8)),
        momentum=float(merged.get("momentum", 0.0) or 0.0), nesterov=bool(merged.get("nesterov", False)),
        clip_value=float(clip) if clip else None, schedule=schedule, frozen=bool(spec.get("frozen", False)),
        start_epoch=int(spec.get("start_epoch", 0)))

  def phase(self, epoch: int) -> Phase:
    members: dict[str, tuple[str, list[str]]] = {}
    frozen = []
    for path in self.paths:
      start = self.start_epoch[path]
      if epoch < start:
        frozen.append(path)
        continue
      name = self.group_of[path]
      label = name if start == 0 else f"{name}_from_epoch{int(start)}"
      members.setdefault(label, (name, []))[1].append(path)
    groups = tuple((label, self.settings[name], tuple(sorted(paths)))
                   for label, (name, paths) in sorted(members.items()))
    return Phase(groups=groups, frozen=tuple(sorted(frozen)))

  def change_epochs(self) -> list[int]:
    """Epochs at which the set of trainable parameters changes (the step is rebuilt there)."""
    return sorted({int(s) for s in self.start_epoch.values() if 0 < s < math.inf})

  def describe(self, params_flat: Mapping[str, Any], epoch: int = 0) -> str:
    """A table of groups: tensors, parameters, optimizer, lr, weight decay, start epoch."""
    rows = [("group", "tensors", "params", "optimizer", "lr", "wd", "clip", "trains")]
    by_group: dict[tuple[str, float], list[str]] = {}
    for path in self.paths:
      by_group.setdefault((self.group_of[path], self.start_epoch[path]), []).append(path)
    for (name, start), paths in sorted(by_group.items(), key=lambda kv: (kv[0][1], kv[0][0])):
      s = self.settings[name]
      n = sum(int(math.prod(params_flat[p].shape)) for p in paths)
      trains = "never (frozen)" if start == math.inf else f"from epoch {int(start)}"
      rows.append((name, str(len(paths)), f"{n:,}", s.optimizer, f"{s.lr:g}", f"{s.weight_decay:g}",
                   f"{s.clip_value:g}" if s.clip_value else "-", trains))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def init_group_states(phase: Phase, params: Any, previous: Mapping[str, Any] | None = None,
                      previous_phase: Phase | None = None) -> dict[str, Any]:
  """Optimizer state per group label: kept from `previous` where the label persists, fresh otherwise."""
  keys = tree_lib.key_index(params)
  flat = tree_lib.flatten(params)
  before = {label: paths for label, _, paths in (previous_phase.groups if previous_phase else ())}
  states = {}
  for label, settings, paths in phase.groups:
    if previous is not None and label in before:
      if before[label] != paths:
        raise ValueError(f"group {label!r} changed its members between phases; give the new members their "
                         f"own group (start_epoch) so their optimizer state starts fresh")
      states[label] = previous[label]
    else:
      states[label] = make_group_transform(settings).init(tree_lib.nest({p: flat[p] for p in paths}, keys))
  return states
