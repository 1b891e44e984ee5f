"""Per-epoch learning-rate schedules, as the seeds' PyTorch schedulers (stepped once per epoch).

The learning rate is a function of the epoch index only (constant within an epoch), never of an
optimizer's step count: a group that starts training late (after warm-up) starts with a fresh Adam
count, as in PyTorch, but its learning rate follows the global epoch like torch's per-optimizer scheduler.
Rates are computed on the host in double precision (as torch does) and enter the jitted step as float32
arguments, so changing them never recompiles.

  constant   lr
  step       lr * gamma ** (e // step_size)                              (torch StepLR)
  multistep  lr * gamma ** #{m in milestones : m <= e}                   (torch MultiStepLR)
  cosine     eta_min + (lr - eta_min) * (1 + cos(pi * e / t_max)) / 2    (torch CosineAnnealingLR; keeps
             oscillating past t_max, as torch does when training runs longer than t_max)

with e = max(epoch - offset, 0): `offset` epochs pass before the scheduler starts stepping (a recipe
whose schedulers start after its warm-up; offset 0 when warm-up epochs count).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

SCHEDULES = ("constant", "step", "multistep", "cosine")


@dataclasses.dataclass(frozen=True)
class EpochSchedule:
  name: str = "constant"
  step_size: int = 1
  gamma: float = 0.1
  milestones: tuple[int, ...] = ()
  t_max: int = 1
  eta_min: float = 0.0
  offset: int = 0

  def __post_init__(self):
    if self.name not in SCHEDULES:
      close = difflib.get_close_matches(str(self.name), SCHEDULES, n=1)
      raise ValueError(f"unknown schedule {self.name!r}; expected one of {SCHEDULES}"
                       + (f" (did you mean {close[0]!r}?)" if close else ""))
    if self.name == "step" and self.step_size < 1:
      raise ValueError(f"step schedule needs step_size >= 1, got {self.step_size}")
    if self.name == "cosine" and self.t_max < 1:
      raise ValueError(f"cosine schedule needs t_max >= 1, got {self.t_max}")
    if list(self.milestones) != sorted(self.milestones):
      raise ValueError(f"multistep milestones must be increasing, got {self.milestones}")

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> EpochSchedule:
    cfg = dict(cfg)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in cfg if k not in known]
    if unknown:
      hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
      raise ValueError(f"unknown schedule keys {unknown} (close matches: {hints}); known keys: {known}")
    if "milestones" in cfg:
      cfg["milestones"] = tuple(int(m) for m in cfg["milestones"])
    return cls(**cfg)

  def learning_rate(self, epoch: int, base_lr: float) -> float:
    """The learning rate of a group with initial rate `base_lr` during `epoch` (Python double)."""
    e = max(int(epoch) - self.offset, 0)
    if self.name == "constant":
      return float(base_lr)
    if self.name == "step":
      return base_lr * self.gamma ** (e // self.step_size)
    if self.name == "multistep":
      return base_lr * self.gamma ** sum(m <= e for m in self.milestones)
    return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * e / self.t_max)) / 2
