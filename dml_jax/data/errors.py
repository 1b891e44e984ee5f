"""Errors of the data package: each names the dataset, the path and what was expected.

All are UserErrors (one `error:` line on the command line, dml_jax.cli) and keep their former base class
(ValueError, OSError, FileNotFoundError) for code that catches those.
"""

from __future__ import annotations

from collections.abc import Sequence

from dml_jax.errors import UserError

SKIP_CORRUPT_HINT = ("pass skip_corrupt=True to load_dataset (train.py: --config.dataset.skip_corrupt=True) to skip "
                     "them; they are counted and listed in the log")


class DatasetLayoutError(UserError, ValueError):
  """A data root holds no recognised layout of a dataset, a class is missing, or a split file is malformed."""

  def __init__(self, dataset: str, message: str, *, looked_at: Sequence[str] = (),
               expected: Sequence[str] = (), hint: str | None = None):
    self.dataset = dataset
    self.looked_at = list(looked_at)
    self.expected = list(expected)
    details = []
    if self.looked_at:
      details.append("looked at:")
      details.extend(f"  {p}" for p in self.looked_at)
    if self.expected:
      details.append("expected one of these layouts:")
      details.extend(f"  {layout}" for layout in self.expected)
    super().__init__(f"dataset {dataset!r}: {message}", hint, details)


class CorruptImageError(UserError, OSError):
  """An image file (or stored record) cannot be decoded."""

  def __init__(self, ref: str, cause: BaseException | str):
    self.ref = ref
    super().__init__(f"cannot decode image {ref}: {cause}", SKIP_CORRUPT_HINT)


class UnreadableImagesError(CorruptImageError):
  """Several images of a split cannot be decoded (found by a check before training)."""

  def __init__(self, dataset: str, split: str, bad: Sequence[tuple[str, str]], total: int):
    self.bad = list(bad)
    first_path, first_error = self.bad[0]
    UserError.__init__(self, f"dataset {dataset!r} {split}: {len(self.bad)} of {total} image(s) cannot be decoded, "
                       f"e.g. {first_path}: {first_error}", SKIP_CORRUPT_HINT,
                       [f"  {p}: {e}" for p, e in self.bad[:20]])
    self.ref = first_path


class MissingFilesError(UserError, FileNotFoundError):
  """Split files list images that are not on disk."""

  def __init__(self, dataset: str, missing: Sequence[str], listed_in: str):
    self.missing = list(missing)
    details = [f"  {p}" for p in self.missing[:10]]
    if len(self.missing) > 10:
      details.append(f"  ... and {len(self.missing) - 10} more")
    super().__init__(f"dataset {dataset!r}: {len(self.missing)} image(s) listed in {listed_in} are missing, "
                     f"e.g. {self.missing[0]}", SKIP_CORRUPT_HINT, details)
