"""Pictures of a run: curves, Recall@K, retrieval examples and an embedding map, as PNGs in the workdir.

  python -m dml_jax.plot --workdir runs/mine            # writes runs/mine/plots/*.png

`plot_run(workdir)` reads only files of the workdir:

  metrics.jsonl                the trainer's log (dml_jax/train/logs.py: rows of kind 'train', 'eval',
                               'summary', 'config')
  embeddings/best_test.npz     the test split's embeddings under the best checkpoint
                               (dml_jax/eval/saved.py: `save_embeddings`, written by the trainer)

and writes to `<workdir>/plots/`:

  curves.png           training loss, the evaluated metrics and the learning rates over epochs; best epoch marked
  recall_at_k.png      Recall@K for K = 1 .. 100 (or the gallery size) of the best checkpoint, with the values the
                       run logged at the protocol's K and what a random ranking would get
  retrieval.png        test queries with their top-k: fixed queries (seeded, the same for every run of a folder),
                       the best and the worst queries; correct results framed green, wrong ones red
  embedding_map.png    t-SNE (or PCA) of the test embeddings, coloured by class

Without the embeddings file only curves.png is drawn, and the missing file is named. The figures are drawn with
matplotlib's object API (no pyplot state), so plotting from a training process or a thread is safe.
`retrieval_grid` is also what `python -m dml_jax.retrieve query` draws its answers with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from dml_jax.eval import saved as saved_lib

log = logging.getLogger("dml_jax.plot")

PLOTS_DIR = "plots"
METRICS_FILE = "metrics.jsonl"  # dml_jax.train.logs.METRICS_FILE; not imported so plotting never loads the trainer
CORRECT, WRONG, UNKNOWN, QUERY = "#2ca02c", "#d62728", "#9a9a9a", "#1f4e9c"
_DPI = 110
_NOT_METRICS = ("kind", "step", "epoch", "time", "split", "checkpoint")


# ------------------------------------------------------------------------------------------------ the log


@dataclasses.dataclass
class RunLog:
  """metrics.jsonl, de-duplicated: the trainer rewinds the log on a resume (each step once), but a log written by
  an older version or joined by hand may hold a step twice; the later row counts.

  Attributes:
    train: training rows in step order ({'step', 'epoch', 'loss', 'lr/<group>', ...}).
    eval: evaluation rows of training ({'epoch' (-1 = before training), 'split', metric: value}), in order.
    summary: the last 'summary' row or None; config: the first 'config' row's config or {}.
  """

  train: list[dict[str, Any]]
  eval: list[dict[str, Any]]
  summary: dict[str, Any] | None
  config: dict[str, Any]

  @property
  def select(self) -> tuple[str, str]:
    """(split, metric) the run selects its best checkpoint on."""
    ev = self.config.get("eval", {})
    return ev.get("select_on", "test"), ev.get("select_metric", "recall@1")

  def best(self) -> dict[str, Any] | None:
    """{'epoch', 'value', 'metric', 'split'} of the best evaluation: the summary's, else the log's maximum."""
    if self.summary and self.summary.get("best"):
      return self.summary["best"]
    split, metric = self.select
    rows = [r for r in self.eval if r["split"] == split and isinstance(r.get(metric), (int, float))
            and r["epoch"] >= 0]
    if not rows:
      return None
    row = max(rows, key=lambda r: r[metric])  # first maximum, as the trainer keeps the first best
    return {"epoch": row["epoch"], "value": row[metric], "metric": metric, "split": split}


def read_run_log(workdir: str | os.PathLike) -> RunLog:
  """Reads `<workdir>/metrics.jsonl`; a missing file stops with what was expected."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: expected the JSONL log a training run writes to its workdir "
                            "(one JSON object per line with 'kind' 'config' | 'train' | 'eval' | 'summary')")
  train, evals, summary, config = {}, {}, None, {}
  bad = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      bad.append(number)  # a line cut short when a run was killed
      continue
    kind = row.get("kind")
    if kind == "train" and isinstance(row.get("loss"), (int, float)):
      train[int(row["step"])] = row
    elif kind == "eval" and "checkpoint" not in row:  # rows with 'checkpoint' come from --eval_only
      evals[(int(row["epoch"]), str(row.get("split", "test")))] = row
    elif kind == "summary":
      summary = row
    elif kind == "config" and not config:
      config = row.get("config") or {}
  if bad:
    log.warning("%s: %d line(s) are not JSON and were not read (lines %s)", path, len(bad), bad[:10])
  return RunLog([train[s] for s in sorted(train)], [evals[k] for k in sorted(evals)], summary, config)


def _epoch_positions(train: list[dict[str, Any]]) -> np.ndarray:
  """Each training row's position on the epoch axis (float): epoch e's rows spread over (e - 1, e], so that
  the evaluation after epoch e, plotted at e, sits where its epoch ends."""
  steps = np.array([r["step"] for r in train], np.float64)
  epochs = np.array([r["epoch"] for r in train], np.int64)
  x = np.empty(len(train))
  end_of = {e: steps[epochs == e].max() for e in np.unique(epochs)}
  for e in np.unique(epochs):
    mask = epochs == e
    start = end_of.get(e - 1, 0.0)
    span = max(end_of[e] - start, 1.0)
    x[mask] = e - 1 + (steps[mask] - start) / span
  return x


def _epoch_axis(ax, before: bool) -> None:
  """Integer epoch ticks; -1 (evaluation before training) is labelled 'before'."""
  from matplotlib.ticker import FuncFormatter, MaxNLocator

  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "before" if before and v == -1 else f"{v:g}"))
  ax.set_xlabel("epoch")


# ------------------------------------------------------------------------------------------------ figures


def _figure(width: float, height: float, layout: str | None = "constrained"):
  from matplotlib.figure import Figure  # local: `--help` and the retrieval CLI's errors need no matplotlib

  return Figure(figsize=(width, height), dpi=_DPI, layout=layout)


def _save(fig, out: str | os.PathLike) -> pathlib.Path:
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=_DPI, facecolor="white")
  return out


def plot_curves(run: RunLog, out: str | os.PathLike, *, title: str = "") -> pathlib.Path:
  """Loss, evaluation metrics and learning rates against epochs trained; the best evaluation is starred."""
  lr_keys = sorted({k for r in run.train for k in r if k.startswith("lr/")})
  panels = 2 + bool(lr_keys)
  fig = _figure(5.2 * panels + 1.4, 4.0)
  axes = fig.subplots(1, panels, sharex=True)
  if title:
    fig.suptitle(title, fontsize=11)

  ax = axes[0]
  if run.train:
    x = _epoch_positions(run.train)
    loss = np.array([r["loss"] for r in run.train], np.float64)
    ax.plot(x, loss, color="#1f77b4", alpha=0.35, linewidth=1, label="logged")
    epochs = np.array([r["epoch"] for r in run.train])
    per_epoch = [(e, float(np.mean(loss[epochs == e]))) for e in np.unique(epochs)]
    ax.plot(*zip(*per_epoch), "o-", color="#1f77b4", markersize=4, linewidth=2, label="epoch mean")
    ax.legend(loc="upper right", fontsize=8)
  else:
    ax.text(0.5, 0.5, "no training rows", ha="center", va="center", transform=ax.transAxes, color="gray")
  before = any(r["epoch"] < 0 for r in run.eval)
  ax.set(title="training loss", ylabel="loss")
  _epoch_axis(ax, before)
  ax.grid(alpha=0.3)

  ax = axes[1]
  select_split, select_metric = run.select
  metric_names = []
  for r in run.eval:
    metric_names += [k for k, v in r.items() if k not in _NOT_METRICS and isinstance(v, (int, float))
                     and k not in metric_names]
  splits = sorted({r["split"] for r in run.eval}, key=lambda s: (s != "test", s))
  colors = {m: f"C{i % 10}" for i, m in enumerate(metric_names)}
  for split in splits:
    rows = [r for r in run.eval if r["split"] == split]
    for m in metric_names:
      pts = [(r["epoch"], 100 * r[m]) for r in rows if isinstance(r.get(m), (int, float))]
      if pts:
        chosen = m == select_metric and split == select_split
        ax.plot(*zip(*pts), "o-" if split == "test" else "s--", color=colors[m], markersize=3.5,
                linewidth=2.4 if chosen else 1.3, label=m if len(splits) == 1 else f"{m} ({split})")
  best = run.best()
  if best is not None and best.get("metric") in metric_names:
    ax.plot(best["epoch"], 100 * best["value"], "*", color="black", markersize=14, zorder=5,
            label=f"best {best['metric']}\n{100 * best['value']:.1f} at epoch {best['epoch']}")
  if metric_names:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  else:
    ax.text(0.5, 0.5, "no evaluation rows", ha="center", va="center", transform=ax.transAxes, color="gray")
  ax.set(title=f"evaluation on {' / '.join(splits) or 'no split'}", ylabel="%")
  _epoch_axis(ax, before)
  ax.grid(alpha=0.3)

  if lr_keys:
    ax = axes[2]
    x = _epoch_positions(run.train)
    for k in lr_keys:
      ys = np.array([r.get(k, np.nan) for r in run.train], np.float64)
      ax.plot(x, ys, label=k[3:])
    if all(r.get(k, 0) > 0 for r in run.train for k in lr_keys if isinstance(r.get(k), (int, float))):
      ax.set_yscale("log")
    ax.set(title="learning rates")
    _epoch_axis(ax, before)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  return _save(fig, out)


def _queries_and_gallery(saved: saved_lib.SavedEmbeddings) -> tuple[np.ndarray, np.ndarray]:
  """Row indices (queries, gallery): query/gallery roles when present, else every row leave-one-out."""
  if np.isin(saved.roles, ("query", "gallery")).any():
    return np.flatnonzero(saved.roles == "query"), np.flatnonzero(saved.roles == "gallery")
  rows = np.arange(len(saved))
  return rows, rows


def neighbours(saved: saved_lib.SavedEmbeddings, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Exact cosine top-k of every query (dml_jax.eval.knn, FAISS when installed), itself excluded.

  Returns (query rows int [Q], neighbour rows int [Q, k] into the saved rows, similarities float32 [Q, k]).
  """
  from dml_jax.eval import knn as knn_lib

  queries, gallery = _queries_and_gallery(saved)
  if queries is gallery or np.array_equal(queries, gallery):
    exclude = np.arange(len(queries))
  else:
    where = {row: i for i, row in enumerate(gallery)}
    exclude = np.array([where.get(q, -1) for q in queries], np.int64)
  k = min(k, len(gallery) - int((exclude >= 0).any()))
  scores, idx = knn_lib.knn(saved.embeddings[queries], saved.embeddings[gallery], k, metric="cosine",
                            exclude_indices=exclude)
  return queries, gallery[idx], scores


def _chance_recall(num_relevant: np.ndarray, num_candidates: np.ndarray, max_k: int) -> np.ndarray:
  """Expected Recall@K, K = 1 .. max_k, of a uniformly random ranking, averaged over queries.

  P(no relevant item among the first K) = prod_{i < K} (M - R - i) / (M - i) for R relevant of M candidates.
  """
  i = np.arange(max_k)[None, :]
  m, r = num_candidates[:, None].astype(np.float64), num_relevant[:, None].astype(np.float64)
  miss = np.clip((m - r - i) / np.maximum(m - i, 1.0), 0.0, 1.0)
  return 1.0 - np.cumprod(miss, axis=1).mean(axis=0)


def recall_curve(saved: saved_lib.SavedEmbeddings, max_k: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """(Recall@K, expected Recall@K of a random ranking) for K = 1 .. min(max_k, candidates), float [K] each.

  Recall@K: the share of queries with a same-class item among their K nearest (cosine), as the papers count it.
  """
  queries, nn_rows, _ = neighbours(saved, max_k)
  labels = saved.labels
  hits = labels[nn_rows] == labels[queries][:, None]  # [Q, K]
  recall = np.cumsum(hits, axis=1).clip(0, 1).mean(axis=0)
  _, gallery = _queries_and_gallery(saved)
  in_gallery = np.isin(queries, gallery)  # such a query is excluded from its own candidates
  same = np.bincount(labels[gallery], minlength=len(saved.class_names))[labels[queries]] - in_gallery
  return recall, _chance_recall(same, len(gallery) - in_gallery, len(recall))


def plot_recall_at_k(saved: saved_lib.SavedEmbeddings, out: str | os.PathLike, *, run: RunLog | None = None,
                     max_k: int = 100, title: str = "") -> pathlib.Path:
  """Recall@K curve for K = 1 .. max_k (log axis) of the saved embeddings, the protocol's K values marked."""
  from dml_jax.eval import protocols

  recall, chance = recall_curve(saved, max_k)
  ks = np.arange(1, len(recall) + 1)
  labels = saved.labels
  queries, _ = _queries_and_gallery(saved)

  fig = _figure(6.4, 4.4)
  ax = fig.subplots()
  ax.plot(ks, 100 * recall, color="#1f77b4", linewidth=2.2, label="Recall@K")
  ax.plot(ks, 100 * chance, color="gray", linestyle=":", linewidth=1.5, label="random ranking")
  try:
    protocol_ks = [k for k in protocols.get_protocol(saved.protocol).recall_ks if k <= ks[-1]]
  except ValueError:
    protocol_ks = [k for k in (1, 2, 4, 8) if k <= ks[-1]]
  for k in protocol_ks:
    ax.plot(k, 100 * recall[k - 1], "o", color="#1f77b4", markersize=6)
    ax.annotate(f"{100 * recall[k - 1]:.1f}", (k, 100 * recall[k - 1]), textcoords="offset points",
                xytext=(4, -12), fontsize=8)
  logged = _logged_recalls(run, saved) if run is not None else {}
  if logged:
    ax.plot(list(logged), [100 * v for v in logged.values()], "x", color="black", markersize=8,
            label="logged by the run")
  ax.set_xscale("log")
  ticks = [t for t in 2 ** np.arange(12) if t <= ks[-1]]
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.minorticks_off()
  ax.set_xlim(0.9, ks[-1] * 1.1)
  ax.set_ylim(0, 101)
  ax.set(xlabel="K", ylabel="Recall@K (%)")
  where = f"epoch {saved.epoch}, step {saved.step}" if saved.epoch >= 0 else "saved embeddings"
  ax.set_title(title or f"Recall@K, {where}: {len(queries)} {saved.split} queries, "
               f"{len(np.unique(labels))} classes", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  return _save(fig, out)


def _logged_recalls(run: RunLog, saved: saved_lib.SavedEmbeddings) -> dict[int, float]:
  """recall@K the run logged for the saved checkpoint's epoch on the saved split, {K: value}."""
  rows = [r for r in run.eval if r["epoch"] == saved.epoch and r["split"] == saved.split]
  if not rows:
    return {}
  return {int(k.split("@")[1]): float(v) for k, v in rows[-1].items()
          if k.startswith("recall@") and k.split("@")[1].isdigit() and isinstance(v, (int, float))}


@dataclasses.dataclass
class GridRow:
  """One row of a retrieval grid: a query image and its ranked results.

  Attributes:
    query: image path; query_label: its class name, None when unknown.
    results: [(path, score, class name or None)] best first.
    group: a caption for the row (e.g. 'fixed', 'best', 'worst'), shown left of the query.
  """

  query: str
  query_label: str | None
  results: list[tuple[str, float, str | None]]
  group: str = ""


def _thumbnail(path: str, size: int) -> np.ndarray | None:
  """uint8 [size, size, 3]: the whole image padded to a square; None (logged) when it cannot be read."""
  from PIL import Image, ImageOps

  try:
    with Image.open(path) as img:
      img.draft("RGB", (size, size))  # JPEGs decode at a fraction of their size when that still suffices
      rgb = img.convert("RGB")
      return np.asarray(ImageOps.pad(rgb, (size, size), color=(240, 240, 240)))
  except (OSError, ValueError) as e:
    log.warning("retrieval grid: cannot read %s (%s); drawn as an empty tile", path, e)
    return None


def _short(text: str, width: int) -> str:
  return text if len(text) <= width else text[:width - 1] + "…"


def retrieval_grid(rows: Sequence[GridRow], out: str | os.PathLike, *, title: str = "", thumb: int = 160,
                   score_name: str = "cos") -> pathlib.Path:
  """Draws each row as [query | result 1 .. k] with scores; results framed green (same class as the query),
  red (another class) or grey (a class unknown); writes a PNG and returns its path."""
  if not rows:
    raise ValueError("retrieval_grid needs at least one row")
  k = max(len(r.results) for r in rows)
  # Tiles are placed in inches: a layout engine over (k + 1) x rows axes costs seconds and gains nothing here.
  side, gap, caption, left, right, bottom = 1.45, 0.08, 0.36, 0.3, 0.1, 0.08
  top = 0.5 if title else 0.1
  width = left + (k + 1) * (side + gap) + gap + right  # one more gap after the query column
  height = top + len(rows) * (side + caption) + bottom
  fig = _figure(width, height, layout=None)
  axes = np.empty((len(rows), k + 1), dtype=object)
  for i in range(len(rows)):
    y = height - top - (i + 1) * (side + caption)  # the caption sits above its tile
    for j in range(k + 1):
      x = left + j * (side + gap) + (gap if j else 0)
      axes[i, j] = fig.add_axes((x / width, y / height, side / width, side / height))
  if title:
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")

  def tile(ax, path, color, caption, width):
    image = _thumbnail(path, thumb)
    if image is None:
      ax.text(0.5, 0.5, "not readable", ha="center", va="center", fontsize=7, color="gray", transform=ax.transAxes)
    else:
      ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
      spine.set_edgecolor(color)
      spine.set_linewidth(width)
    ax.set_title(caption, fontsize=7.5, pad=2, color="black")

  for i, row in enumerate(rows):
    label = row.query_label
    caption = ("query" if label is None else f"query: {_short(label, 16)}") + "\n" + _short(
        os.path.basename(row.query), 24)
    tile(axes[i, 0], row.query, QUERY, caption, 3.5)
    if row.group:
      axes[i, 0].set_ylabel(row.group, fontsize=9, fontweight="bold")
    for j in range(k):
      ax = axes[i, j + 1]
      if j >= len(row.results):
        ax.axis("off")
        continue
      path, score, result_label = row.results[j]
      if label is None or result_label is None:
        color = UNKNOWN
      else:
        color = CORRECT if result_label == label else WRONG
      caption = f"#{j + 1}  {score_name} {score:.3f}\n" + (_short(result_label, 22) if result_label else
                                                           _short(os.path.basename(path), 22))
      tile(ax, path, color, caption, 3.0 if color != UNKNOWN else 1.2)
  return _save(fig, out)


def _pick_rows(order: np.ndarray, query_labels: np.ndarray, count: int, taken: set[int]) -> list[int]:
  """The first `count` queries of `order` not taken yet, one per class while classes remain."""
  picked, classes = [], set()
  for strict in (True, False):
    for q in order:
      if len(picked) == count:
        return picked
      if q in taken or q in picked or (strict and query_labels[q] in classes):
        continue
      picked.append(int(q))
      classes.add(query_labels[q])
  return picked


def plot_retrieval_examples(saved: saved_lib.SavedEmbeddings, out: str | os.PathLike, *, k: int = 8,
                            num_fixed: int = 4, num_best: int = 3, num_worst: int = 3, seed: int = 0,
                            title: str = "") -> pathlib.Path:
  """A retrieval grid of the saved split: fixed queries, then the best and the worst queries.

  Fixed queries are drawn by `seed` from distinct classes, so every run on the same data shows the same ones.
  Best / worst rank queries by precision among the top k, ties by how early the first correct result comes.
  Queries whose class has no other image among the candidates can never be right and are not ranked.
  """
  queries, nn_rows, scores = neighbours(saved, k)
  k = nn_rows.shape[1]
  q_labels = saved.labels[queries]
  hits = saved.labels[nn_rows] == q_labels[:, None]
  _, gallery = _queries_and_gallery(saved)
  counts = np.bincount(saved.labels[gallery], minlength=len(saved.class_names))
  answerable = counts[q_labels] - np.isin(queries, gallery) > 0
  first_hit = np.where(hits.any(1), hits.argmax(1), k)
  quality = hits.mean(1) - first_hit / (10.0 * k)  # precision@k, then an earlier first hit
  rng = np.random.default_rng(seed)
  fixed = _pick_rows(rng.permutation(len(queries)), q_labels, num_fixed, set())
  candidates = np.flatnonzero(answerable)
  best = _pick_rows(candidates[np.argsort(-quality[candidates], kind="stable")], q_labels, num_best, set(fixed))
  worst = _pick_rows(candidates[np.argsort(quality[candidates], kind="stable")], q_labels, num_worst,
                     set(fixed) | set(best))

  names = saved.class_names
  rows = []
  for group, picked in (("fixed", fixed), ("best", best), ("worst", worst)):
    for q in picked:
      rows.append(GridRow(str(saved.paths[queries[q]]), str(names[q_labels[q]]),
                          [(str(saved.paths[r]), float(s), str(names[saved.labels[r]]))
                           for r, s in zip(nn_rows[q], scores[q])], group))
  where = f"epoch {saved.epoch}" if saved.epoch >= 0 else "saved embeddings"
  return retrieval_grid(rows, out, title=title or f"{saved.split} split retrieval ({where}): fixed queries, "
                        f"best and worst; green = same class, red = another class")


def plot_embedding_map(saved: saved_lib.SavedEmbeddings, out: str | os.PathLike, *, method: str = "tsne",
                       max_points: int = 2000, seed: int = 0, title: str = "") -> pathlib.Path:
  """2-D map of the embeddings coloured by class: t-SNE (after PCA to 50 dimensions) or PCA.

  More than `max_points` rows are subsampled (seeded); the title says how many are shown.
  """
  from sklearn.decomposition import PCA
  from sklearn.manifold import TSNE

  if method not in ("tsne", "pca"):
    raise ValueError(f"embedding map method must be 'tsne' or 'pca', got {method!r}")
  n = len(saved)
  rows = np.arange(n)
  if n > max_points:
    rows = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
  x = saved.embeddings[rows].astype(np.float64)
  labels = saved.labels[rows]
  if method == "pca" or len(rows) < 8:
    xy = PCA(n_components=2, random_state=seed).fit_transform(x)
    method_name = "PCA"
  else:
    if x.shape[1] > 50 and len(rows) > 50:  # PCA keeps at most min(rows, dimensions) components
      x = PCA(n_components=50, random_state=seed).fit_transform(x)
    xy = TSNE(n_components=2, perplexity=float(min(30.0, (len(rows) - 1) / 3.0)), init="pca",
              random_state=seed).fit_transform(x)
    method_name = "t-SNE"

  classes = np.unique(labels)
  # Up to 30 classes get a legend: ten distinct colours times three marker shapes, so no two classes look alike
  # (tab20's light/dark pairs do); more classes get a continuous colour map and no legend.
  legend = len(classes) <= 30
  fig = _figure((7.8 if len(classes) <= 15 else 9.6) if legend else 6.4, 6.0)
  ax = fig.subplots()
  import matplotlib

  cmap = matplotlib.colormaps["tab10" if legend else "turbo"]
  size = 34 if len(rows) < 500 else 14 if len(rows) < 2000 else 6
  for i, c in enumerate(classes):
    mask = labels == c
    color = cmap(i % 10) if legend else cmap(i / max(len(classes) - 1, 1))
    ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=color, marker="o^s"[i // 10] if legend else "o", alpha=0.85,
               edgecolors="white", linewidths=0.4 if len(rows) < 2000 else 0,
               label=_short(str(saved.class_names[c]), 24))
  if legend:
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=1.4, frameon=False,
              title="class", title_fontsize=9, ncols=1 if len(classes) <= 15 else 2)
  ax.set_xticks([])
  ax.set_yticks([])
  shown = f"{len(rows)} of {n}" if len(rows) < n else f"{n}"
  ax.set_title(title or f"{method_name} of {shown} {saved.split} embeddings, {len(classes)} classes, "
               "coloured by class", fontsize=10)
  return _save(fig, out)


# ------------------------------------------------------------------------------------------------ a run


def plot_run(workdir: str | os.PathLike, *, embeddings_file: str | os.PathLike | None = None,
             out_dir: str | os.PathLike | None = None, embedding_map: str = "tsne", k: int = 8) -> list[pathlib.Path]:
  """Draws the PNGs of a run (see the module docstring) from `<workdir>/metrics.jsonl` and the best
  checkpoint's test embeddings (default `<workdir>/embeddings/best_test.npz`); returns the paths written.

  Missing metrics.jsonl is an error; missing embeddings leave only curves.png, with a warning naming the file.
  """
  workdir = pathlib.Path(workdir)
  out_dir = pathlib.Path(out_dir) if out_dir is not None else workdir / PLOTS_DIR
  run = read_run_log(workdir)
  name = workdir.resolve().name
  written = [plot_curves(run, out_dir / "curves.png", title=f"run {name}")]
  path = pathlib.Path(embeddings_file) if embeddings_file is not None else saved_lib.best_test_path(workdir)
  if not path.is_file():
    log.warning("%s does not exist (the trainer writes it for the best checkpoint at the end of training): "
                "recall_at_k.png, retrieval.png and embedding_map.png are not drawn", path)
    return written
  saved = saved_lib.load_embeddings(path)
  written.append(plot_recall_at_k(saved, out_dir / "recall_at_k.png", run=run))
  written.append(plot_retrieval_examples(saved, out_dir / "retrieval.png", k=k))
  written.append(plot_embedding_map(saved, out_dir / "embedding_map.png", method=embedding_map))
  return written


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dml_jax.plot", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a training run's workdir (holds metrics.jsonl)")
  parser.add_argument("--embeddings", default=None,
                      help="embeddings file (default <workdir>/embeddings/best_test.npz)")
  parser.add_argument("--out", default=None, help="folder for the PNGs (default <workdir>/plots)")
  parser.add_argument("--embedding_map", default="tsne", choices=("tsne", "pca"))
  parser.add_argument("--k", type=int, default=8, help="results per query in retrieval.png")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("dml_jax").setLevel(logging.INFO)  # ours, not the libraries' start-up chatter
  try:
    written = plot_run(args.workdir, embeddings_file=args.embeddings, out_dir=args.out,
                       embedding_map=args.embedding_map, k=args.k)
  except (FileNotFoundError, ValueError) as e:
    print(f"ERROR: {e}", file=sys.stderr)
    return 1
  for path in written:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
