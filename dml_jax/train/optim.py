"""Optimizers from parameter groups (big_vision style): regex rules on parameter paths.

Config (`config.optim`; every key of a group rule overrides the same top-level key for that group):

  optimizer       'adam' (torch Adam: coupled L2, wd*p added to the gradient before the moments),
                  'adamw' (torch AdamW: decoupled, p <- p - lr*wd*p), 'sgd' (torch SGD: coupled L2, then
                  momentum without dampening, optional Nesterov)
  lr, weight_decay, b1, b2, eps, momentum, nesterov
  clip_value      element-wise clamp of every gradient to [-v, v] before the optimizer (torch
                  `clip_grad_value_`, so before the coupled-L2 term); 0 / None = off
  schedule        per-epoch schedule, see schedules.py
  groups          ((pattern, {name, lr | lr_mult, optimizer, weight_decay, ..., frozen, start_epoch,
                  stop_epoch, lr_cycle}), ...): the first matching rule assigns a parameter to a group;
                  unmatched ones form group 'base'. A pattern is a regex (re.fullmatch on paths such as
                  'model/head/kernel', 'loss/proxies') or '@name', a path set the method names
                  (`Method.param_selectors`, e.g. '@batchnorm').

Groups are the one freezing mechanism. A parameter trains during epochs [start_epoch, stop_epoch) of its
group (defaults 0 and never); `frozen` keeps it frozen for the whole run; a warm-up that trains only some
parameters is a `start_epoch` on the others. A frozen parameter gets no update, no weight decay and no
optimizer state, and its gradient is never computed: the update step differentiates with respect to the
trainable parameters only. `lr_cycle` (m_0, ..., m_{P-1}) multiplies the group's rate by m_{epoch % P}
while the optimizer keeps running (a rate of 0 leaves the parameters unchanged but still updates Adam's
moments and step count, as torch does with lr = 0; D&C freezes its backbone on alternate epochs so).

Every group is a separate optax chain with its own state, like a separate torch optimizer. A parameter
that starts training late belongs to a group labelled '<name>_from_epoch<E>' whose state is created when
that epoch begins, so its Adam step count starts at 1 then, exactly as torch's per-parameter state does;
learning rates follow the global epoch (schedules.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dml_jax import pytree as tree_lib
from dml_jax.train.schedules import EpochSchedule

OPTIMIZERS = ("adam", "adamw", "sgd")
_SETTING_KEYS = ("optimizer", "lr", "weight_decay", "b1", "b2", "eps", "momentum", "nesterov", "clip_value",
                 "schedule")
_GROUP_KEYS = _SETTING_KEYS + ("name", "lr_mult", "frozen", "start_epoch", "stop_epoch", "lr_cycle")
_OPTIM_KEYS = _SETTING_KEYS + ("groups",)
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
  stop_epoch: float = math.inf
  lr_cycle: tuple[float, ...] = (1.0,)

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      close = difflib.get_close_matches(str(self.optimizer), OPTIMIZERS, n=1)
      raise ValueError(f"group {self.name!r}: unknown optimizer {self.optimizer!r}; expected one of "
                       f"{OPTIMIZERS}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if not _LABEL_RE.fullmatch(self.name):
      raise ValueError(f"group name {self.name!r} must match {_LABEL_RE.pattern} (it names checkpoint entries)")
    if not self.lr_cycle or any(m < 0 for m in self.lr_cycle):
      raise ValueError(f"group {self.name!r}: lr_cycle must be non-empty and non-negative, got {self.lr_cycle}")
    if self.start_epoch < 0 or self.stop_epoch <= self.start_epoch:
      raise ValueError(f"group {self.name!r}: needs 0 <= start_epoch < stop_epoch, got {self.start_epoch} and "
                       f"{self.stop_epoch}")

  def learning_rate(self, epoch: int) -> float:
    return self.schedule.learning_rate(epoch, self.lr) * self.lr_cycle[epoch % len(self.lr_cycle)]


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


class TorchAdamState(NamedTuple):
  """Adam's state: the step count (int32 []) and the two moments (trees like the parameters)."""

  count: jax.Array
  mu: Any
  nu: Any


def scale_by_torch_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam's direction as torch computes it: m <- m + (1 - b1)(g - m), v <- b2 v + (1 - b2) g^2, and

      update = m / bc1 / (sqrt(v) / sqrt(bc2) + eps),   bc_i = 1 - b_i ** t.

  torch forms bc_i from the step count in double precision. In float32, 1 - 0.999 ** t loses digits to
  cancellation (1.3e-5 relative at t = 1, which made the first steps 6e-6 smaller than torch's); here
  bc_i = -expm1(t * log(b_i)), with log(b_i) taken in double on the host, is accurate to float32 rounding.
  The learning rate multiplies later (scale_by_learning_rate_arg).
  """
  log_b1, log_b2 = math.log(b1), math.log(b2)

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    return TorchAdamState(count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros())

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    t = count.astype(jnp.float32)
    bc1 = -jnp.expm1(t * jnp.float32(log_b1))
    bc2_sqrt = jnp.sqrt(-jnp.expm1(t * jnp.float32(log_b2)))
    mu = jax.tree.map(lambda m, g: m + (1.0 - b1) * (g - m), state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, updates)
    out = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps), mu, nu)
    return out, TorchAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_group_transform(settings: GroupSettings) -> optax.GradientTransformationExtraArgs:
  """The optax chain reproducing the torch optimizer of one group (learning rate from `update`)."""
  parts = []
  if settings.clip_value:
    parts.append(optax.clip(settings.clip_value))
  wd = settings.weight_decay
  if settings.optimizer == "adam":
    if wd:
      parts.append(optax.add_decayed_weights(wd))  # coupled L2: part of the gradient the moments see
    parts.append(scale_by_torch_adam(b1=settings.b1, b2=settings.b2, eps=settings.eps))
  elif settings.optimizer == "adamw":
    parts.append(scale_by_torch_adam(b1=settings.b1, b2=settings.b2, eps=settings.eps))
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
class EpochGroups:
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

  def labels_of(self, names: Iterable[str] | None) -> tuple[str, ...]:
    """Labels of the groups named `names` (settings names; None = all) that train this epoch."""
    if names is None:
      return self.labels
    names = set(names)
    return tuple(label for label, settings, _ in self.groups if settings.name in names)

  def paths_of(self, labels: Iterable[str]) -> tuple[str, ...]:
    labels = set(labels)
    return tuple(p for label, _, paths in self.groups if label in labels for p in paths)


class ParamPlan:
  """Assigns every parameter path a group and the epochs [start, stop) during which it trains."""

  def __init__(self, optim_config: Any, paths: Sequence[str], *, selectors: Mapping[str, Iterable[str]] = ()):
    cfg = _as_dict(optim_config)
    _check_keys(cfg, _OPTIM_KEYS, "config.optim")
    self.paths = tuple(paths)
    base = {k: cfg[k] for k in _SETTING_KEYS if k in cfg}
    missing = [k for k in ("optimizer", "lr") if k not in base]
    if missing:
      raise ValueError(f"config.optim needs {missing}")
    rules = _rule_list(cfg.get("groups"))
    selectors = {name: set(members) for name, members in dict(selectors).items()}
    for pattern, _ in rules:
      if pattern.startswith("@") and pattern[1:] not in selectors:
        raise ValueError(f"optim.groups pattern {pattern!r}: the method offers the selectors "
                         f"{sorted('@' + n for n in selectors)}")

    def matches(pattern: str, path: str) -> bool:
      return path in selectors[pattern[1:]] if pattern.startswith("@") else bool(re.fullmatch(pattern, path))

    used = [False] * len(rules)
    self.settings: dict[str, GroupSettings] = {}
    self.group_of: dict[str, str] = {}
    self.window: dict[str, tuple[float, float]] = {}  # path -> [start, stop) epochs; (inf, inf) = frozen
    rule_of_name: dict[str, int] = {}
    for path in self.paths:
      spec, rule = {}, -1
      for i, (pattern, rule_spec) in enumerate(rules):
        if matches(pattern, path):
          spec, rule, used[i] = rule_spec, i, True
          break
      name = spec.get("name", BASE_GROUP)
      if name not in self.settings:
        self.settings[name] = self._resolve(name, base, spec)
        rule_of_name[name] = rule
      elif rule != rule_of_name[name] and self._resolve(name, base, spec) != self.settings[name]:
        raise ValueError(f"two group rules named {name!r} give different settings")
      settings = self.settings[name]
      self.group_of[path] = name
      self.window[path] = ((math.inf, math.inf) if settings.frozen else
                           (settings.start_epoch, settings.stop_epoch))

    unused = [rules[i][0] for i, u in enumerate(used) if not u]
    if unused:
      raise ValueError(f"optim.groups rules {unused} match no parameter (an earlier rule may take them); paths "
                       f"look like {list(self.paths[:4])} ... (regexes use re.fullmatch)")

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
        start_epoch=int(spec.get("start_epoch", 0)),
        stop_epoch=float(spec["stop_epoch"]) if spec.get("stop_epoch") is not None else math.inf,
        lr_cycle=tuple(float(m) for m in spec.get("lr_cycle", (1.0,))))

  def groups(self, epoch: int) -> EpochGroups:
    members: dict[str, tuple[str, list[str]]] = {}
    frozen = []
    for path in self.paths:
      start, stop = self.window[path]
      if not start <= epoch < stop:
        frozen.append(path)
        continue
      name = self.group_of[path]
      label = name if start == 0 else f"{name}_from_epoch{int(start)}"
      members.setdefault(label, (name, []))[1].append(path)
    groups = tuple((label, self.settings[name], tuple(sorted(paths)))
                   for label, (name, paths) in sorted(members.items()))
    return EpochGroups(groups=groups, frozen=tuple(sorted(frozen)))

  def change_epochs(self) -> list[int]:
    """Epochs at which the set of trainable parameters changes (the step is rebuilt there)."""
    edges = {int(e) for window in self.window.values() for e in window if 0 < e < math.inf}
    return sorted(edges)

  def describe(self, params_flat: Mapping[str, Any]) -> str:
    """A table of groups: tensors, parameters, optimizer, lr, weight decay, start epoch."""
    rows = [("group", "tensors", "params", "optimizer", "lr", "wd", "clip", "trains")]
    by_group: dict[tuple[str, tuple[float, float]], list[str]] = {}
    for path in self.paths:
      by_group.setdefault((self.group_of[path], self.window[path]), []).append(path)
    for (name, (start, stop)), paths in sorted(by_group.items(), key=lambda kv: (kv[0][1], kv[0][0])):
      s = self.settings[name]
      n = sum(int(math.prod(params_flat[p].shape)) for p in paths)
      trains = "never (frozen)" if start == math.inf else f"from epoch {int(start)}" + (
          f" to {int(stop) - 1}" if stop < math.inf else "")
      if len(s.lr_cycle) > 1:
        trains += f", lr x {s.lr_cycle} by epoch % {len(s.lr_cycle)}"
      rows.append((name, str(len(paths)), f"{n:,}", s.optimizer, f"{s.lr:g}", f"{s.weight_decay:g}",
                   f"{s.clip_value:g}" if s.clip_value else "-", trains))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def init_group_states(groups: EpochGroups, params: Any, previous: Mapping[str, Any] | None = None,
                      previous_groups: EpochGroups | None = None, *, fresh: Iterable[str] = ()) -> dict[str, Any]:
  """Optimizer state per group label: kept from `previous` where the label persists, fresh otherwise
  (and for the labels in `fresh`)."""
  keys = tree_lib.key_index(params)
  flat = tree_lib.flatten(params)
  before = {label: paths for label, _, paths in (previous_groups.groups if previous_groups else ())}
  fresh = set(fresh)
  states = {}
  for label, settings, paths in groups.groups:
    if previous is not None and label in before and label not in fresh:
      if before[label] != paths:
        raise ValueError(f"group {label!r} changed its members between phases; give the new members their "
                         f"own group (start_epoch) so their optimizer state starts fresh")
      states[label] = previous[label]
    else:
      states[label] = make_group_transform(settings).init(tree_lib.nest({p: flat[p] for p in paths}, keys))
  return states
