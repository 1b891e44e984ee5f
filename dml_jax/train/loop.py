"""`fit(config, workdir)`: epochs of the one update step, method hooks, evaluation, checkpoints, logs.

Resuming: when `<workdir>/checkpoints/last` holds a checkpoint, `fit` continues from it (parameters,
optimizer state per group, method state, RNG, data-iterator position, best-so-far), so a run stopped
after an epoch and started again produces the same losses as one that never stopped.

Model selection: `eval.select_on = 'test'` keeps the checkpoint with the best `eval.select_metric` on
the TEST split, as the seed papers' code does (an optimistic protocol; the log says so). 'val' selects
on a validation split carved from the training classes (`dataset.val_fraction`), and reports the test
metrics of the selected epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np
import tqdm

from dml_jax import data as data_lib
from dml_jax import methods as methods_lib
from dml_jax.eval import embed as embed_lib
from dml_jax.eval import protocols
from dml_jax.train import checkpoint as ckpt_lib
from dml_jax.train import logs
from dml_jax.train import optim
from dml_jax.train import row_sparse
from dml_jax.train import step as step_lib
from dml_jax.train import tree as tree_lib


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; training stopped, the last checkpoint on disk predates it."""


@dataclasses.dataclass
class TrainContext:
  """What method hooks may use between epochs (see dml_jax/methods/__init__.py)."""

  config: Any
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  embed_records: Callable[[dict, Any], tuple[np.ndarray, np.ndarray]]
  log: Callable[[str], None]


def _echo(text: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(text)


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


def _check_config(config: Any, num_devices: int) -> None:
  for key in ("batch_size", "eval_batch_size"):
    value = config.data[key]
    if value < 1 or value % num_devices:
      raise ValueError(f"config.data.{key}={value} must be a positive multiple of the {num_devices} devices")
  if config.eval.select_on not in ("test", "val"):
    raise ValueError(f"config.eval.select_on must be 'test' or 'val', got {config.eval.select_on!r}")
  if config.eval.select_on == "val" and not config.dataset.val_fraction > 0:
    raise ValueError("config.eval.select_on='val' needs config.dataset.val_fraction > 0 (the held-out share of "
                     "the training classes)")
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.compute_dtype must be 'float32' or 'bfloat16', got {config.compute_dtype!r}")


class Trainer:
  """Builds everything `fit` needs from a config; `run()` trains, `evaluate_checkpoint()` evaluates."""

  def __init__(self, config: Any, workdir: str | pathlib.Path):
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.mesh = step_lib.make_mesh()
    _check_config(config, self.mesh.size)
    self.is_main = jax.process_index() == 0
    ds = config.dataset
    splits = data_lib.load_dataset(ds.name, ds.data_root or None, source=ds.source, skip_corrupt=ds.skip_corrupt,
                                   num_threads=config.data.num_threads)
    self.dataset_name = splits.name
    self.protocol = config.eval.protocol or ds.name
    test_protocol = protocols.get_protocol(self.protocol)  # fail now, not after an epoch
    # The validation split is same-source (leave-one-out) even when the test split is query/gallery.
    self.val_protocol = "cub200" if test_protocol.query_gallery else self.protocol
    self.val_options = {"recall_ks": test_protocol.recall_ks} if test_protocol.query_gallery else {}
    train_records = splits.train
    self.eval_splits: dict[str, Any] = {"test": splits.eval}
    if ds.val_fraction > 0:
      train_records, val_records = carve_validation(train_records, float(ds.val_fraction), config.seed)
      self.eval_splits = {"val": val_records, "test": splits.eval}
    self.train_records = train_records

    self.method = methods_lib.build(config, num_classes=train_records.num_classes)
    init_rng, self.train_rng = jax.random.split(jax.random.key(config.seed))
    params, method_state = self.method.init(init_rng)
    self.param_keys = tree_lib.key_index(params)
    self.plan = optim.ParamPlan(config.optim, list(self.param_keys),
                                method_frozen=self.method.frozen_paths(params))
    self.initial_params, self._init_method_state = params, method_state
    tables = self.method.host_row_tables()
    # Tables too large for the accelerator (VPTSP's class prompts on SOP / In-Shop / iNaturalist) stay in
    # host memory; only the batch's rows travel (row_sparse.py).
    self.host_tables = row_sparse.HostRowBank(tables, self.param_keys, seed=config.seed) if tables else None
    self.steps = step_lib.StepCache(self.method, self.mesh, self.param_keys)
    self.repl = step_lib.replicated(self.mesh)

    d = config.data
    pcfg = self.method.pretrained_cfg
    self.train_loader = data_lib.make_train_loader(
        train_records, batch_size=d.batch_size, pretrained_cfg=pcfg, image_size=ds.image_size, sampler=d.sampler,
        samples_per_class=d.samples_per_class, seed=config.seed, num_threads=d.num_threads,
        process_index=jax.process_index(), process_count=jax.process_count(),
        steps_per_epoch=d.steps_per_epoch or None, scale=tuple(d.scale), ratio=tuple(d.ratio), flip=d.flip,
        interpolation=d.interpolation, num_workers=d.num_workers)
    if len(self.train_loader) < 1:
      raise ValueError(f"{len(train_records)} training images give no full batch of {d.batch_size}")
    self.eval_loaders = {name: self._eval_loader(recs) for name, recs in self.eval_splits.items()}
    self.checkpoints = ckpt_lib.Checkpoints(self.workdir, keep_last=config.checkpoint.keep_last,
                                            keep_best=config.checkpoint.keep_best)
    self.logger = logs.MetricLogger(self.workdir, tensorboard=config.log.tensorboard, enabled=self.is_main)

  # -- pieces -------------------------------------------------------------------------------------

  def _eval_loader(self, records):
    c = self.config
    return data_lib.make_eval_loader(
        records, batch_size=c.data.eval_batch_size, pretrained_cfg=self.method.pretrained_cfg,
        image_size=c.dataset.image_size, resize_size=c.dataset.resize_size, num_threads=c.data.num_threads,
        interpolation=c.data.interpolation)

  def _fresh_state(self, phase: optim.Phase) -> dict:
    opt_state = optim.init_group_states(phase, self.initial_params)
    state = step_lib.init_train_state(self.initial_params, self._init_method_state, opt_state, self.train_rng)
    return jax.device_put(state, self.repl)

  def _abstract_state(self, phase: optim.Phase) -> dict:
    shapes = jax.eval_shape(lambda p: optim.init_group_states(phase, p), self.initial_params)
    state = step_lib.init_train_state(self.initial_params, self._init_method_state, shapes, self.train_rng)
    return ckpt_lib.abstract_like(state, self.repl)

  def embed_records(self, state: dict, records) -> tuple[np.ndarray, np.ndarray]:
    emb, labels, _ = self._embed_loader(state, self._eval_loader(records), "embed")
    return emb, labels

  def _embed_loader(self, state: dict, loader, desc: str):
    fn = functools.partial(self.steps.embed, state["params"], state["method_state"])
    return embed_lib.embed_dataset(fn, loader, mesh=self.mesh, desc=desc,
                                   progress=self.config.log.progress and self.is_main)

  def evaluate(self, state: dict, split: str) -> dict[str, float]:
    records = self.eval_splits[split]
    emb, labels, indices = self._embed_loader(state, self.eval_loaders[split], f"embed {split}")
    c = self.config.eval
    protocol, options = (self.val_protocol, {**dict(c.options), **self.val_options}) if split == "val" else (
        self.protocol, dict(c.options))
    return protocols.evaluate(protocol, emb, labels, records.roles[indices], metrics=list(c.metrics), **options)

  def _meta(self, *, epoch: int, phase_epoch: int, data_state: Any, best: dict | None, step: int) -> dict:
    return {"epoch": epoch, "phase_epoch": phase_epoch, "step": step, "data_state": data_state, "best": best,
            "select_on": self.config.eval.select_on, "select_metric": self.config.eval.select_metric,
            "config": json.loads(self.config.to_json_best_effort())}

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

  # -- evaluation only ----------------------------------------------------------------------------

  def evaluate_checkpoint(self, which: str = ckpt_lib.BEST) -> dict[str, dict[str, float]]:
    step = self.checkpoints.latest_step(which)
    if step is None and which == ckpt_lib.BEST:
      _echo("no best checkpoint; evaluating the last one")
      which, step = ckpt_lib.LAST, self.checkpoints.latest_step(ckpt_lib.LAST)
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.checkpoints.root}; train first (same --workdir)")
    meta = self.checkpoints.read_meta(step, which)
    state, meta = self.checkpoints.restore(step, self._abstract_state(self.plan.phase(meta["phase_epoch"])), which)
    results = {}
    for split in self.eval_splits:
      results[split] = self.evaluate(state, split)
      self.logger.write("eval", step=step, epoch=meta["epoch"], split=split, checkpoint=which, **results[split])
      _echo(f"{which} checkpoint (step {step}, after epoch {meta['epoch'] - 1}) on {split}: "
            + ", ".join(f"{k} {100 * v:.2f}" for k, v in results[split].items()))
    return results

  # -- training -----------------------------------------------------------------------------------

  def run(self) -> dict:
    c = self.config
    steps_per_epoch = len(self.train_loader)
    select_split, select_metric = c.eval.select_on, c.eval.select_metric
    t_start = time.perf_counter()
    if select_split == "test":
      _echo(f"model selection: best {select_metric} on the TEST split, as the seed papers' code does "
            f"(optimistic; set eval.select_on='val' with dataset.val_fraction > 0 for a held-out choice)")
    else:
      _echo(f"model selection: best {select_metric} on a validation split of "
            f"{self.eval_splits['val'].num_classes} held-out training classes")

    latest = self.checkpoints.latest_step()
    data_state = None
    if latest is None:
      epoch, best = 0, None
      phase = self.plan.phase(0)
      state = self._fresh_state(phase)
      self.logger.write("config", step=0, epoch=0, config=json.loads(c.to_json_best_effort()))
    else:
      meta = self.checkpoints.read_meta(latest)
      self._log_config_differences(meta["config"])
      phase = self.plan.phase(meta["phase_epoch"])
      state, meta = self.checkpoints.restore(latest, self._abstract_state(phase))
      if self.host_tables is not None:
        self.host_tables.load_state_dict(self.checkpoints.restore_host(latest))
      epoch, best, data_state = meta["epoch"], meta["best"], meta["data_state"]
      _echo(f"resumed from {self.checkpoints.root / ckpt_lib.LAST / str(latest)}: epoch {epoch}, step {latest}"
            + (f", batch {data_state['step']} of the epoch" if data_state else ""))
    _echo(f"{self.method.name} on {self.dataset_name}: {len(self.train_records)} training images, "
          f"{self.train_records.num_classes} classes, {steps_per_epoch} steps/epoch of {c.data.batch_size} images "
          f"on {self.mesh.size} device(s) ({jax.devices()[0].platform})\n"
          + self.plan.describe(tree_lib.flatten(self.initial_params), 0) + "\n" + self._parameter_counts(phase))

    history = self._previous_evaluations(epoch) if latest is not None else []
    ctx = TrainContext(config=c, mesh=self.mesh, steps_per_epoch=steps_per_epoch,
                       embed_records=self.embed_records, log=_echo)
    if latest is None and c.eval.before_training:
      for split in self.eval_splits:
        res = self.evaluate(state, split)
        self.logger.write("eval", step=0, epoch=-1, split=split, **res)
        history.append({"epoch": "before", "split": split, **res})
        _echo(f"before training, {split}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in res.items()))

    images_seen, train_time = 0, 0.0
    for epoch in range(epoch, c.num_epochs):
      new_phase = self.plan.phase(epoch)
      if new_phase != phase:
        opt_state = optim.init_group_states(new_phase, state["params"], state["opt_state"], phase)
        state = {**state, "opt_state": jax.device_put(opt_state, self.repl)}
        fresh = sorted(set(new_phase.labels) - set(phase.labels))
        _echo(f"epoch {epoch}: trainable set changes; new optimizer groups (fresh state): {fresh}")
        phase = new_phase
      state = self.method.on_epoch_start(epoch, state, ctx)
      update = self.steps.update_fn(phase, self.method.step_variant(epoch))
      lrs, epoch_arg = step_lib.learning_rate_args(phase, epoch)
      iterator = self.train_loader.epoch(epoch, state=data_state)
      data_state = None
      state, seen, seconds = self._train_epoch(epoch, state, update, lrs, epoch_arg, iterator, best)
      images_seen, train_time = images_seen + seen, train_time + seconds
      state = self.method.on_epoch_end(epoch, state, ctx)
      step = int(state["step"])

      last_epoch = epoch + 1 == c.num_epochs
      is_best = False
      if c.eval.every_epochs and (last_epoch or (epoch >= c.eval.start_epoch and
                                                  (epoch + 1) % c.eval.every_epochs == 0)):
        row: dict[str, Any] = {"epoch": epoch}
        for split in self.eval_splits:
          res = self.evaluate(state, split)
          self.logger.write("eval", step=step, epoch=epoch, split=split, **res)
          history.append({"epoch": epoch, "split": split, **res})
          row[split] = res
          _echo(f"epoch {epoch} {split}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in res.items()))
        if select_metric not in row[select_split]:
          raise KeyError(f"eval.select_metric {select_metric!r} is not among the evaluated metrics "
                         f"{sorted(row[select_split])}; add it to eval.metrics")
        value = float(row[select_split][select_metric])
        if best is None or value > best["value"]:
          is_best = True
          best = {"value": value, "epoch": epoch, "step": step, "split": select_split, "metric": select_metric,
                  "test": row["test"]}
      meta = self._meta(epoch=epoch + 1, phase_epoch=epoch, data_state=None, best=best, step=step)
      host = self.host_tables.state_dict() if self.host_tables is not None else None
      self.checkpoints.save(step, state, meta, host=host)
      if is_best and c.checkpoint.keep_best:
        self.checkpoints.save(step, state, meta, which=ckpt_lib.BEST, host=host)

    summary = self._summary(history, best, time.perf_counter() - t_start, images_seen, train_time)
    self.close()
    return summary

  def _train_epoch(self, epoch, state, update, lrs, epoch_arg, iterator, best):
    c = self.config
    total = len(self.train_loader)
    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet pulled to the host
    seen, t_epoch = 0, time.perf_counter()
    t_log, images_since_log = t_epoch, 0
    bar = tqdm.tqdm(total=total, initial=iterator.step, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True,
                    disable=not (c.log.progress and self.is_main), leave=False)
    lr_log = {f"lr/{label}": float(v) for label, v in lrs.items()}
    first_step = int(state["step"])

    def flush() -> None:
      nonlocal t_log, images_since_log
      if not pending:
        return
      host = jax.device_get([m for _, m in pending])
      for (step, _), m in zip(pending, host):
        if m["nonfinite"]:
          last = self.checkpoints.latest_step()
          where = (f"the last good checkpoint is step {last} in {self.checkpoints.root / ckpt_lib.LAST}"
                   if last is not None else "no checkpoint was written before it")
          self.logger.write("event", step=step, epoch=epoch, error="nonfinite_loss", loss=float(m["loss"]))
          raise NonFiniteLossError(f"loss is {float(m['loss'])} at step {step} (epoch {epoch}); training "
                                   f"stopped, {where}")
      now = time.perf_counter()
      rate = images_since_log / max(now - t_log, 1e-9)
      losses = [float(m["loss"]) for m in host]
      extra = {k: float(np.mean([m[k] for m in host])) for k in host[-1] if k not in ("loss", "nonfinite")}
      self.logger.write("train", step=pending[-1][0] + 1, epoch=epoch, loss=float(np.mean(losses)),
                        images_per_s=rate, **extra, **lr_log)
      bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{rate:.1f}")
      pending.clear()
      t_log, images_since_log = now, 0

    for batch in iterator:
      step = first_step + seen // c.data.batch_size
      if self.host_tables is not None:
        rows = self.method.batch_rows(batch["label"])
        state = self.host_tables.load(state, rows)
      state, metrics = update(state, step_lib.shard_batch(batch, self.mesh), lrs, epoch_arg)
      if self.host_tables is not None:
        self.host_tables.store(state, rows)  # waits for the step: the next batch may use the same rows
      pending.append((step, metrics))
      seen += c.data.batch_size
      images_since_log += c.data.batch_size
      bar.update(1)
      if len(pending) >= c.log.every_steps:
        flush()
      every = c.checkpoint.every_steps
      if every and (step + 1) % every == 0 and iterator.step < total:
        flush()  # never save a state that follows a non-finite loss
        meta = self._meta(epoch=epoch, phase_epoch=epoch, data_state=iterator.get_state(), best=best,
                          step=step + 1)
        self.checkpoints.save(step + 1, state, meta,
                              host=self.host_tables.state_dict() if self.host_tables is not None else None)
    flush()
    bar.close()
    seconds = time.perf_counter() - t_epoch
    _echo(f"epoch {epoch}: {seen} images in {seconds:.1f} s ({seen / max(seconds, 1e-9):.1f} images/s), "
          f"learning rates: " + ", ".join(f"{k} {float(v):.3g}" for k, v in lrs.items()))
    return state, seen, seconds

  def _parameter_counts(self, phase: optim.Phase) -> str:
    """'trainable of total' parameters, as the VPTSP paper's Table 1 counts them: host tables count with
    their full size (their per-batch device buffers are not counted again)."""
    flat = tree_lib.flatten(self.initial_params)
    buffers = set()
    table_count = trainable_tables = 0
    if self.host_tables is not None:
      for table in self.host_tables.tables.values():
        buffers.add(table.buffer_path)
        table_count += table.num_parameters
        trainable_tables += table.num_parameters if table.buffer_path in phase.trainable else 0
    total = sum(int(np.size(v)) for p, v in flat.items() if p not in buffers) + table_count
    trainable = sum(int(np.size(flat[p])) for p in phase.trainable if p not in buffers) + trainable_tables
    line = (f"parameters: {trainable:,} trainable ({trainable / 1e6:.2f}M, {100 * trainable / max(total, 1):.2f}%) "
            f"of {total:,} ({total / 1e6:.2f}M)")
    if table_count:
      line += f"; {table_count:,} of them in host-memory tables (only the batch's rows go to the device)"
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
                   + "; test then: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in best["test"].items()))
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
    self.checkpoints.close()
    self.logger.close()


def fit(config: Any, workdir: str | pathlib.Path) -> dict:
  """Trains (or resumes) `config` in `workdir`; returns the summary dict (history, best, timings)."""
  trainer = Trainer(config, workdir)
  try:
    return trainer.run()
  finally:
    trainer.close()


def evaluate_only(config: Any, workdir: str | pathlib.Path, which: str = ckpt_lib.BEST) -> dict:
  """Evaluates the 'best' (or 'last') checkpoint of `workdir` on every evaluation split."""
  trainer = Trainer(config, workdir)
  try:
    return trainer.evaluate_checkpoint(which)
  finally:
    trainer.close()
