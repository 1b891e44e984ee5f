"""`fit(config, workdir)`: epochs of the one update step, method hooks, evaluation, checkpoints, logs.

Resuming: when `<workdir>/checkpoints` holds a committed checkpoint, `fit` continues from the newest intact
one (parameters, optimizer state per group, method state, host state, RNG, data-iterator position,
best-so-far), so a run stopped after an epoch, mid-epoch (checkpoint.every_steps), by SIGTERM / SIGINT or by
kill -9, and started again produces the same losses as one that never stopped (docs/reliability.md). What the
stopped run had logged or left unwritten after its newest commit is put right first (`_complete_commit`):
metrics.jsonl rewound to that commit, its evaluation rows and best embeddings written if a kill came before
them, an evaluation a signal postponed done; damaged steps are set aside and computed again.

Model selection: `eval.select_on = 'test'` keeps the checkpoint with the best `eval.select_metric` on
the TEST split, as the seed papers' code does (an optimistic protocol; the log says so). 'val' selects
on a validation split carved from the training classes (`dataset.val_fraction`), and reports the test
metrics of the selected epoch.

The engine names no method: everything a method adds (phases, samplers, host state, epoch hooks) comes
through `dml_jax.methods.base.Method`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import tqdm

from dml_jax import data as data_lib
from dml_jax import methods as methods_lib
from dml_jax import preprocessing
from dml_jax import pytree as tree_lib
from dml_jax.data.readers import folder as folder_lib
from dml_jax.errors import UserError
from dml_jax.eval import embed as embed_lib
from dml_jax.eval import protocols
from dml_jax.eval import saved as saved_lib
from dml_jax.methods.base import HostBatch
from dml_jax.preemption import PreemptionHandler
from dml_jax.train import checkpoint as ckpt_lib
from dml_jax.train import compile_options, distributed, logs, optim
from dml_jax.train import config as config_lib
from dml_jax.train import step as step_lib
from dml_jax.workdir_lock import LOCK_NAME, WorkdirLock


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss became NaN or Inf; training stopped, the last checkpoint on disk predates it."""


def _echo(text: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(text)


def _format_metrics(values: Mapping[str, float]) -> str:
  return ", ".join(f"{k} {100 * v:.2f}" for k, v in values.items())


@dataclasses.dataclass
class TrainContext:
  """What method hooks may use between epochs (see dml_jax/methods/base.py)."""

  config: Any
  mesh: jax.sharding.Mesh
  train_records: data_lib.Records
  steps_per_epoch: int
  log: Callable[[str], None]
  _trainer: Trainer

  def embed_records(self, state: dict, records: data_lib.Records, feature: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode features of `records` (eval transforms, all devices): (float32 [N, F], labels int64 [N]),
    in record order. feature: None = the evaluation embedding, else a key of `Method.feature_fns()`."""
    emb, labels, indices = self._trainer.embed(state, self._trainer.eval_loader(records), "embed", feature)
    order = np.argsort(indices, kind="stable")
    return emb[order], labels[order]

  def set_params(self, state: dict, values: Mapping[str, Any]) -> dict:
    """The train state with the parameters at these '/'-joined paths replaced (shapes may change); the
    groups holding them restart their optimizer state (as a re-created torch parameter group)."""
    return self._trainer.set_params(state, values)

  def reset_optimizer(self, state: dict, group_names: Iterable[str]) -> dict:
    """The train state with fresh optimizer states for the named groups (settings names)."""
    return self._trainer.reset_optimizer(state, group_names)

  def share(self, value: Any) -> Any:
    """Process 0's `value` (anything `json` writes) on every process: a host-side decision (a clustering) that
    every process must take alike, computed on each and taken from process 0 (`distributed.broadcast_json`)."""
    return distributed.broadcast_json(value)


def carve_validation(records: data_lib.Records, fraction: float, seed: int):
  """Splits training records by class: (train, validation), both relabelled 0..C-1.

  A seeded random `fraction` of the training classes (at least 2) becomes the validation split with role
  'test' (evaluated leave-one-out, like CUB/Cars/SOP).
  """
  classes = np.unique(records.labels)
  num_val = max(2, int(round(fraction * len(classes))))
  if num_val >= len(classes) - 1:
    raise ValueError(f"dataset.val_fraction={fraction} leaves {len(classes) - num_val} of {len(classes)} "
                     f"training classes for training; choose a smaller fraction")
  val_classes = np.random.default_rng([seed, 7]).choice(classes, size=num_val, replace=False)
  is_val = np.isin(records.labels, val_classes)
  train = records.subset(np.flatnonzero(~is_val), relabel=True)
  val = records.subset(np.flatnonzero(is_val), relabel=True)
  val.roles = np.full(len(val), "test")
  return train, val


def abstract_train_state(params: Any, method_state: Any, groups: optim.EpochGroups, meta: dict,
                         sharding: jax.sharding.Sharding) -> dict:
  """The shapes a checkpoint restores into: the run's structure (from the method's initial params and state
  and the epoch's groups) with the shapes the checkpoint saved (a method may change parameter shapes between
  epochs), placed with `sharding`."""
  saved = {p: (tuple(shape), np.dtype(dtype)) for p, (shape, dtype) in meta["array_shapes"].items()}
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
  template = step_lib.init_train_state(
      shapes, method_state, jax.eval_shape(lambda p: optim.init_group_states(groups, p), shapes),
      jax.random.key(0))
  flat = tree_lib.flatten(template)
  missing, unexpected = sorted(set(flat) - set(saved)), sorted(set(saved) - set(flat))
  if missing or unexpected:
    raise ckpt_lib.CheckpointError(
        f"the checkpoint was written by a different setup: arrays missing {missing[:6]}, unexpected "
        f"{unexpected[:6]}", "resume with the config the run started with, or use a new --workdir")
  return tree_lib.map_with_paths(lambda p, _: jax.ShapeDtypeStruct(saved[p][0], saved[p][1], sharding=sharding),
                                 template)


@dataclasses.dataclass
class TrainedRun:
  """A run's method with the parameters of one checkpoint, for embedding anything (retrieval, plots)."""

  config: Any
  method: methods_lib.Method
  params: dict
  method_state: dict
  step: int
  meta: dict

  def __post_init__(self):
    self._embed = jax.jit(self.method.embed_fn,
                          compiler_options=compile_options.compiler_options(jax.default_backend()))

  def embed(self, images: Any) -> jax.Array:
    """float32 images [B, S, S, 3] (prepared as `method.pretrained_cfg` says) -> embeddings float32 [B, E]."""
    return self._embed(self.params, self.method_state, images)


def load_trained(workdir: str | pathlib.Path, which: str = ckpt_lib.BEST, *,
                 echo: Callable[[str], None] = _echo) -> TrainedRun:
  """The method of the run in `workdir` with its 'best' (or 'last') intact checkpoint, without its dataset
  or its weights directory: the architecture, the number of classes and the preprocessing come from the
  checkpoint."""
  import ml_collections

  checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    if checkpoints.latest_step() is None:
      raise ckpt_lib.CheckpointError(f"no checkpoint in {checkpoints.root}",
                                     "pass the --workdir of a training run (python train.py --workdir ...)")
    if which == ckpt_lib.BEST and checkpoints.best is None:
      echo(f"{workdir}: no best checkpoint (no evaluation ran); using the last one")
      which = ckpt_lib.LAST
    meta = checkpoints.read_meta(checkpoints.latest_step(which))
    config = ml_collections.ConfigDict(meta["config"])
    config.model.weights = ""  # shapes only: the checkpoint holds every value
    method = methods_lib.build(config, num_classes=int(meta["num_classes"]))
    params, method_state = method.init(jax.random.key(0))
    method.pretrained_cfg = preprocessing.PretrainedCfg.from_json(meta["pretrained_cfg"])
    plan = optim.ParamPlan(config.optim, list(tree_lib.flatten(params)), selectors=method.param_selectors(params))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = checkpoints.restore(which, lambda m: abstract_train_state(
        params, method_state, plan.groups(m["phase_epoch"]), m, device), echo=echo)
  finally:
    checkpoints.close()
  return TrainedRun(config=config, method=method, params=restored.state["params"],
                    method_state=restored.state["method_state"], step=restored.step, meta=restored.meta)


@dataclasses.dataclass
class _Progress:
  """Where a run is: the epoch to run next, the best selection so far, a mid-epoch data position."""

  epoch: int = 0
  best: dict | None = None
  data_state: dict | None = None


class Trainer:
  """Builds everything `fit` needs from a config; `run()` trains, `evaluate_checkpoint()` evaluates."""

  def __init__(self, config: Any, workdir: str | pathlib.Path, *, for_training: bool = True):
    """Validates everything (config, dataset, method, weights, evaluation images) before it creates anything
    in `workdir`, then takes the workdir's lock (one run per workdir, docs/reliability.md)."""
    self.mesh = step_lib.make_mesh()
    config_lib.check_config(config, num_devices=self.mesh.size)
    self.config = config
    self.workdir = pathlib.Path(workdir)
    if not for_training and not ckpt_lib.has_committed_step(self.workdir):  # before any work, creating nothing
      if jax.process_index() == 0 and (self.workdir / LOCK_NAME).exists():
        # A training run that has not committed yet holds it: say that (WorkdirLockedError), not 'no checkpoint'.
        WorkdirLock(self.workdir, echo=_echo).acquire().release()
      raise ckpt_lib.CheckpointError(f"no checkpoint under {self.workdir.absolute() / 'checkpoints'}",
                                     "train first (the same --workdir), or pass the --workdir of a training run")
    self.is_main = jax.process_index() == 0
    self._lock = None
    self._load_data()
    self._build_method()
    self.train_loader = self._train_loader(self.default_sampler)
    self._eval_loaders = {name: self.eval_loader(recs) for name, recs in self.eval_splits.items()}
    self._check_evaluation(for_training)
    self._take_lock()
    try:
      self.checkpoints = ckpt_lib.Checkpoints(self.workdir, keep_last=config.checkpoint.keep_last,
                                              keep_best=config.checkpoint.keep_best)
      self.logger = logs.MetricLogger(self.workdir, tensorboard=config.log.tensorboard, enabled=self.is_main)
    except BaseException:
      self._release_lock()
      raise
    self.ctx = TrainContext(config=config, mesh=self.mesh, train_records=self.train_records,
                            steps_per_epoch=len(self.train_loader), log=_echo, _trainer=self)

  def _take_lock(self) -> None:
    """Process 0 takes the workdir's lock for the whole group (the processes share the workdir); the others
    wait for its outcome, so that a workdir in use stops every process with the same error (rather than
    leaving the others stalled at their first barrier) and none reads the checkpoints before the lock is held."""
    failure = None
    if self.is_main:
      self._lock = WorkdirLock(self.workdir, echo=_echo)
      try:
        self._lock.acquire()
      except Exception as e:  # noqa: BLE001 (re-raised below, after the other processes learnt of it)
        self._lock, failure = None, e
    if jax.process_count() > 1:
      shared = distributed.broadcast_json(None if failure is None else (
          [failure.message, failure.hint] if isinstance(failure, UserError) else
          [f"process 0 could not lock the workdir ({type(failure).__name__}: {failure})", None]))
      if shared is not None and failure is None:
        raise UserError(shared[0], shared[1])
    if failure is not None:
      raise failure

  def _check_evaluation(self, for_training: bool) -> None:
    """Mistakes that would otherwise stop the run at its first evaluation or in the middle of an epoch, after
    work was done: the metric names and options, the selection metric, and every image of every split
    (decoded at 1/8 scale; the training split when training)."""
    c = self.config
    if for_training and not c.dataset.skip_corrupt:
      data_lib.require_decodable(self.dataset_name, self.train_records, "train", num_threads=c.data.num_threads)
    for split in self.eval_splits:
      protocol, options = (self.val_protocol, {**dict(c.eval.options), **self.val_options}) if split == "val" else (
          self.protocol, dict(c.eval.options))
      select = c.eval.select_metric if for_training and split == c.eval.select_on and c.eval.every_epochs else None
      protocols.check_metrics(protocol, list(c.eval.metrics), select, **options)
      if not c.dataset.skip_corrupt:
        data_lib.require_decodable(self.dataset_name, self.eval_splits[split], split, num_threads=c.data.num_threads)

  # -- construction ---------------------------------------------------------------------------------

  def _load_data(self) -> None:
    c, ds = self.config, self.config.dataset
    # Your own `folder` dataset: the split recorded in the workdir by an earlier start wins over the config.
    folder_split = folder_lib.split_for_run(ds.folder, self.workdir) if ds.name == "folder" else None
    splits = data_lib.load_dataset(ds.name, ds.data_root or None, source=ds.source, skip_corrupt=ds.skip_corrupt,
                                   vehicleid_test_size=ds.vehicleid_test_size, num_threads=c.data.num_threads,
                                   folder_split=folder_split)
    self.split_manifest = splits.split_manifest
    self.dataset_name = splits.name
    self.protocol = c.eval.protocol or ds.name
    test_protocol = protocols.get_protocol(self.protocol)  # fail now, not after an epoch
    # The validation split is same-source (leave-one-out) even when the test split is query/gallery.
    self.val_protocol = "cub200" if test_protocol.query_gallery else self.protocol
    self.val_options = {"recall_ks": test_protocol.recall_ks} if test_protocol.query_gallery else {}
    train_records = splits.train
    self.eval_splits: dict[str, Any] = {"test": splits.eval}
    if ds.val_fraction > 0:
      train_records, val_records = carve_validation(train_records, float(ds.val_fraction), c.seed)
      self.eval_splits = {"val": val_records, "test": splits.eval}
    self.train_records = train_records

  def _build_method(self) -> None:
    c = self.config
    self.method = methods_lib.build(c, num_classes=self.train_records.num_classes)
    init_rng, self.train_rng = jax.random.split(jax.random.key(c.seed))
    params, method_state = self.method.init(init_rng)
    self.param_keys = tree_lib.key_index(params)
    self.plan = optim.ParamPlan(c.optim, list(self.param_keys), selectors=self.method.param_selectors(params))
    self.initial_params, self._init_method_state = params, method_state
    self.host = self.method.host_state()
    self.steps = step_lib.StepCache(self.method, self.mesh, self.param_keys)
    self.repl = step_lib.replicated(self.mesh)
    d = c.data
    self.default_sampler = data_lib.make_sampler(
        self.train_records, batch_size=d.batch_size, sampler=d.sampler, samples_per_class=d.samples_per_class,
        seed=c.seed, steps_per_epoch=d.steps_per_epoch or None)

  def _train_loader(self, sampler: data_lib.BatchSampler) -> data_lib.TrainLoader:
    c, d = self.config, self.config.data
    return data_lib.make_train_loader(
        self.train_records, batch_size=d.batch_size, pretrained_cfg=self.method.pretrained_cfg,
        image_size=c.dataset.image_size, sampler=sampler, seed=c.seed, num_threads=d.num_threads,
        process_index=jax.process_index(), process_count=jax.process_count(), scale=tuple(d.scale),
        ratio=tuple(d.ratio), flip=d.flip, interpolation=d.interpolation, num_workers=d.num_workers,
        augment=d.augment)

  def eval_loader(self, records: data_lib.Records) -> data_lib.EvalLoader:
    c = self.config
    return data_lib.make_eval_loader(
        records, batch_size=c.data.eval_batch_size, pretrained_cfg=self.method.pretrained_cfg,
        image_size=c.dataset.image_size, resize_size=c.dataset.resize_size, num_threads=c.data.num_threads,
        interpolation=c.data.interpolation, process_index=jax.process_index(),
        process_count=jax.process_count())

  # -- train state ----------------------------------------------------------------------------------

  def _fresh_state(self, groups: optim.EpochGroups) -> dict:
    opt_state = optim.init_group_states(groups, self.initial_params)
    state = step_lib.init_train_state(self.initial_params, self._init_method_state, opt_state, self.train_rng)
    return jax.device_put(state, self.repl)

  def _abstract_state(self, groups: optim.EpochGroups, meta: dict) -> dict:
    return abstract_train_state(self.initial_params, self._init_method_state, groups, meta, self.repl)

  def set_params(self, state: dict, values: Mapping[str, Any]) -> dict:
    unknown = sorted(set(values) - set(self.param_keys))
    if unknown:
      raise KeyError(f"set_params: unknown parameter paths {unknown}; paths look like {list(self.param_keys)[:4]}")
    flat = {**tree_lib.flatten(state["params"]), **{p: jax.numpy.asarray(v) for p, v in values.items()}}
    params = jax.device_put(tree_lib.nest(flat, self.param_keys), self.repl)
    labels = {label for label, _, paths in self.groups.groups if set(paths) & set(values)}
    opt_state = optim.init_group_states(self.groups, params, state["opt_state"], self.groups, fresh=labels)
    return {**state, "params": params, "opt_state": jax.device_put(opt_state, self.repl)}

  def reset_optimizer(self, state: dict, group_names: Iterable[str]) -> dict:
    labels = set(self.groups.labels_of(tuple(group_names)))
    opt_state = optim.init_group_states(self.groups, state["params"], state["opt_state"], self.groups, fresh=labels)
    return {**state, "opt_state": jax.device_put(opt_state, self.repl)}

  def _start(self) -> tuple[dict, _Progress]:
    """A fresh train state, or the newest intact checkpoint's (with the host state restored)."""
    if self.split_manifest is not None and self.is_main:
      data_lib.write_split_manifest(self.workdir / folder_lib.SPLIT_FILE, self.split_manifest)
    if self.checkpoints.latest_step() is None:
      self.groups = self.plan.groups(0)
      self.logger.rewind(None)  # records of an earlier start that never committed a step
      self.logger.write("config", step=0, epoch=0, config=json.loads(self.config.to_json_best_effort()))
      return self._fresh_state(self.groups), _Progress()
    restored = self._restore(ckpt_lib.LAST, repair=True)
    meta = restored.meta
    self._log_config_differences(meta["config"])
    progress = _Progress(epoch=meta["epoch"], best=meta["best"], data_state=meta["data_state"])
    _echo(f"resumed from {self.checkpoints.step_path(restored.step)}: epoch {progress.epoch}, step {restored.step}"
          + (f", batch {progress.data_state['step']} of the epoch" if progress.data_state else ""))
    self._complete_commit(restored, progress)
    return restored.state, progress

  def _complete_commit(self, restored: ckpt_lib.Restored, progress: _Progress) -> None:
    """The log and the files a commit describes, as an uninterrupted run leaves them: metrics.jsonl rewound
    to the resumed step (records of later steps are computed again, docs/reliability.md); the evaluation
    rows of that step's epoch and the best test embeddings when a kill came between the commit and them;
    the evaluation a signal postponed (then the step becomes 'best' by a manifest commit if it is)."""
    step, meta = restored.step, restored.meta
    kept = self.logger.rewind(step)
    self.logger.write("event", step=step, epoch=meta["epoch"], event="resumed",
                      damaged=[entry.split(": ", 1)[0] for entry in restored.skipped])
    evaluation = meta.get("evaluation")
    if evaluation is not None:
      epoch = meta["phase_epoch"]
      if evaluation.get("pending"):
        rows = self._evaluate_epoch(restored.state, epoch, [])
        if self._select(rows, epoch, step, progress):
          self.checkpoints.mark_best(step, self._best_entry(progress))
          self._save_best_embeddings(epoch, step)
      else:
        rows = evaluation["rows"]
      logged = {r.get("split") for r in kept if r.get("kind") == "eval" and r.get("step") == step
                and r.get("epoch") == epoch and "checkpoint" not in r}
      missing = {split: res for split, res in rows.items() if split not in logged}
      if missing:
        self._log_evaluation(missing, epoch, step)
    best = self.checkpoints.best
    # Every process decides (the workdir is shared) and embeds: embedding is collective on several hosts.
    if best is not None and int(best["step"]) == step and "test" in self.eval_splits:
      path = saved_lib.best_test_path(self.workdir)
      try:
        saved_step = saved_lib.load_embeddings(path).step
      except (OSError, ValueError):
        saved_step = None
      if saved_step != step:  # killed after committing a new best, before writing its embeddings
        _echo(f"writing the test embeddings of the best checkpoint (step {step}) again: {path}")
        self.evaluate(restored.state, "test")
        self._save_best_embeddings(int(best["epoch"]), step)

  def _restore(self, which: str, *, repair: bool = False) -> ckpt_lib.Restored:
    """The newest intact checkpoint of `which` (verified; damaged steps are named and passed over, and set
    aside with `repair`), with self.groups set to its epoch's and the host state loaded."""
    def make_abstract(meta):
      self.groups = self.plan.groups(meta["phase_epoch"])
      return self._abstract_state(self.groups, meta)

    restored = self.checkpoints.restore(which, make_abstract, echo=_echo, repair=repair)
    self.groups = self.plan.groups(restored.meta["phase_epoch"])
    if self.host is not None:
      if restored.host is None:
        raise ckpt_lib.CheckpointError(f"{self.checkpoints.step_path(restored.step)} holds no host state, which "
                                       f"{self.method.name} keeps", "use a new --workdir for this config")
      self.host.load_state_dict(restored.host)
    return restored

  def _save(self, state: dict, progress: _Progress, *, step: int, phase_epoch: int, best_too: bool = False,
            evaluation: dict | None = None) -> None:
    """Commits step `step`; `evaluation` ({split: metrics} of this epoch, or {'pending': True} when a signal
    came first) rides in the meta, so that a resume can log it when a kill came between the commit and its log
    rows (or evaluate first)."""
    meta = {"epoch": progress.epoch, "phase_epoch": phase_epoch, "step": step, "data_state": progress.data_state,
            "best": progress.best, "select_on": self.config.eval.select_on,
            "select_metric": self.config.eval.select_metric, "num_classes": self.train_records.num_classes,
            "pretrained_cfg": self.method.pretrained_cfg.to_json(),
            "evaluation": None if evaluation is None else (
                evaluation if evaluation.get("pending") else {"epoch": phase_epoch, "rows": evaluation}),
            "config": json.loads(self.config.to_json_best_effort())}
    host = self.host.state_dict() if self.host is not None else None
    best = self._best_entry(progress) if best_too and progress.best is not None else None
    self.checkpoints.save(step, state, meta, host=host, best=best)

  @staticmethod
  def _best_entry(progress: _Progress) -> dict:
    """What the manifest says of the best step."""
    return {k: progress.best[k] for k in ("metric", "value", "epoch", "split")}

  def _log_config_differences(self, saved: dict) -> None:
    now = json.loads(self.config.to_json_best_effort())
    diffs = []

    def walk(a, b, prefix):
      if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
          walk(a.get(k), b.get(k), f"{prefix}{k}.")
      elif a != b:
        diffs.append(f"{prefix[:-1]}: checkpoint {a!r} -> now {b!r}")

    walk(saved, now, "")
    if diffs:
      _echo("resuming with a config that differs from the checkpoint's:\n  " + "\n  ".join(diffs))

  # -- evaluation -----------------------------------------------------------------------------------

  def embed(self, state: dict, loader, desc: str, feature: str | None = None):
    fn = functools.partial(self.steps.embed, state["params"], state["method_state"], feature=feature)
    return embed_lib.embed_dataset(fn, loader, mesh=self.mesh, desc=desc,
                                   progress=self.config.log.progress and self.is_main)

  def evaluate(self, state: dict, split: str) -> dict[str, float]:
    records = self.eval_splits[split]
    emb, labels, indices = self.embed(state, self._eval_loaders[split], f"embed {split}")
    if split == "test":
      self._last_test = (emb, labels, indices)  # saved with the best checkpoint (plots, retrieval)
    c = self.config.eval
    protocol, options = (self.val_protocol, {**dict(c.options), **self.val_options}) if split == "val" else (
        self.protocol, dict(c.options))
    # Computed once, on process 0, and shared: every process must select the same best checkpoint
    # (distributed.broadcast_json). Every process holds all embeddings (embed_dataset gathers them).
    values = None
    if self.is_main:
      values = protocols.evaluate(protocol, emb, labels, records.roles[indices], metrics=list(c.metrics), **options)
      values = {k: float(v) for k, v in values.items()}
    return distributed.broadcast_json(values)

  def evaluate_checkpoint(self, which: str = ckpt_lib.BEST) -> dict[str, dict[str, float]]:
    if self.checkpoints.latest_step() is None:
      raise ckpt_lib.CheckpointError(f"no checkpoint under {self.checkpoints.root}", "train first (the same --workdir)")
    if which == ckpt_lib.BEST and self.checkpoints.best is None:
      _echo("no best checkpoint (no evaluation ran during training); evaluating the last one")
      which = ckpt_lib.LAST
    restored = self._restore(which)
    meta, step = restored.meta, restored.step
    best = self.checkpoints.best
    data = meta.get("data_state")
    where = (f"epoch {meta['epoch']}, batch {data['step']} of {data['steps_per_epoch']}" if data
             else f"after epoch {meta['epoch'] - 1}")
    what = (f"the best checkpoint (step {step}, after epoch {best['epoch']}: {best['metric']} "
            f"{100 * best['value']:.2f} on {best['split']})" if which == ckpt_lib.BEST and best and best["step"] == step
            else f"the checkpoint of step {step} ({where})")
    if restored.skipped:
      damaged = ", ".join(pathlib.Path(entry.split(": ", 1)[0]).name for entry in restored.skipped)
      what += f" instead of the {which} one: step(s) {damaged} damaged, see above"
    _echo(f"evaluating {what}: {self.checkpoints.step_path(step)}")
    results = {}
    for split in self.eval_splits:
      results[split] = self.evaluate(restored.state, split)
      extra = {"damaged": [entry.split(": ", 1)[0] for entry in restored.skipped]} if restored.skipped else {}
      self.logger.write("eval", step=step, epoch=meta["epoch"], split=split, checkpoint=which, **extra,
                        **results[split])
      _echo(f"{which} checkpoint (step {step}) on {split}: " + _format_metrics(results[split]))
    return results

  def _evaluate_epoch(self, state: dict, epoch: int, history: list[dict]) -> dict[str, dict[str, float]]:
    """Evaluates every split; the 'eval' log rows are written by `_log_evaluation`, after the checkpoint
    they describe is committed (a kill in between never leaves logs naming an uncommitted step)."""
    row = {}
    for split in self.eval_splits:
      res = self.evaluate(state, split)
      history.append({"epoch": epoch if epoch >= 0 else "before", "split": split, **res})
      row[split] = res
      _echo((f"epoch {epoch} {split}: " if epoch >= 0 else f"before training, {split}: ") + _format_metrics(res))
    return row

  def _log_evaluation(self, row: dict[str, dict[str, float]], epoch: int, step: int) -> None:
    for split, res in row.items():
      self.logger.write("eval", step=step, epoch=epoch, split=split, **res)

  def _save_best_embeddings(self, epoch: int, step: int) -> None:
    """The test split's embeddings under the new best checkpoint, for `python -m dml_jax.plot`."""
    if not self.is_main or getattr(self, "_last_test", None) is None:
      return
    emb, labels, indices = self._last_test
    records = self.eval_splits["test"]
    saved_lib.save_embeddings(saved_lib.best_test_path(self.workdir), emb, labels, records.paths[indices],
                              records.roles[indices], protocol=self.protocol, class_names=records.class_names,
                              split="test", step=step, epoch=epoch)

  def _select(self, row: dict[str, dict[str, float]], epoch: int, step: int, progress: _Progress) -> bool:
    """Updates the best-so-far with this epoch's evaluation; True when this epoch is the new best."""
    split, metric = self.config.eval.select_on, self.config.eval.select_metric
    if metric not in row[split]:
      raise KeyError(f"eval.select_metric {metric!r} is not among the evaluated metrics {sorted(row[split])}; "
                     f"add it to eval.metrics")
    value = float(row[split][metric])
    if progress.best is not None and value <= progress.best["value"]:
      return False
    progress.best = {"value": value, "epoch": epoch, "step": step, "split": split, "metric": metric,
                     "test": row["test"]}
    return True

  def _evaluates_after(self, epoch: int) -> bool:
    c = self.config.eval
    last = epoch + 1 == self.config.num_epochs
    return bool(c.every_epochs) and (last or (epoch >= c.start_epoch and (epoch + 1) % c.every_epochs == 0))

  # -- training -------------------------------------------------------------------------------------

  def run(self) -> dict:
    """Trains to config.num_epochs (resuming from the workdir's checkpoint); SIGTERM / SIGINT finish the step,
    save and raise `Preempted` (exit status 143 / 130 on the command line)."""
    self._stop = PreemptionHandler()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
      return self._run()
    with self._stop:
      return self._run()

  def _run(self) -> dict:
    c = self.config
    t_start = time.perf_counter()
    self._announce_selection()
    fresh = self.checkpoints.latest_step() is None
    state, progress = self._start()
    _echo(f"{self.method.name} on {self.dataset_name}: {len(self.train_records)} training images, "
          f"{self.train_records.num_classes} classes, {len(self.train_loader)} steps/epoch of {c.data.batch_size} "
          f"images on {self.mesh.size} device(s) ({jax.devices()[0].platform})\n"
          + self.plan.describe(tree_lib.flatten(self.initial_params)) + "\n" + self._parameter_counts())
    history = [] if fresh else self._previous_evaluations(progress.epoch)
    if fresh and c.eval.before_training:
      self._log_evaluation(self._evaluate_epoch(state, -1, history), -1, 0)

    images_seen, train_time = 0, 0.0
    for epoch in range(progress.epoch, c.num_epochs):
      state = self._begin_epoch(epoch, state, mid_epoch=progress.data_state is not None)
      iterator = self.train_loader.epoch(epoch, state=progress.data_state)
      progress.data_state = None
      state, seen, seconds = self._train_epoch(epoch, state, iterator, progress)
      images_seen, train_time = images_seen + seen, train_time + seconds
      state = self.method.on_epoch_end(epoch, state, self.ctx)
      step = int(state["step"])
      if self._stop_requested() and self._evaluates_after(epoch):
        # Stop now rather than after the evaluation, which may outlast a preemption's grace period: the
        # checkpoint says that its evaluation is pending, and the resumed run does it first, on this state.
        progress.epoch = epoch + 1
        self._save(state, progress, step=step, phase_epoch=epoch, evaluation={"pending": True})
        raise self._stop.stopped(f"after epoch {epoch} (step {step}), before its evaluation (the resumed run "
                                 f"does it first); checkpoint saved in {self.checkpoints.step_path(step)}")
      is_best, row = False, None
      if self._evaluates_after(epoch):
        row = self._evaluate_epoch(state, epoch, history)
        is_best = self._select(row, epoch, step, progress)
      progress.epoch = epoch + 1
      self._save(state, progress, step=step, phase_epoch=epoch, best_too=is_best, evaluation=row)
      if row is not None:
        self._log_evaluation(row, epoch, step)
      if is_best:
        self._save_best_embeddings(epoch, step)
      if self._stop_requested():
        raise self._stop.stopped(f"after epoch {epoch} (step {step}); checkpoint saved in "
                                 f"{self.checkpoints.step_path(step)}")

    summary = self._summary(history, progress.best, time.perf_counter() - t_start, images_seen, train_time)
    self.close()
    self._plot()
    return summary

  def _plot(self) -> None:
    """The run's pictures (<workdir>/plots/*.png); a plotting failure never fails a finished run."""
    if not (self.is_main and self.config.log.plots):
      return
    try:
      from dml_jax import plot as plot_lib  # matplotlib only when drawing

      written = plot_lib.plot_run(self.workdir)
      _echo("plots: " + ", ".join(str(p) for p in written))
    except Exception as e:  # noqa: BLE001 (a finished run's checkpoints matter more than its pictures)
      _echo(f"warning: the run's plots could not be drawn ({type(e).__name__}: {e}); "
            f"python -m dml_jax.plot --workdir {self.workdir} retries")

  def _announce_selection(self) -> None:
    split, metric = self.config.eval.select_on, self.config.eval.select_metric
    if split == "test":
      _echo(f"model selection: best {metric} on the TEST split, as the seed papers' code does "
            f"(optimistic; set eval.select_on='val' with dataset.val_fraction > 0 for a held-out choice)")
    else:
      _echo(f"model selection: best {metric} on a validation split of {self.eval_splits['val'].num_classes} "
            f"held-out training classes")

  def _begin_epoch(self, epoch: int, state: dict, *, mid_epoch: bool) -> dict:
    """New trainable groups where the plan changes, the method's epoch-start hook, the epoch's sampler."""
    groups = self.plan.groups(epoch)
    if groups != self.groups:
      opt_state = optim.init_group_states(groups, state["params"], state["opt_state"], self.groups)
      state = {**state, "opt_state": jax.device_put(opt_state, self.repl)}
      fresh = sorted(set(groups.labels) - set(self.groups.labels))
      _echo(f"epoch {epoch}: trainable set changes; new optimizer groups (fresh state): {fresh}")
      self.groups = groups
    if not mid_epoch:  # a mid-epoch checkpoint already holds the hook's effects
      state = self.method.on_epoch_start(epoch, state, self.ctx)
    sampler = self.method.train_sampler(epoch, state, self.ctx) or self.default_sampler
    if sampler is not self.train_loader.sampler:
      self.train_loader = self._train_loader(sampler)
    return state

  def _train_epoch(self, epoch: int, state: dict, iterator: data_lib.TrainEpochIterator, progress: _Progress):
    c = self.config
    update = self.steps.update_fn(self.groups, epoch)
    lrs, epoch_arg = step_lib.learning_rate_args(self.groups, epoch)
    log = _StepLog(self, epoch, lrs, total=len(self.train_loader), initial=iterator.step)
    seen, t_epoch = 0, time.perf_counter()
    first_step = int(state["step"])
    for number, batch in enumerate(iterator):
      step = first_step + number
      host_batch = self._host_batch(iterator)
      if self.host is not None:
        state = self.host.before_step(state, host_batch)
      state, metrics = update(state, step_lib.shard_batch(batch, self.mesh), lrs, epoch_arg)
      if self.host is not None:
        self.host.after_step(state, host_batch)  # may wait for the step: the next batch may reuse rows
      seen += c.data.batch_size
      log.add(step, metrics, c.data.batch_size)
      every = c.checkpoint.every_steps
      # A signal during the epoch's last step is handled at the epoch's end (`_run`), after the epoch-end hook.
      preempted = self._stop_requested(step) and iterator.step < len(self.train_loader)
      if (every and (step + 1) % every == 0 and iterator.step < len(self.train_loader)) or preempted:
        log.flush()  # never save a state that follows a non-finite loss
        mid = _Progress(epoch=epoch, best=progress.best, data_state=iterator.get_state())
        self._save(state, mid, step=step + 1, phase_epoch=epoch)
        if preempted:
          iterator.close()
          log.close()
          raise self._stop.stopped(f"after step {step + 1} (epoch {epoch}, batch {iterator.step} of "
                                   f"{len(self.train_loader)}); checkpoint saved in "
                                   f"{self.checkpoints.step_path(step + 1)}")
    log.close()
    seconds = time.perf_counter() - t_epoch
    _echo(f"epoch {epoch}: {seen} images in {seconds:.1f} s ({seen / max(seconds, 1e-9):.1f} images/s), "
          f"learning rates: " + ", ".join(f"{k} {float(v):.3g}" for k, v in lrs.items()))
    return state, seen, seconds

  def _stop_requested(self, step: int | None = None) -> bool:
    """Whether a SIGTERM / SIGINT asks to save and stop, after update `step` (None: at an epoch end).

    With several processes every one must stop after the same step (a save is a collective), while the
    signal may reach the hosts a step apart: the processes share their flags every log.every_steps steps
    and at epoch ends (one small all-gather each time), and stop when any was signalled.
    """
    if jax.process_count() == 1:
      return self._stop.requested
    if step is not None and (step + 1) % self.config.log.every_steps:
      return False
    return distributed.any_process(self._stop.requested)

  def _host_batch(self, iterator: data_lib.TrainEpochIterator) -> HostBatch:
    rows = iterator.global_indices(iterator.step - 1)
    return HostBatch(label=self.train_records.labels[rows], index=rows)

  # -- reporting ------------------------------------------------------------------------------------

  def _parameter_counts(self) -> str:
    """'trainable of total' parameters at the start, as parameter-efficient papers count them: host
    tables count with their full size (their per-batch device buffers are not counted again)."""
    flat = tree_lib.flatten(self.initial_params)
    host = self.host.parameter_counts() if self.host is not None else {}
    groups = self.plan.groups(0)

    def size(path):
      return host.get(path, int(np.size(flat[path])))

    total = sum(size(p) for p in flat)
    trainable = sum(size(p) for p in groups.trainable)
    line = (f"parameters: {trainable:,} trainable ({trainable / 1e6:.2f}M, {100 * trainable / max(total, 1):.2f}%) "
            f"of {total:,} ({total / 1e6:.2f}M)")
    if host:
      line += f"; {sum(host.values()):,} of them in host memory (only the batch's rows go to the device)"
    return line

  def _previous_evaluations(self, before_epoch: int) -> list[dict]:
    """Evaluation rows of the epochs before a resume, read back from metrics.jsonl (for the summary)."""
    path = self.workdir / logs.METRICS_FILE
    if not path.exists():
      return []
    rows = {}
    for line in path.read_text().splitlines():
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short when the previous run was killed
      if r.get("kind") == "eval" and "checkpoint" not in r and r["epoch"] < before_epoch:
        values = {k: v for k, v in r.items() if k not in ("kind", "step", "epoch", "time", "split")}
        rows[(r["epoch"], r["split"])] = {"epoch": "before" if r["epoch"] < 0 else r["epoch"], "split": r["split"],
                                          **values}
    return [rows[k] for k in sorted(rows)]

  def _summary(self, history, best, wall, images_seen, train_time) -> dict:
    c = self.config
    metric_names = []
    for row in history:
      metric_names += [k for k in row if k not in ("epoch", "split") and k not in metric_names]
    lines = ["", "summary", logs.format_table(history, ["epoch", "split"] + metric_names)]
    if best is not None:
      lines.append(f"best {best['metric']} on {best['split']}: {100 * best['value']:.2f} at epoch {best['epoch']}"
                   + (" (selected on the TEST split, as the seed papers do)" if best["split"] == "test" else "")
                   + "; test then: " + _format_metrics(best["test"]))
    rate = images_seen / max(train_time, 1e-9)
    lines.append(f"wall time {wall:.1f} s; training {train_time:.1f} s at {rate:.1f} images/s; "
                 f"workdir {self.workdir}")
    _echo("\n".join(lines))
    summary = {"best": best, "history": history, "wall_s": wall, "train_s": train_time, "images_per_s": rate}
    self.logger.write("summary", step=best["step"] if best else 0, epoch=c.num_epochs, **summary)
    return summary

  def close(self) -> None:
    if getattr(self, "_closed", False):
      return
    self._closed = True
    try:
      self.checkpoints.close()
      self.logger.close()
    finally:
      self._release_lock()

  def _release_lock(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None


class _StepLog:
  """Per-step metrics kept on the device until `log.every_steps` accumulate, then logged in one transfer;
  the progress bar; the non-finite-loss guard (checked whenever metrics reach the host)."""

  def __init__(self, trainer: Trainer, epoch: int, lrs: Mapping[str, Any], *, total: int, initial: int):
    self.trainer, self.epoch = trainer, epoch
    self.pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet pulled to the host
    self.lr_log = {f"lr/{label}": float(v) for label, v in lrs.items()}
    self.t_log, self.images = time.perf_counter(), 0
    c = trainer.config
    self.every = c.log.every_steps
    self.bar = tqdm.tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True,
                         disable=not (c.log.progress and trainer.is_main), leave=False)

  def add(self, step: int, metrics: dict, images: int) -> None:
    self.pending.append((step, metrics))
    self.images += images
    self.bar.update(1)
    if len(self.pending) >= self.every:
      self.flush()

  def flush(self) -> None:
    if not self.pending:
      return
    host = jax.device_get([m for _, m in self.pending])
    for (step, _), m in zip(self.pending, host):
      if m["nonfinite"]:
        self._raise_nonfinite(step, m)
    now = time.perf_counter()
    rate = self.images / max(now - self.t_log, 1e-9)
    losses = [float(m["loss"]) for m in host]
    extra = {k: float(np.mean([m[k] for m in host])) for k in host[-1] if k not in ("loss", "nonfinite")}
    self.trainer.logger.write("train", step=self.pending[-1][0] + 1, epoch=self.epoch, loss=float(np.mean(losses)),
                              images_per_s=rate, **extra, **self.lr_log)
    self.bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{rate:.1f}")
    self.pending.clear()
    self.t_log, self.images = now, 0

  def _raise_nonfinite(self, step: int, m: dict) -> None:
    checkpoints = self.trainer.checkpoints
    last = checkpoints.newest_intact_step()
    where = (f"the last good checkpoint is step {last} ({checkpoints.step_path(last)}); resuming repeats the "
             f"same steps, so change the config (e.g. a lower --config.optim.lr) or the data first"
             if last is not None else "no checkpoint was written before it")
    self.trainer.logger.write("event", step=step, epoch=self.epoch, error="nonfinite_loss", loss=float(m["loss"]))
    raise NonFiniteLossError(f"loss is {float(m['loss'])} at step {step} (epoch {self.epoch}); training stopped, "
                             f"{where}")

  def close(self) -> None:
    self.flush()
    self.bar.close()


def fit(config: Any, workdir: str | pathlib.Path) -> dict:
  """Trains (or resumes) `config` in `workdir`; returns the summary dict (history, best, timings)."""
  trainer = Trainer(config, workdir)
  try:
    return trainer.run()
  finally:
    trainer.close()


def evaluate_only(config: Any, workdir: str | pathlib.Path, which: str = ckpt_lib.BEST) -> dict:
  """Evaluates the 'best' (or 'last') checkpoint of `workdir` on every evaluation split."""
  trainer = Trainer(config, workdir, for_training=False)
  try:
    return trainer.evaluate_checkpoint(which)
  finally:
    trainer.close()
