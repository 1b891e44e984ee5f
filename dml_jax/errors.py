"""UserError: a mistake the user can fix, reported as one `error:` line instead of a traceback.

A UserError carries what is wrong (`message`, naming the culprit: the path, the key, the flag) and how
to fix it (`hint`: the flag to set, the command to run). `details` are extra lines (paths looked at,
the keys of a mismatch) printed above the error line. The command-line entry points (dml_jax.cli)
print `error: <message> -- <hint>` and exit with status 2; genuine bugs keep their traceback.

Error classes that existed before keep their old base class beside UserError (e.g.
`class DatasetLayoutError(UserError, ValueError)`), so code that catches ValueError still works.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

EXIT_USER_ERROR = 2  # argparse's status for usage errors; a scheduler should not retry these


class UserError(Exception):
  """A user mistake: `message` names the culprit, `hint` the fix, `details` extra lines above."""

  exit_status = EXIT_USER_ERROR

  def __init__(self, message: str, hint: str | None = None, details: Sequence[str] = ()):
    super().__init__(message)
    self.message = message
    self.hint = hint
    self.details = list(details)

  @property
  def headline(self) -> str:
    """The one line printed after `error: `."""
    return f"{self.message} -- {self.hint}" if self.hint else self.message

  def __str__(self) -> str:
    # The headline first, as every other exception's message; the CLI prints the details first instead.
    return "\n".join([self.headline, *self.details])

  def __reduce__(self):
    # Subclasses take other constructor arguments; rebuild from the finished fields (pickling across
    # grain workers and multiprocessing).
    return _rebuild, (type(self), self.message, self.hint, self.details), dict(self.__dict__)


def _rebuild(cls, message, hint, details):
  error = cls.__new__(cls)
  UserError.__init__(error, message, hint, details)
  return error


class UnknownNameError(UserError, KeyError):
  """An unknown name (dataset, backbone, metric, key) with the close matches."""


class InvalidValueError(UserError, ValueError):
  """A value out of range or of the wrong kind."""


class UserFileNotFoundError(UserError, FileNotFoundError):
  """A file or folder the user named does not exist."""


class UserFileExistsError(UserError, FileExistsError):
  """An output the user named exists and would be overwritten (or is not what it should be)."""


def close_matches(name: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
  """Up to n candidates close to `name` (difflib ratio >= cutoff), best first, case ignored.

  Only those nearly as close as the best are kept: 'recal@1' suggests 'recall@1', not 'recall@8' too.
  """
  scored = []
  for candidate in dict.fromkeys(candidates):
    matcher = difflib.SequenceMatcher(None, name.lower(), candidate.lower())
    if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff:
      ratio = matcher.ratio()
      if ratio >= cutoff:
        scored.append((-ratio, candidate))
  scored.sort()
  if not scored:
    return []
  best = -scored[0][0]
  return [c for r, c in scored if -r >= best - 0.1][:n]


def unknown_name(kind: str, name: str, known: Iterable[str], hint: str | None = None, max_listed: int = 30,
                 cls: type[UserError] = UnknownNameError) -> UserError:
  """cls('unknown <kind> <name>; did you mean ...?'), or listing the known names (up to max_listed).

  cls: UnknownNameError (a KeyError) by default; InvalidValueError where callers catch ValueError.
  """
  known = sorted(set(known))
  close = close_matches(name, known)
  message = f"unknown {kind} {name!r}"
  if close:
    message += f"; did you mean {' or '.join(repr(c) for c in close)}?"
  else:
    shown = ", ".join(known[:max_listed]) + (f", ... ({len(known)} in all)" if len(known) > max_listed else "")
    message += f"; known: {shown}"
  return cls(message, hint)
