"""Multi-host runs on JAX's multi-controller runtime: the same program on every host, one process each.

`initialize(...)` connects the processes before anything touches a device:
  - explicit: coordinator address (host:port of process 0), number of processes, this process's id;
  - SLURM (`srun`): jax.distributed finds the coordinator, process count and id in SLURM's environment;
  - otherwise a single process (nothing to do).
On CPU hosts the collectives go through gloo (XLA's CPU backend has no other multi-process transport).

Afterwards every process sees all devices in `jax.devices()`; the trainer's mesh spans them, each process
loads its share of every global batch (the samplers give every process the same global batches), the loss
still sees the whole global batch, evaluation gathers every embedding onto every process, and process 0
alone logs and prints. Checkpoints are written by orbax with every process taking part, into one shared
directory (the workdir must be on a file system all hosts see).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from dml_jax.errors import UserError


def slurm_job() -> bool:
  """True inside a multi-task SLURM job step (srun with more than one task)."""
  return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS",
                                                            os.environ.get("SLURM_NTASKS", "1"))) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Connects this process to the others (see the module docstring); a no-op for a single process."""
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise UserError("--coordinator_address needs --num_processes and --process_id too",
                    "e.g. --coordinator_address=host0:1234 --num_processes=2 --process_id=0 on the first host")
  if not explicit and not slurm_job():
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise UserError("--num_processes / --process_id need --coordinator_address (host:port of process 0)")
    return
  if explicit and not 0 <= process_id < num_processes:
    raise UserError(f"--process_id {process_id} must lie in [0, --num_processes={num_processes})")
  # Only the CPU backend reads this (GPUs use NCCL): without it, CPU-only hosts cannot run collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()



# -- agreeing across processes ------------------------------------------------------------------------------

_BUCKET_WORDS = 1024  # payloads are padded to multiples of 4 KiB, so that a few compiled broadcasts serve all


def _broadcast_words(words: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.broadcast_one_to_all(words))


def broadcast_json(value: Any) -> Any:
  """Process 0's `value` (anything `json` writes) on every process; the value itself with one process.

  Host-side decisions that every process must take alike (the metrics that select the best checkpoint, a
  method's host-computed state) are computed once, on process 0, and shared with this: results computed
  separately could differ in the last bit between hosts of different CPUs (BLAS, FAISS), and one differing
  decision (a checkpoint saved as 'best' on one host only) stalls every process at its next barrier.
  Floats travel as JSON text, which round-trips float64 exactly. Other processes pass any placeholder.
  """
  if jax.process_count() == 1:
    return value
  payload = json.dumps(value).encode() if jax.process_index() == 0 else b""
  # The length first (one word), then the bytes in int32 words (psum-broadcast works on numbers).
  size = int(_broadcast_words(np.asarray([len(payload)], np.int32))[0])
  words = -(-size // 4)
  padded = np.zeros(-(-max(words, 1) // _BUCKET_WORDS) * _BUCKET_WORDS, np.int32)
  if jax.process_index() == 0:
    raw = payload + b"\0" * (4 * words - size)
    padded[:words] = np.frombuffer(raw, np.int32)
  data = _broadcast_words(padded)
  return json.loads(data.view(np.uint8)[:size].tobytes().decode())


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any (e.g. a SIGTERM that reached one host first)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.asarray(multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))).max())
