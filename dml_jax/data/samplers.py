"""Batch samplers: each epoch's global batches as record indices, a pure function of (seed, epoch).

A sampler returns int64 [steps, global_batch] from `epoch_indices(epoch)`; the loaders turn that into
grain pipelines, split each global batch across processes and decode/augment the rows. Anything with
`batch_size`, `__len__` and `epoch_indices` plugs in (the hook the Divide & Conquer method uses:
`GroupedSampler` restricts batches to per-record groups, e.g. the current clusters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class BatchSampler(Protocol):
  """Global batches of record indices, deterministic per (seed, epoch)."""

  batch_size: int

  def __len__(self) -> int:
    """Steps (batches) per epoch."""
    ...

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """int64 [len(self), batch_size] record indices of epoch `epoch`."""
    ...


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
  # Independent streams per (seed, epoch, purpose): the sampler never shares draws with augmentation.
  return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)]))


def _class_index(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
  """(class ids present, indices of each class in ascending order)."""
  order = np.argsort(labels, kind="stable")
  classes, starts = np.unique(labels[order], return_index=True)
  return classes, np.split(order, starts[1:])


class MPerClassSampler:
  """B/k classes x k images per batch, each class's images contiguous; epoch of len(labels) // B batches.

  replace=False (default) is VPTSP's class_random_sampler (docs/methods/vptsp.md): the B/k classes
  are distinct, and k distinct images per class (a class with fewer than k images gives all of them,
  repeated, topped up with a random subset). replace=True is DADA's: classes and images drawn
  with replacement. Every batch is an independent draw, not a permutation of the data.
  """

  def __init__(self, labels: Sequence[int], batch_size: int, samples_per_class: int, *, seed: int = 0,
               steps_per_epoch: int | None = None, replace: bool = False):
    labels = np.asarray(labels, np.int64)
    if samples_per_class < 1 or batch_size % samples_per_class:
      raise ValueError(f"samples_per_class ({samples_per_class}) must divide batch_size ({batch_size})")
    self.batch_size = int(batch_size)
    self.samples_per_class = int(samples_per_class)
    self.classes_per_batch = batch_size // samples_per_class
    self.replace = replace
    self.seed = seed
    self.classes, self.class_indices = _class_index(labels)
    if not replace and self.classes_per_batch > len(self.classes):
      raise ValueError(f"a batch needs {self.classes_per_batch} distinct classes (batch {batch_size} / "
                       f"{samples_per_class} per class) but the records have {len(self.classes)}")
    self.steps = int(steps_per_epoch) if steps_per_epoch is not None else len(labels) // batch_size
    if self.steps < 1:
      raise ValueError(f"{len(labels)} records give no batch of {batch_size}; set steps_per_epoch")

  def __len__(self) -> int:
    return self.steps

  def _class_images(self, rng: np.random.Generator, members: np.ndarray) -> np.ndarray:
    k = self.samples_per_class
    if self.replace:
      return rng.choice(members, k, replace=True)
    if len(members) >= k:
      return rng.choice(members, k, replace=False)
    repeats = np.tile(members, k // len(members))
    return np.concatenate([repeats, rng.choice(members, k % len(members), replace=False)])

  def epoch_indices(self, epoch: int) -> np.ndarray:
    rng = epoch_rng(self.seed, epoch, stream=1)
    out = np.empty((self.steps, self.batch_size), np.int64)
    for step in range(self.steps):
      chosen = rng.choice(len(self.classes), self.classes_per_batch, replace=self.replace)
      out[step] = np.concatenate([self._class_images(rng, self.class_indices[c]) for c in chosen])
    return out


class RandomSampler:
  """Shuffled records in batches, dropping the last partial batch (Proxy-Anchor's DataLoader).

  One permutation per epoch; with steps_per_epoch beyond len // B, further permutations follow.
  """

  def __init__(self, num_records: int, batch_size: int, *, seed: int = 0, steps_per_epoch: int | None = None):
    self.num_records = int(num_records)
    self.batch_size = int(batch_size)
    self.seed = seed
    self.steps = int(steps_per_epoch) if steps_per_epoch is not None else num_records // batch_size
    if self.steps < 1:
      raise ValueError(f"{num_records} records give no batch of {batch_size}; set steps_per_epoch")

  def __len__(self) -> int:
    return self.steps

  def epoch_indices(self, epoch: int) -> np.ndarray:
    rng = epoch_rng(self.seed, epoch, stream=2)
    per_perm = self.num_records // self.batch_size
    if per_perm < 1:
      raise ValueError(f"{self.num_records} records cannot fill a batch of {self.batch_size}")
    perms = [rng.permutation(self.num_records)[:per_perm * self.batch_size]
             for _ in range(-(-self.steps // per_perm))]
    return np.concatenate(perms).reshape(-1, self.batch_size)[:self.steps]


class GroupedSampler:
  """Batches restricted to one group each, round-robin over groups (Divide & Conquer's clusters).

  groups: int [N] per-record group id; records with a negative id are left out. `make_sampler(indices,
  labels, seed)` builds the sampler of one group over its local positions 0..len(indices)-1 (default:
  a per-group MPerClassSampler); its batches are mapped back to record indices. An epoch is `rounds`
  rounds of one batch per group in group order, rounds = max over groups of that group's epoch length
  (D&C's merge of per-cluster loaders; a shorter group's batches continue into its next epochs).
  """

  def __init__(self, labels: Sequence[int], groups: Sequence[int], batch_size: int, *, seed: int = 0,
               make_sampler: Callable[[np.ndarray, np.ndarray, int], BatchSampler] | None = None,
               samples_per_class: int = 2, steps_per_epoch: int | None = None):
    labels = np.asarray(labels, np.int64)
    groups = np.asarray(groups, np.int64)
    if labels.shape != groups.shape:
      raise ValueError(f"labels {labels.shape} and groups {groups.shape} must have one entry per record")
    self.batch_size = int(batch_size)
    self.seed = seed
    if make_sampler is None:
      def make_sampler(idx, group_labels, group_seed):
        del idx
        return MPerClassSampler(group_labels, batch_size, samples_per_class, seed=group_seed)
    self.group_ids = np.unique(groups[groups >= 0])
    if len(self.group_ids) == 0:
      raise ValueError("GroupedSampler: no record has a group id >= 0")
    self.members = [np.flatnonzero(groups == g) for g in self.group_ids]
    self.samplers = [make_sampler(m, labels[m], seed * 1_000_003 + int(g)) for m, g in zip(self.members,
                                                                                           self.group_ids)]
    for s in self.samplers:
      if s.batch_size != batch_size:
        raise ValueError(f"a group sampler has batch size {s.batch_size}, expected {batch_size}")
    rounds = max(len(s) for s in self.samplers)
    self.steps = int(steps_per_epoch) if steps_per_epoch is not None else rounds * len(self.samplers)

  def __len__(self) -> int:
    return self.steps

  def epoch_indices(self, epoch: int) -> np.ndarray:
    num_groups = len(self.samplers)
    rounds = -(-self.steps // num_groups)
    per_group = []
    for sampler, members in zip(self.samplers, self.members):
      # A group whose epoch is shorter than `rounds` continues with its following epochs, so a
      # (seed, epoch) pair still determines everything.
      n = len(sampler)
      batches, sub_epoch = [], epoch * -(-rounds // n)
      while sum(len(b) for b in batches) < rounds:
        batches.append(sampler.epoch_indices(sub_epoch))
        sub_epoch += 1
      per_group.append(members[np.concatenate(batches)[:rounds]])
    interleaved = np.stack(per_group, axis=1).reshape(-1, self.batch_size)  # round-major: g0 g1 .. g0 g1 ..
    return interleaved[:self.steps]
