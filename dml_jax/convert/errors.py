"""Errors of weight conversion and loading; every one is a UserError (one `error:` line on the command line)."""

from dml_jax.errors import InvalidValueError, UserError, UserFileNotFoundError


class WeightsMismatchError(UserError, ValueError):
  """Weights do not fit a model: lists every missing, unexpected and mis-shaped key."""

  def __init__(self, source: str, *, missing=(), unexpected=(), misshaped=(), note: str = ""):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    headline = f"weights from {source} do not fit the model" + (f" ({note})" if note else "")
    lines = []
    if self.missing:
      lines.append(f"  missing keys ({len(self.missing)}): {_short(self.missing)}")
    if self.unexpected:
      lines.append(f"  unexpected keys ({len(self.unexpected)}): {_short(self.unexpected)}")
    if self.misshaped:
      lines.append(f"  mis-shaped keys ({len(self.misshaped)}): " +
                   _short([f"{k}: file {a} vs model {b}" for k, a, b in self.misshaped]))
    counts = [f"{len(v)} {k}" for k, v in (("missing", self.missing), ("unexpected", self.unexpected),
                                            ("mis-shaped", self.misshaped)) if v]
    super().__init__(f"{headline}: {', '.join(counts)} keys" if counts else headline,
                     "weights and model must be one architecture: convert the matching checkpoint "
                     "(convert_timm_weights.py --model NAME), or choose the model the weights were made for",
                     details=lines)


class CheckpointReadError(InvalidValueError):
  """A checkpoint file cannot be read (damaged, wrong kind, pickled objects)."""


class WeightsNotFoundError(UserFileNotFoundError):
  """A weights directory (or checkpoint) the user named does not exist or is incomplete."""


class OutDirError(UserError, ValueError):
  """--out names a folder the converter must not replace."""


class HubUnavailableError(UserError, RuntimeError):
  """timm could not get pretrained weights by name (no network, not cached, unknown tag)."""


def _short(items, limit: int = 40) -> str:
  items = list(items)
  more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(map(str, items[:limit])) + more
