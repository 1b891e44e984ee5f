"""Consumes a source state dict key by key, so that nothing is left over or dropped unannounced."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from dml_jax.convert.errors import WeightsMismatchError


class StateDictReader:
  """Wraps {key: array}; `take` marks keys used, `drop` marks keys deliberately discarded.

  `finish()` raises WeightsMismatchError listing every key that was asked for but absent and every key
  neither taken nor dropped. Converters call it once at the end, so one run reports all problems.
  """

  def __init__(self, state_dict: Mapping[str, np.ndarray], source: str):
    self.source = source
    self._sd = {k: np.asarray(v) for k, v in state_dict.items()}
    self._used: set[str] = set()
    self._missing: list[str] = []
    self.dropped: list[str] = []

  def keys(self) -> list[str]:
    return list(self._sd)

  def __contains__(self, key: str) -> bool:
    return key in self._sd

  def take(self, key: str) -> np.ndarray | None:
    if key not in self._sd:
      self._missing.append(key)
      return None
    self._used.add(key)
    return self._sd[key]

  def drop(self, patterns: Iterable[str]) -> list[str]:
    """Marks keys fully matching any regex in `patterns` as discarded on purpose (e.g. classifier heads)."""
    regexes = [re.compile(p) for p in patterns]
    hit = [k for k in self._sd if k not in self._used and any(r.fullmatch(k) for r in regexes)]
    self._used.update(hit)
    self.dropped.extend(hit)
    return hit

  def finish(self, note: str = "") -> None:
    unexpected = sorted(k for k in self._sd if k not in self._used)
    if self._missing or unexpected:
      raise WeightsMismatchError(self.source, missing=self._missing, unexpected=unexpected, note=note)
