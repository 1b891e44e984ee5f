"""grain pipelines for training and evaluation over `Records`.

Training: a sampler gives each epoch's global batches as record indices; this process keeps its
columns [p * B/P, (p + 1) * B/P) of every global batch, so the global batch is the same whatever the
process count. Each row is decoded and augmented in a grain thread with its own Generator seeded by
(seed, epoch, step, slot in the global batch), so batches are a pure function of (seed, epoch, step):
a resumed epoch (state from `get_state()`) continues with exactly the batches it would have had.

Evaluation: records in order, padded to whole global batches (valid=False on padding).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from dml_jax.data import samplers as samplers_lib
from dml_jax.data import transforms
from dml_jax.data.records import Records
from dml_jax.preprocessing import PretrainedCfg

_AUGMENT_STREAM = 3
SAMPLERS = ("m_per_class", "m_per_class_replace", "random")
# 'base': RandomResizedCrop + horizontal flip (torchvision defaults); 'autoaugment': AutoAugment (ImageNet
# policy) on the full image first (DADA's Cars196 recipe).
AUGMENTATIONS = ("base", "autoaugment")


def _check_processes(batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must lie in [0, process_count={process_count})")
  if batch_size % process_count:
    raise ValueError(f"the global batch {batch_size} must divide evenly over {process_count} processes")
  return batch_size // process_count


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _Batch:
  """Batch index -> the stacked rows of that batch (the unit of work of a worker process)."""

  def __init__(self, element, local_batch: int):
    self.element, self.local_batch = element, local_batch

  def __call__(self, batch: int) -> dict[str, np.ndarray]:
    first = int(batch) * self.local_batch
    return _stack([self.element(first + j) for j in range(self.local_batch)])


def _pipeline(element, start_batch: int, num_batches: int, local_batch: int, num_threads: int, num_workers: int,
              prefetch_batches: int) -> grain.IterDataset:
  """Batches start_batch..num_batches-1; `element(position)` makes the row at local position `position`."""
  if num_workers > 0:
    # Worker w builds batches w, w + W, ...; grain reads the workers round-robin, so the order holds.
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside absl.app.run none are parsed
      flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(start_batch, num_batches).map(_Batch(element, local_batch))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=max(1, prefetch_batches)))
  positions = grain.MapDataset.range(start_batch * local_batch, num_batches * local_batch)
  ds = positions.map(element).to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * local_batch, 2 * num_threads)))
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_stack)
  if prefetch_batches > 0:
    # Stacking a batch of float images is a sizable copy; do it ahead, off the training thread.
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return ds


class _TrainElement:
  """Local position in the epoch -> {'image': float32 [S, S, 3], 'label': int32, 'index': int32 (the record's
  row)}. Picklable for workers."""

  def __init__(self, loader: TrainLoader, epoch: int, local_indices: np.ndarray):
    self.records = loader.records
    self.normalizer = loader.normalizer
    self.kwargs = loader.transform_kwargs
    self.seed, self.epoch = loader.seed, epoch
    self.local_indices = local_indices  # int64 [steps, local_batch]
    self.local_batch = loader.local_batch_size
    self.slot_offset = loader.process_index * loader.local_batch_size

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    step, column = divmod(int(position), self.local_batch)
    row = int(self.local_indices[step, column])
    slot = self.slot_offset + column  # position in the global batch: independent of the process count
    rng = np.random.default_rng(
        np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch, _AUGMENT_STREAM, step, slot]))
    with self.records.open_image(row) as img:
      pixels = transforms.train_transform(img, rng, ref=self.records.paths[row], **self.kwargs)
    return {"image": self.normalizer(pixels), "label": np.int32(self.records.labels[row]), "index": np.int32(row)}


class TrainEpochIterator(Iterator[dict[str, np.ndarray]]):
  """One epoch's batches {'image': float32 [B_local, S, S, 3], 'label': int32 [B_local], 'index': int32
  [B_local]} (index: the row of each image in the records)."""

  def __init__(self, loader: TrainLoader, epoch: int, start_step: int):
    self._loader, self.epoch, self._step = loader, epoch, start_step
    self.indices = loader.sampler.epoch_indices(epoch)
    expected = (len(loader), loader.global_batch_size)
    if self.indices.shape != expected:
      raise ValueError(f"sampler returned indices {self.indices.shape}, expected {expected}")
    b = loader.local_batch_size
    local = self.indices[:, loader.process_index * b:(loader.process_index + 1) * b]
    self._it = iter(_pipeline(_TrainElement(loader, epoch, local), start_step, len(loader), b, loader.num_threads,
                              loader.num_workers, loader.prefetch_batches))

  def __iter__(self) -> TrainEpochIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._step >= len(self._loader):
      self.close()
      raise StopIteration
    batch = next(self._it)
    self._step += 1
    return batch

  def close(self) -> None:
    """Stops the reader threads / worker processes now (an epoch left early otherwise holds them)."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  @property
  def step(self) -> int:
    """Batches of this epoch consumed so far (including those before a resume)."""
    return self._step

  def global_indices(self, step: int) -> np.ndarray:
    """Record rows of global batch `step` of this epoch, int64 [B] (the same in every process)."""
    return self.indices[step]

  def get_state(self) -> dict[str, Any]:
    """JSON-able position: pass to `loader.epoch(state['epoch'], state=...)` to continue after it."""
    return {"epoch": self.epoch, "step": self._step, **self._loader.fingerprint()}


class TrainLoader:
  """Epochs of augmented training batches; see `make_train_loader`."""

  def __init__(self, records: Records, sampler: samplers_lib.BatchSampler, *, pretrained_cfg: PretrainedCfg,
               seed: int, process_index: int, process_count: int, num_threads: int, num_workers: int,
               prefetch_batches: int, transform_kwargs: dict[str, Any]):
    self.records, self.sampler = records, sampler
    self.global_batch_size = sampler.batch_size
    self.local_batch_size = _check_processes(sampler.batch_size, process_index, process_count)
    self.process_index, self.process_count = process_index, process_count
    self.seed, self.num_threads, self.num_workers = seed, num_threads, num_workers
    self.prefetch_batches = prefetch_batches
    self.normalizer = transforms.Normalizer(pretrained_cfg)
    self.transform_kwargs = transform_kwargs

  def __len__(self) -> int:
    return len(self.sampler)

  def fingerprint(self) -> dict[str, Any]:
    return {"seed": self.seed, "global_batch_size": self.global_batch_size, "steps_per_epoch": len(self),
            "num_records": len(self.records)}

  def epoch(self, epoch: int, state: dict[str, Any] | None = None) -> TrainEpochIterator:
    """Iterator over epoch `epoch`'s batches; with `state` (from get_state), from where it stopped."""
    start = 0
    if state is not None:
      mismatched = {k: (state.get(k), v) for k, v in self.fingerprint().items() if state.get(k) != v}
      if state.get("epoch") != epoch or mismatched:
        raise ValueError(f"cannot resume epoch {epoch} from state {state}: "
                         f"{'epoch differs; ' if state.get('epoch') != epoch else ''}"
                         f"mismatched (state, loader): {mismatched}")
      start = int(state["step"])
      if not 0 <= start <= len(self):
        raise ValueError(f"state step {start} outside [0, {len(self)}]")
    return TrainEpochIterator(self, epoch, start)


def make_sampler(records: Records, *, batch_size: int, sampler: str = "m_per_class", samples_per_class: int = 2,
                 seed: int = 0, steps_per_epoch: int | None = None) -> samplers_lib.BatchSampler:
  if sampler == "m_per_class":
    return samplers_lib.MPerClassSampler(records.labels, batch_size, samples_per_class, seed=seed,
                                         steps_per_epoch=steps_per_epoch)
  if sampler == "m_per_class_replace":
    return samplers_lib.MPerClassSampler(records.labels, batch_size, samples_per_class, seed=seed,
                                         steps_per_epoch=steps_per_epoch, replace=True)
  if sampler == "random":
    return samplers_lib.RandomSampler(len(records), batch_size, seed=seed, steps_per_epoch=steps_per_epoch)
  raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS} or a BatchSampler object")


def make_train_loader(records: Records, *, batch_size: int, pretrained_cfg: PretrainedCfg, image_size: int = 224,
                      sampler: str | samplers_lib.BatchSampler = "m_per_class", samples_per_class: int = 2,
                      seed: int = 0, num_threads: int = 8, process_index: int = 0, process_count: int = 1,
                      steps_per_epoch: int | None = None, scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                      interpolation: str = "bilinear", fast_decode: bool = True, num_workers: int = 0,
                      prefetch_batches: int = 2, augment: str = "base") -> TrainLoader:
  """Training batches: [AutoAugment +] RandomResizedCrop(image_size) + flip + the backbone's normalisation.

  Args:
    records: the training split.
    batch_size: the GLOBAL batch; each of `process_count` processes yields batch_size / process_count rows.
    pretrained_cfg: mean/std, color order and pixel scale of the backbone's weights.
    sampler: 'm_per_class' (VPTSP: distinct classes, `samples_per_class` images each, contiguous),
      'm_per_class_replace' (DADA: with replacement), 'random' (Proxy-Anchor: shuffle, drop_last), or a
      BatchSampler object (e.g. samplers.GroupedSampler for cluster-restricted batches).
    seed: fixes sampling and augmentation; epoch e of a seed is always the same batches.
    steps_per_epoch: default len(records) // batch_size (the seeds' drop_last epoch).
    fast_decode: JPEG draft decoding when the crop allows (see transforms).
    num_workers: 0 decodes rows in `num_threads` grain threads (best on few cores); >0 builds whole
      batches in that many grain worker processes (mp_prefetch) instead.
    augment: one of AUGMENTATIONS.
  """
  if augment not in AUGMENTATIONS:
    raise ValueError(f"unknown augmentation {augment!r} (config.data.augment); expected one of {AUGMENTATIONS}")
  if isinstance(sampler, str):
    sampler = make_sampler(records, batch_size=batch_size, sampler=sampler, samples_per_class=samples_per_class,
                           seed=seed, steps_per_epoch=steps_per_epoch)
  elif sampler.batch_size != batch_size:
    raise ValueError(f"sampler batch size {sampler.batch_size} differs from batch_size {batch_size}")
  kwargs = dict(size=image_size, scale=tuple(scale), ratio=tuple(ratio), flip=flip, interpolation=interpolation,
                fast_decode=fast_decode, autoaugment_first=augment == "autoaugment")
  return TrainLoader(records, sampler, pretrained_cfg=pretrained_cfg, seed=seed, process_index=process_index,
                     process_count=process_count, num_threads=num_threads, num_workers=num_workers,
                     prefetch_batches=prefetch_batches, transform_kwargs=kwargs)


class _EvalElement:
  """Global position -> {'image', 'label', 'index', 'valid'}; positions past the records are padding."""

  def __init__(self, loader: EvalLoader):
    self.records, self.normalizer, self.kwargs = loader.records, loader.normalizer, loader.transform_kwargs
    self.global_batch, self.local_batch = loader.global_batch_size, loader.local_batch_size
    self.offset = loader.process_index * loader.local_batch_size
    self.size = loader.transform_kwargs["size"]

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    batch, column = divmod(int(position), self.local_batch)
    row = batch * self.global_batch + self.offset + column
    if row >= len(self.records):
      return {"image": np.zeros((self.size, self.size, 3), np.float32), "label": np.int32(-1),
              "index": np.int32(-1), "valid": np.bool_(False)}
    with self.records.open_image(row) as img:
      pixels = transforms.eval_transform(img, ref=self.records.paths[row], **self.kwargs)
    return {"image": self.normalizer(pixels), "label": np.int32(self.records.labels[row]),
            "index": np.int32(row), "valid": np.bool_(True)}


class EvalLoader:
  """Fixed-shape evaluation batches in record order; iterate as often as needed."""

  def __init__(self, records: Records, *, batch_size: int, pretrained_cfg: PretrainedCfg, process_index: int,
               process_count: int, num_threads: int, num_workers: int, prefetch_batches: int,
               transform_kwargs: dict[str, Any]):
    self.records = records
    self.global_batch_size = batch_size
    self.local_batch_size = _check_processes(batch_size, process_index, process_count)
    self.process_index, self.process_count = process_index, process_count
    self.num_threads, self.num_workers, self.prefetch_batches = num_threads, num_workers, prefetch_batches
    self.normalizer = transforms.Normalizer(pretrained_cfg)
    self.transform_kwargs = transform_kwargs

  def __len__(self) -> int:
    return math.ceil(len(self.records) / self.global_batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    it = iter(_pipeline(_EvalElement(self), 0, len(self), self.local_batch_size, self.num_threads,
                        self.num_workers, self.prefetch_batches))
    try:
      yield from it
    finally:
      close = getattr(it, "close", None)
      if close is not None:
        close()


def make_eval_loader(records: Records, *, batch_size: int, pretrained_cfg: PretrainedCfg, image_size: int = 224,
                     resize_size: int = 256, num_threads: int = 8, process_index: int = 0, process_count: int = 1,
                     interpolation: str = "bilinear", fast_decode: bool = False, num_workers: int = 0,
                     prefetch_batches: int = 2) -> EvalLoader:
  """Evaluation batches: Resize(resize_size) + CenterCrop(image_size) + normalisation, in record order.

  Yields {'image': float32 [B_local, S, S, 3], 'label': int32 [B_local], 'index': int32 [B_local] (row in
  `records`, -1 on padding), 'valid': bool [B_local]}; batch_size is global as in training, the last
  global batch is padded. fast_decode is off by default: pixels then match torchvision's
  Resize + CenterCrop.
  """
  kwargs = dict(size=image_size, resize_size=resize_size, interpolation=interpolation, fast_decode=fast_decode)
  return EvalLoader(records, batch_size=batch_size, pretrained_cfg=pretrained_cfg, process_index=process_index,
                    process_count=process_count, num_threads=num_threads, num_workers=num_workers,
                    prefetch_batches=prefetch_batches, transform_kwargs=kwargs)
