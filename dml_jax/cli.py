"""How every command line of dml_jax ends: one `error:` line for what the user can fix, a traceback for bugs.

  sys.exit(cli.run(lambda: main(argv), debug=cli.debug_requested(argv)))

Exit statuses:
  0    success
  1    a bug (the usual Python traceback)
  2    `error: ...`: a user mistake (UserError: a typo, a missing path, a bad value), or the environment
       stopped the run in a way the user must fix (disk full, quota, permission denied, read-only file
       system); no traceback unless --debug (or DML_JAX_DEBUG=1)
  130  interrupted (Ctrl-C) before a preemption handler was installed
  128 + signal   stopped by SIGTERM / SIGINT after saving (dml_jax.preemption)

train.py parses its flags with absl; `absl_flags_parser` makes absl's parse errors (unknown flag, bad
value, unknown `--config.KEY`) one line too, with close matches for a mistyped config key at any depth.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dml_jax.errors import EXIT_USER_ERROR, UserError, close_matches

EXIT_BUG = 1
EXIT_INTERRUPTED = 130
DEBUG_ENV = "DML_JAX_DEBUG"
_HELP_FLAGS = ("-h", "--help", "-help", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull")
_DISK_FULL = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
_DENIED = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system"}
# Libraries that wrap the OS error in their own exception (tensorstore under orbax) keep its text.
_TEXT_PATTERNS = (("No space left on device", "disk full"), ("Disk quota exceeded", "disk quota exceeded"),
                  ("Permission denied", "permission denied"), ("Read-only file system", "read-only file system"))


class Stopped(Exception):
  """The run stopped on request after saving its state (dml_jax.preemption.Preempted): exit_status, no traceback."""

  exit_status = EXIT_INTERRUPTED


def debug_requested(argv: Sequence[str] | None = None) -> bool:
  """--debug on the command line, or DML_JAX_DEBUG=1 in the environment."""
  argv = sys.argv if argv is None else argv
  return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def _chain(error: BaseException) -> Iterator[BaseException]:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def environment_cause(error: BaseException) -> tuple[str, str | None, str] | None:
  """(what, path or None, original message) when the disk, a quota or a permission stopped the run.

  Looks through the whole exception chain: orbax and grain re-raise the OSError inside their own errors.
  """
  for e in _chain(error):
    if isinstance(e, OSError) and not isinstance(e, UserError):
      what = _DISK_FULL.get(e.errno) or _DENIED.get(e.errno)
      if what:
        path = e.filename if e.filename is not None else None
        return what, None if path is None else os.fspath(path), e.strerror or str(e)
  for e in _chain(error):
    text = str(e)
    for pattern, what in _TEXT_PATTERNS:
      if pattern in text:
        quoted = re.search(r"""["']((?:/|\.{1,2}/|[A-Za-z]:\\)[^"']+)["']""", text)
        return what, quoted.group(1) if quoted else None, text.strip().splitlines()[0][:300]
  return None


def _environment_line(what: str, path: str | None, message: str) -> str:
  where = f" while writing {path}" if what.startswith("disk") and path else (f": {path}" if path else "")
  fix = ("free space (or raise the quota) there, or write elsewhere" if what.startswith("disk")
         else "choose a folder you can write, or fix its permissions")
  return f"error: {what}{where} ({message}) -- {fix}"


def report(error: BaseException, *, debug: bool = False, file=None) -> int:
  """Prints a UserError or an environment failure as one `error:` line; returns the exit status.

  Anything else is not reported here (the caller re-raises it, so that it keeps its traceback).
  """
  file = file or sys.stderr
  if debug:
    traceback.print_exception(error, file=file)
  if isinstance(error, UserError):
    for line in error.details:
      print(line, file=file)
    print(f"error: {error.headline}", file=file, flush=True)
    return error.exit_status
  cause = environment_cause(error)
  if cause is None:
    raise ValueError("report() handles UserError and disk / permission failures only") from error
  line = _environment_line(*cause)
  print(line, file=file, flush=True)
  if cause[0].startswith("disk") and _background_work() and not _REPEATED:
    # Background threads and worker processes print their own failures while shutting down; say it last too.
    _REPEATED.append(line)
    atexit.register(lambda: print(f"{line}  [repeated after the shutdown messages]", file=sys.stderr, flush=True))
  return EXIT_USER_ERROR


_REPEATED: list[str] = []


def _background_work() -> bool:
  """Whether other threads or child processes run, which may print their own failures at shutdown."""
  import multiprocessing  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel

  return threading.active_count() > 1 or bool(multiprocessing.active_children())


class _BackgroundErrorFilter:
  """Drops orbax's log of an exception in one of its background threads: the main thread re-raises the same
  exception, which `report` turns into the one line (a disk-full save otherwise prints that thread's traceback
  before it, and a second one at interpreter shutdown)."""

  def filter(self, record) -> bool:
    path = record.pathname.replace("\\", "/")
    return not (record.levelno >= 40 and "/orbax/checkpoint/" in path and "/futures/" in path)


def quiet_background_errors(debug: bool = False) -> None:
  """Installs `_BackgroundErrorFilter` on absl's logger (orbax logs through absl), unless `debug`."""
  import logging  # pylint: disable=import-outside-toplevel

  logger = logging.getLogger("absl")
  if not debug and not any(isinstance(f, _BackgroundErrorFilter) for f in logger.filters):
    logger.addFilter(_BackgroundErrorFilter())


def run(fn: Callable[[], Any], *, debug: bool = False) -> int:
  """Calls fn() and returns the process exit status (see the module docstring); bugs propagate.

  fn's return value: an int is taken as the exit status, anything else means 0.
  """
  try:
    result = fn()
  except UserError as error:
    return report(error, debug=debug)
  except Stopped as error:
    print(str(error), file=sys.stderr, flush=True)
    return error.exit_status
  except KeyboardInterrupt:
    if debug:
      traceback.print_exc()
    print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
  except Exception as error:  # pylint: disable=broad-except
    if environment_cause(error) is None:
      raise
    return report(error, debug=debug)
  return result if isinstance(result, int) and not isinstance(result, bool) else 0


# ------------------------------------------------------------------------------------------ absl / configs


def dotted_keys(config: Any, prefix: str = "") -> list[str]:
  """Every key of a ConfigDict (or dict) at every depth: ['dataset', 'dataset.name', ...]."""
  keys = []
  items = config.items() if hasattr(config, "items") else ()
  for key, value in items:
    path = f"{prefix}{key}"
    keys.append(path)
    if hasattr(value, "items") and not isinstance(value, (str, bytes)):
      keys.extend(dotted_keys(value, path + "."))
  return keys


def _has_path(config: Any, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not hasattr(node, "items") or part not in dict(node.items()):
      return False
    node = dict(node.items())[part]
  return True


def unknown_config_key_error(path: str, config: Any, *, flag: str = "config",
                             print_config_hint: str = "") -> UserError:
  """UserError for `--<flag>.<path>` when `path` is not a key: close matches at any depth, or the valid keys."""
  keys = dotted_keys(config)
  parts = path.split(".")
  # The deepest existing prefix: its children are the keys the user could have meant at that level.
  depth = 0
  while depth < len(parts) and _has_path(config, ".".join(parts[:depth + 1])):
    depth += 1
  parent = ".".join(parts[:depth])
  siblings = [k for k in keys if k.count(".") == depth and (not parent or k.startswith(parent + "."))]
  rest = "." + ".".join(parts[depth + 1:]) if depth + 1 < len(parts) else ""
  # A typo in the failing name, among its siblings; then a typo anywhere in the path (or a key under the
  # wrong parent), among the keys of the same depth, with a stricter cutoff: 'optim.zzz' suggests nothing.
  close = [f"{prefix}{name}{rest}" for prefix in [parent + "." if parent else ""]
           for name in close_matches(parts[depth], [k.rsplit(".", 1)[-1] for k in siblings], n=3)]
  same_depth = [k for k in keys if k.count(".") == len(parts) - 1]
  close += [k for k in close_matches(path, same_depth, n=3, cutoff=0.8) if k not in close]
  close += [k for k in keys if k.rsplit(".", 1)[-1] == parts[-1] and k not in close]  # the same name elsewhere
  close = close[:3]
  message = f"unknown config key {path!r} (--{flag}.{path})"
  if close:
    message += f"; did you mean {' or '.join(repr(c) for c in close)}?"
  elif parent and not siblings:
    message += f"; {parent!r} is a value, not a group of keys"
  else:
    level = f"keys under {parent!r}" if parent else "top-level keys"
    names = [k.rsplit(".", 1)[-1] for k in siblings]
    message += f"; {level}: {', '.join(names) if names else '(none)'}"
  return UserError(message, print_config_hint or "--print_config lists every key of the config")


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    for dashes in ("--", "-"):
      if arg == f"{dashes}{name}" and i + 1 < len(argv):
        return argv[i + 1]
      if arg.startswith(f"{dashes}{name}="):
        return arg.split("=", 1)[1]
  return None


def _override_paths(argv: Sequence[str], name: str) -> list[str]:
  paths = []
  for arg in argv:
    match = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if match:
      paths.append(match.group(1))
  return paths


def load_config_file(spec: str) -> Any:
  """The config of `--config=FILE[:ARG]` (get_config(ARG)), unlocked; UserError when the file is missing."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  path, *args = spec.split(":", 1)
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    hint = "pass a config file, e.g. --config configs/demo.py"
    if os.path.isdir(folder):
      close = close_matches(os.path.basename(path), [f for f in os.listdir(folder) if f.endswith(".py")])
      if close:
        hint = f"did you mean {' or '.join(os.path.join(folder, c) for c in close)}?"
    raise UserError(f"config file {path} not found", hint)
  # Loaded as ml_collections loads it (get_config(ARG)), under a name of its own: absl loads it again.
  module_spec = importlib.util.spec_from_file_location("_dml_jax_config_probe", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*args)


def absl_flags_parser(config_flag: str = "config", usage: str = "") -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for absl's app.run: --help exits 0, every parse error is one `error:` line (status 2).

  `usage` (e.g. 'python train.py --config configs/demo.py --workdir runs/demo') is the hint of a flag error.
  """

  def parse(argv: list[str]) -> list[str]:
    from absl import app, flags  # pylint: disable=import-outside-toplevel

    debug = debug_requested(argv)
    if any(arg in _HELP_FLAGS for arg in argv[1:]):
      # absl's own --help exits with status 1, which scripts read as a failure.
      app.usage(shorthelp=not any(a.endswith("helpfull") for a in argv[1:]), writeto_stdout=True)
      sys.exit(0)

    def parse_or_raise():
      spec = _flag_value(argv, config_flag)
      config = load_config_file(spec) if spec else None  # a missing file: one line, before absl's report
      try:
        return flags.FLAGS(argv)
      except (KeyError, AttributeError) as error:  # ml_collections: an unknown --config.KEY
        if config is None:
          raise
        unknown = [p for p in _override_paths(argv, config_flag) if not _has_path(config, p)]
        if not unknown:
          raise
        raise unknown_config_key_error(unknown[0], config, flag=config_flag) from error
      except flags.Error as error:
        message = " ".join(str(error).split())
        if config is not None:
          unknown = [p for p in _override_paths(argv, config_flag) if not _has_path(config, p)]
          if unknown:
            raise unknown_config_key_error(unknown[0], config, flag=config_flag) from error
        if f"--{config_flag}." in message:
          raise UserError(message, "--print_config shows every key with its current value") from error
        if isinstance(error, flags.UnrecognizedFlagError):
          known = [n for n in flags.FLAGS if not n.startswith(config_flag + ".")]
          close = close_matches(error.flagname, known)
          hint = f"did you mean --{' or --'.join(close)}?" if close else "--help lists the flags"
          raise UserError(f"unknown flag --{error.flagname}", hint) from error
        raise UserError(message, f"{usage + '; ' if usage else ''}--help lists the flags") from error

    try:
      return parse_or_raise()
    except UserError as error:
      sys.exit(report(error, debug=debug))

  return parse
