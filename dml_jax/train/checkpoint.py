"""Checkpoints that a kill at any instant leaves consistent, verified on every restore.

Layout under the workdir:
  checkpoints/steps/<step>/{state,meta[,host]}   one orbax step directory per saved step
  checkpoints/manifest.json                       which steps are committed: the newest `keep_last` ('last')
                                                  and the best one, with the metric that made it best

`state` is the train-state dict (parameters, optimizer state per group, method state, step, RNG key data);
`meta` is JSON: the config, the epoch to run next, the data-iterator state, the best value so far, the
shape and dtype of every array, and a CRC-32 of every array's bytes (state and host); `host` (methods with
host state) holds that state's `state_dict()` as numpy arrays.

A save writes the step directory (orbax writes it under a temporary name and renames it when complete),
then the manifest (a temporary file, fsync, rename). A step counts only once the manifest names it, so a
kill during the step, between the step and the manifest, or during the manifest leaves the previous
manifest, whose steps are complete: 'last' and 'best' always agree with each other. Steps the manifest no
longer names are deleted after it is written, and leftovers of a killed save at the next start.

A restore verifies every array against its checksum. A damaged or unreadable step is reported by its path
and the next newest committed step is used instead; if none is intact, the run stops with the paths. A
training start (`restore(..., repair=True)`) then commits a manifest without the damaged steps and moves
their folders to `checkpoints/damaged/` (kept for inspection, never read again), so that the resumed run
can commit those step numbers anew; evaluation tools only read. Checkpoints never execute pickles (orbax
arrays, JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dml_jax import pytree as tree_lib
from dml_jax.errors import UserError

LAST = "last"
BEST = "best"
MANIFEST_FILE = "manifest.json"
STEPS_DIR = "steps"
DAMAGED_DIR = "damaged"
_FORMAT = "dml_jax.checkpoints/1"


class CheckpointError(UserError):
  """No intact checkpoint where one is needed (every committed step damaged, or none written yet)."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  meta: dict
  host: Any
  skipped: list[str]  # damaged steps passed over, newest first, each 'path: reason'


def _host_bytes(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array):
    x = x.addressable_data(0)  # replicated: every process's copy is the array
  return np.ascontiguousarray(np.asarray(x))


def checksums(tree: Any) -> dict[str, int]:
  """{'/'-joined path: CRC-32 of the array's bytes} of every leaf."""
  return {path: zlib.crc32(memoryview(_host_bytes(x)).cast("B")) for path, x in tree_lib.flatten(tree).items()}


def array_shapes(state: Any) -> dict[str, list]:
  """{'/'-joined path: [shape, dtype name]} of every array of a train state, for the checkpoint's meta (a
  method may change parameter shapes between epochs; restore needs the saved ones)."""
  return {path: [list(np.shape(x)), str(np.dtype(x.dtype))] for path, x in tree_lib.flatten(state).items()}


def _tmp_name(path: pathlib.Path) -> str:
  return f".{path.name}.tmp-"


def _write_json_atomically(path: pathlib.Path, value: dict) -> None:
  tmp = path.with_name(f"{_tmp_name(path)}{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  directory = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(directory)  # the rename itself survives a power cut
  finally:
    os.close(directory)


def _array_tree_handler() -> ocp.PyTreeCheckpointHandler:
  """orbax's handler for a tree of jax and numpy arrays (the format of StandardSave), with replicated arrays
  written whole by the devices of process 0.

  orbax's default on CPU ("replica-parallel") splits each replicated array into one slice per device, written
  by different devices: every slice is a small compiled program of its own, seconds of CPU per save of a
  ViT's few hundred arrays, for states that are small next to the disk's speed.
  """
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (int, ocp.type_handlers.ScalarHandler()),
      (float, ocp.type_handlers.ScalarHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def has_committed_step(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` has a manifest naming a step (read only: creates nothing; a damaged manifest counts, so
  that opening the checkpoints reports it)."""
  path = pathlib.Path(workdir) / "checkpoints" / MANIFEST_FILE
  try:
    manifest = json.loads(path.read_text())
  except FileNotFoundError:
    return False
  except (OSError, ValueError):
    return True
  return not isinstance(manifest, dict) or bool(manifest.get("last")) or manifest.get("best") is not None


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Checkpoints:
  """The committed steps of a workdir; see the module docstring.

  Args:
    workdir: the run's folder.
    keep_last: how many of the newest steps to keep (>= 1); the best step is kept besides.
    keep_best: track (and keep) the best step at all.
    read_only: only read (no cleanup of leftovers, no saving), e.g. for evaluation tools.
  """

  def __init__(self, workdir: str | os.PathLike, *, keep_last: int = 1, keep_best: bool = True,
               read_only: bool = False):
    if keep_last < 1:
      raise UserError(f"checkpoint.keep_last must be >= 1, got {keep_last}", "--config.checkpoint.keep_last=1")
    self.root = pathlib.Path(workdir).absolute() / "checkpoints"
    self.keep_last, self.keep_best, self.read_only = keep_last, keep_best, read_only
    self.is_main = jax.process_index() == 0
    self._manager = ocp.CheckpointManager(
        self.root / STEPS_DIR, options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=not read_only, enable_async_checkpointing=False),
        item_handlers={"state": _array_tree_handler(), "host": _array_tree_handler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self.manifest = self._read_manifest()
    if not read_only:
      self._remove_uncommitted()

  # -- the manifest -------------------------------------------------------------------------------

  @property
  def manifest_path(self) -> pathlib.Path:
    return self.root / MANIFEST_FILE

  def step_path(self, step: int) -> pathlib.Path:
    return self.root / STEPS_DIR / str(step)

  def _read_manifest(self) -> dict:
    if not self.manifest_path.is_file():
      return {"format": _FORMAT, "last": [], "best": None}
    try:
      manifest = json.loads(self.manifest_path.read_text())
      if manifest.get("format") != _FORMAT:
        raise ValueError(f"format {manifest.get('format')!r}")
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{self.manifest_path} is damaged ({e})",
                            "remove it to fall back on the step folders' own integrity checks, or use a new "
                            "--workdir") from None
    return manifest

  def committed_steps(self) -> list[int]:
    """Every step the manifest names, newest first."""
    steps = set(self.manifest["last"])
    if self.manifest["best"] is not None:
      steps.add(self.manifest["best"]["step"])
    return sorted(steps, reverse=True)

  def latest_step(self, which: str = LAST) -> int | None:
    if which == BEST:
      return None if self.manifest["best"] is None else int(self.manifest["best"]["step"])
    return int(self.manifest["last"][0]) if self.manifest["last"] else None

  @property
  def best(self) -> dict | None:
    return self.manifest["best"]

  def _remove_uncommitted(self) -> None:
    """Step folders the manifest does not name: what a killed save left behind.

    Every process takes part (orbax's delete is a collective: a barrier on every process, the files removed
    by process 0), after a barrier, so that every process lists the steps before any is removed.
    """
    keep = set(self.committed_steps())
    stale = [step for step in self._manager.all_steps() if step not in keep]
    _sync("dml_jax checkpoints opened")
    for step in stale:
      self._delete(step)
    steps_dir = self.root / STEPS_DIR
    if self.is_main and steps_dir.is_dir():  # orbax's temporary folders of an interrupted write
      for entry in steps_dir.iterdir():
        if entry.is_dir() and not entry.name.isdigit():
          shutil.rmtree(entry, ignore_errors=True)
    if self.is_main:  # a manifest never renamed into place
      for entry in self.root.glob(_tmp_name(self.manifest_path) + "*"):
        entry.unlink(missing_ok=True)
    _sync("dml_jax checkpoints cleaned")
    self._manager.reload()

  def _delete(self, step: int) -> None:
    """Removes a step folder; called on every process (orbax's delete holds a barrier)."""
    try:
      self._manager.delete(step)
    except Exception:  # noqa: BLE001 (a half-written folder orbax does not recognise)
      if self.is_main:
        shutil.rmtree(self.step_path(step), ignore_errors=True)

  # -- saving -------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, meta: dict, *, host: Any = None, best: dict | None = None) -> None:
    """Writes step `step` and commits it as the newest 'last' (and as 'best' when `best` is given: a dict with
    at least 'metric' and 'value')."""
    if self.read_only:
      raise RuntimeError("this Checkpoints object is read-only")
    step = int(step)
    meta = {**meta, "array_shapes": array_shapes(state), "checksums": {"state": checksums(state)}}
    items = dict(state=ocp.args.PyTreeSave(state))
    if host is not None:
      items["host"] = ocp.args.PyTreeSave(host)
      meta["checksums"]["host"] = checksums(host)
    items["meta"] = ocp.args.JsonSave(meta)
    if step in self._manager.all_steps():  # e.g. re-reaching a step whose earlier save was never committed
      if step in self.committed_steps():
        raise RuntimeError(f"step {step} is already committed in {self.root}")
      self._delete(step)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()
    manifest = {"format": _FORMAT, "last": ([step] + [s for s in self.manifest["last"] if s != step])[:self.keep_last],
                "best": self.manifest["best"]}
    if best is not None and self.keep_best:
      manifest["best"] = {**best, "step": step}
    self._commit(manifest, step)

  def mark_best(self, step: int, best: dict) -> None:
    """Commits the committed 'last' step `step` as the best too, by the manifest alone (its data is on disk):
    an evaluation that a signal postponed to the resumed run."""
    if self.read_only:
      raise RuntimeError("this Checkpoints object is read-only")
    if int(step) not in self.manifest["last"]:
      raise RuntimeError(f"step {step} is not a committed 'last' step of {self.root}")
    if self.keep_best:
      self._commit({**self.manifest, "best": {**best, "step": int(step)}}, int(step))

  def _commit(self, manifest: dict, step: int) -> None:
    """Writes `manifest` atomically (the commit), then deletes the step folders it no longer names."""
    if self.is_main:
      _write_json_atomically(self.manifest_path, manifest)
    _sync(f"dml_jax checkpoint {step}")
    self.manifest = manifest
    keep = set(self.committed_steps())
    for old in self._manager.all_steps():  # every process: see _delete
      if old not in keep:
        self._delete(old)

  # -- restoring ----------------------------------------------------------------------------------

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def _restore_verified(self, step: int, make_abstract: Callable[[dict], Any]) -> tuple[Any, dict, Any]:
    meta = self.read_meta(step)
    if not isinstance(meta, dict) or "checksums" not in meta:
      raise ValueError("its meta has no checksums")
    abstract = make_abstract(meta)
    items = dict(state=ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
        abstract)), meta=ocp.args.JsonRestore())
    if "host" in meta["checksums"]:
      items["host"] = ocp.args.PyTreeRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    parts = [("state", restored.state)] + ([("host", restored.host)] if "host" in items else [])
    for name, tree in parts:
      expected = meta["checksums"][name]
      got = checksums(tree)
      if set(got) != set(expected):
        raise ValueError(f"{name} arrays {sorted(set(got) ^ set(expected))[:4]} differ from the saved list")
      bad = [p for p in got if got[p] != expected[p]]
      if bad:
        raise ValueError(f"checksum mismatch in {len(bad)} {name} array(s), e.g. {bad[:3]}")
    return restored.state, meta, restored.host if "host" in items else None

  def restore(self, which: str, make_abstract: Callable[[dict], Any], *, echo: Callable[[str], None] = print,
              repair: bool = False) -> Restored:
    """The newest intact committed step of `which` ('last': the newest 'last' step, falling back to older
    committed steps; 'best': the best step, falling back to the newest 'last' ones), verified by checksum.

    make_abstract(meta) -> the ShapeDtypeStructs (with shardings) the state is restored into.
    repair: when steps were passed over as damaged, commit a manifest without them and move their folders to
      `checkpoints/damaged/` (a training start: the run recomputes those steps and commits them again).
    """
    if which == BEST and self.manifest["best"] is not None:
      best = int(self.manifest["best"]["step"])
      candidates = [best] + [s for s in self.committed_steps() if s != best]
    else:
      candidates = self.committed_steps()
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.root}", "train first (the same --workdir)")
    skipped = []
    for step in candidates:
      try:
        state, meta, host = self._restore_verified(step, make_abstract)
      except Exception as e:  # noqa: BLE001 (any failure to read a step means that step is not usable)
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        skipped.append(f"{self.step_path(step)}: {reason}")
        echo(f"checkpoint step {step} ({self.step_path(step)}) is damaged or unreadable ({reason}); trying an "
             f"older one")
        continue
      if skipped:
        echo(f"restored step {step} instead ({len(skipped)} newer step(s) damaged)")
        if repair and not self.read_only:
          self._set_aside([int(pathlib.Path(entry.split(": ", 1)[0]).name) for entry in skipped], echo)
      return Restored(step=step, state=state, meta=meta, host=host, skipped=skipped)
    raise CheckpointError(f"every checkpoint of {self.root} is damaged: " + "; ".join(skipped),
                          "start a new --workdir (or remove the damaged step folders and the manifest)")

  def _set_aside(self, damaged: list[int], echo: Callable[[str], None]) -> None:
    """Commits a manifest without the `damaged` steps, then moves their folders out of orbax's sight."""
    manifest = {**self.manifest, "last": [s for s in self.manifest["last"] if s not in damaged]}
    best = self.manifest["best"]
    if best is not None and int(best["step"]) in damaged:
      manifest["best"] = None
      echo(f"the best checkpoint (step {best['step']}, {best['metric']} {best['value']:.4g} after epoch "
           f"{best['epoch']}) was damaged: until the resumed run commits a better one (or recomputes that step), "
           f"there is no best checkpoint")
    if self.is_main:
      _write_json_atomically(self.manifest_path, manifest)
      aside = self.root / DAMAGED_DIR
      aside.mkdir(exist_ok=True)
      for step in damaged:
        source = self.step_path(step)
        if source.exists():
          target = aside / str(step)
          number = 1
          while target.exists():
            number += 1
            target = aside / f"{step}.{number}"
          os.replace(source, target)
          echo(f"moved the damaged step {step} to {target} (kept for inspection; remove it when no longer needed)")
    _sync("dml_jax checkpoint repair")
    self.manifest = manifest
    self._manager.reload()

  def newest_intact_step(self) -> int | None:
    """The newest committed step whose files verify (for messages; reads the arrays)."""
    for step in self.committed_steps():
      try:
        meta = self.read_meta(step)
        items = dict(state=ocp.args.PyTreeRestore(), meta=ocp.args.JsonRestore())
        if "host" in meta["checksums"]:
          items["host"] = ocp.args.PyTreeRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if all(checksums(restored[name]) == meta["checksums"][name] for name in items if name != "meta"):
          return step
      except Exception:  # noqa: BLE001
        continue
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
