"""Parameter tables that live in host memory; only the rows a batch uses travel to the device.

VPTSP's class-prompt tables on SOP, In-Shop and iNaturalist (C x prompts x D per layer, up to 2.2 B floats)
do not fit next to a ViT in accelerator memory. The official code keeps them, and their AdamW moments,
in CPU memory (its "prompt memory bank", specs/vptsp_dada.md §1.8). A method declares such tables with
`host_row_tables()`; its `params` then hold, for each table, a small device buffer
[rows_per_batch, *row_shape] at `buffer_path`, an ordinary trainable parameter of some optimizer group.
Before every step the trainer writes the batch's rows (`batch_rows(labels)`, in buffer order) and their
optimizer moments into that buffer and the group's optimizer state; after the step it writes them back
(dml_jax/train/row_sparse.py). The update is therefore lazy (row-sparse): rows absent from a batch keep
their values and moments, rows present get the group's normal update, and the group's step count is the
global one (torch's single `step` per memory-bank parameter).

This module only declares tables; the host storage and the per-step traffic belong to the trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class HostRowTable:
  """One host-resident table [num_rows, *row_shape] float32.

  buffer_path: '/'-joined path in params of the device buffer [rows_per_batch, *row_shape]; the table's
    rows are written there before each step, and the buffer's new values are written back after it.
  num_rows: rows of the table (e.g. the number of training classes).
  row_shape: shape of one row (e.g. (prompts, D)).
  init: fn(numpy Generator) -> float32 [num_rows, *row_shape], the initial table (host memory).
  """

  buffer_path: str
  num_rows: int
  row_shape: tuple[int, ...]
  init: Callable[[np.random.Generator], np.ndarray]

  @property
  def num_parameters(self) -> int:
    return int(self.num_rows * np.prod(self.row_shape, dtype=np.int64))
