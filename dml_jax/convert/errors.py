"""The one error every strict-loading path raises."""


class WeightsMismatchError(ValueError):
  """Weights do not fit a model: lists every missing, unexpected and mis-shaped key."""

  def __init__(self, source: str, *, missing=(), unexpected=(), misshaped=(), note: str = ""):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    lines = [f"weights from {source} do not fit the model" + (f" ({note})" if note else "") + ":"]
    if self.missing:
      lines.append(f"  missing keys ({len(self.missing)}): {_short(self.missing)}")
    if self.unexpected:
      lines.append(f"  unexpected keys ({len(self.unexpected)}): {_short(self.unexpected)}")
    if self.misshaped:
      lines.append(f"  mis-shaped keys ({len(self.misshaped)}): " +
                   _short([f"{k}: file {a} vs model {b}" for k, a, b in self.misshaped]))
    super().__init__("\n".join(lines))


def _short(items, limit: int = 40) -> str:
  items = list(items)
  more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(map(str, items[:limit])) + more
