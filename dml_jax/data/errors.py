"""Errors of the data package: each names the dataset, the path and what was expected."""

from __future__ import annotations

from typing import Sequence


class DatasetLayoutError(ValueError):
  """A data root holds no recognised layout of a dataset, or a split file is malformed."""

  def __init__(self, dataset: str, message: str, *, looked_at: Sequence[str] = (),
               expected: Sequence[str] = ()):
    self.dataset = dataset
    self.looked_at = list(looked_at)
    self.expected = list(expected)
    lines = [f"dataset {dataset!r}: {message}"]
    if self.looked_at:
      lines.append("looked at:")
      lines.extend(f"  {p}" for p in self.looked_at)
    if self.expected:
      lines.append("expected one of these layouts:")
      lines.extend(f"  {layout}" for layout in self.expected)
    super().__init__("\n".join(lines))


class CorruptImageError(OSError):
  """An image file (or stored record) cannot be decoded."""

  def __init__(self, ref: str, cause: BaseException | str):
    self.ref = ref
    super().__init__(f"cannot decode image {ref}: {cause}. Pass skip_corrupt=True to load_dataset to skip "
                     "unreadable images (they are counted and listed in the log).")


class MissingFilesError(FileNotFoundError):
  """Split files list images that are not on disk."""

  def __init__(self, dataset: str, missing: Sequence[str], listed_in: str):
    self.missing = list(missing)
    shown = "\n".join(f"  {p}" for p in self.missing[:10])
    more = f"\n  ... and {len(self.missing) - 10} more" if len(self.missing) > 10 else ""
    super().__init__(f"dataset {dataset!r}: {len(self.missing)} image(s) listed in {listed_in} are missing:\n"
                     f"{shown}{more}\nPass skip_corrupt=True to load_dataset to skip them (counted in the log).")
