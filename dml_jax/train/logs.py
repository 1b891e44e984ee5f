"""Run logs: a JSONL metrics file, TensorBoard event files (tensorboardX, no TensorFlow), a summary table.

Every record in `<workdir>/metrics.jsonl` is one JSON object with a 'kind' ('config', 'train', 'eval',
'event', 'summary'), the global 'step', the 'epoch' and the values, e.g.
  {"kind": "train", "step": 120, "epoch": 1, "loss": 3.21, "lr/base": 0.0001, "images_per_s": 812.4}
  {"kind": "eval", "step": 120, "epoch": 1, "split": "test", "recall@1": 0.71, "map@r": 0.32}
Evaluation before training has epoch -1.

What the file holds after a resume: the records of the committed history, each step once. A run that
was killed (or stopped) after its newest intact checkpoint had logged steps it will now compute again;
before the resumed run writes anything, `MetricLogger.rewind` moves those records ('train' and 'eval'
records of later steps, and any 'summary') to `metrics.superseded.jsonl` (kept, never read back) and
rewrites metrics.jsonl atomically, then appends an 'event' record {"event": "resumed", ...}. A start
without a checkpoint moves every earlier record there. So metrics.jsonl of a run that was killed,
preempted or fell back to an older intact step reads as the log of a run that never stopped (times and
images/s aside), and TensorBoard hides the superseded points too (tensorboardX's purge_step).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _summary_writer_class():
  # tensorboardX's writer module runs `import torch` at import time only to widen an isinstance check.
  # Training must not load torch, so make that import fail fast while tensorboardX loads (unless torch
  # is already loaded, e.g. in a test process).
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, "item") and getattr(value, "shape", None) == ():
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN / Inf
  return value


class MetricLogger:
  """Appends records to metrics.jsonl and mirrors scalars to TensorBoard (only on process 0)."""

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    self.tensorboard = tensorboard
    self._file = None
    self._tb = None
    if enabled:
      self._open()

  @property
  def path(self) -> pathlib.Path:
    return self.workdir / METRICS_FILE

  def _open(self, purge_step: int | None = None) -> None:
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a", buffering=1)
    if self.tensorboard:
      # purge_step hides the points of steps >= it that earlier event files hold (steps computed again).
      self._tb = _summary_writer_class()(str(self.workdir / TENSORBOARD_DIR), purge_step=purge_step)

  def rewind(self, step: int | None) -> list[dict]:
    """Makes metrics.jsonl the log of the committed history up to `step` (None: nothing committed), before a
    (re)start writes anything: see the module docstring. Returns the records kept, in order.

    Kept: 'config' and 'event' records, and 'train' / 'eval' records of steps <= `step`. Moved to
    metrics.superseded.jsonl: later 'train' / 'eval' records and 'summary' records (with `step` None, every
    record). Lines cut short by a kill are dropped.
    """
    if not self.enabled or not self.path.exists():
      return []
    kept, moved, lines = [], [], []
    for line in self.path.read_text(encoding="utf-8").splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # the half-written line of a killed run
      if not isinstance(record, dict):
        continue
      kind, record_step = record.get("kind"), record.get("step")
      later = step is None or (kind in ("train", "eval") and isinstance(record_step, int) and record_step > step)
      if later or kind == "summary":
        moved.append(line)
      else:
        kept.append(record)
        lines.append(line)
    if not moved:
      return kept
    self.close()
    with open(self.workdir / SUPERSEDED_FILE, "a", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in moved))
      f.flush()
      os.fsync(f.fileno())
    tmp = self.workdir / f".{METRICS_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)  # a kill before this line leaves the old file whole: the next start rewinds again
    self._open(purge_step=0 if step is None else step + 1)
    return kept

  def write(self, kind: str, *, step: int, epoch: int | None = None, **values: Any) -> None:
    if not self.enabled:
      return
    record = {"kind": kind, "step": int(step), "epoch": epoch, "time": round(time.time(), 3), **_jsonable(values)}
    self._file.write(json.dumps(record) + "\n")
    if self._tb is not None and kind in ("train", "eval"):
      prefix = kind if kind == "train" else f"eval_{values.get('split', 'test')}"
      for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
          self._tb.add_scalar(f"{prefix}/{key}", value, int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A plain-text table; floats in [0, 1] are shown as percentages with one decimal (as papers report)."""

  def fmt(v: Any) -> str:
    if isinstance(v, float):
      return f"{100 * v:.1f}" if 0.0 <= v <= 1.0 else f"{v:.4g}"
    return "-" if v is None else str(v)

  cells = [list(columns)] + [[fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
