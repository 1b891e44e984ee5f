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

import os

import jax

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

