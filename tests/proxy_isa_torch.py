"""A torch re-creation of Proxy-ISA's loss, class state and memory queue, written from the authors' code
(`rioyokotalab/ProxyISA` at 8a3597b: code/losses.py `ProxyISA.forward`, code/memory.py `CrossBatchMemory`),
for tests/test_proxy_isa.py and benchmarks/proxy_isa_step.py. It never imports dml_jax.

It keeps the code's structure (a Python loop over the classes of the batch, then over every class for the
negatives; state in float64 tensors; counts as Python floats) and its dtype behaviour (float32 similarities
compared with float64 thresholds cast to float32, float32 weights). Where the code crashes it does what
dml_jax defines: e^-tau in double precision (the code calls torch.exp on a float), and a batch whose samples
are all outliers enqueues nothing (the code indexes with an empty float tensor).

`reference_steps(inputs, **hparams)` takes seeded numpy inputs and returns a dict of numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def l2_rows(x: torch.Tensor) -> torch.Tensor:
  """The code's l2_norm: x / sqrt(sum(x^2) + 1e-12) per row."""
  norm = torch.sqrt(torch.sum(torch.pow(x, 2), 1) + 1e-12)
  return torch.div(x, norm.view(-1, 1).expand_as(x))


class TorchMemory:
  """The code's queue: overflow goes to the last q rows and resets the pointer; 'full' = last label != 0."""

  def __init__(self, capacity: int, dim: int, ring_buffer: bool = False):
    self.features = torch.zeros(capacity, dim)
    self.labels = torch.zeros(capacity, dtype=torch.long)
    self.pointer = 0
    self.written = 0
    self.ring_buffer = ring_buffer

  def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
    q, capacity = len(labels), len(self.labels)
    if self.ring_buffer:
      slots = (self.pointer + torch.arange(q)) % capacity
      self.features[slots] = features
      self.labels[slots] = labels
      self.pointer = (self.pointer + q) % capacity
    elif self.pointer + q > capacity:
      self.features[capacity - q:] = features
      self.labels[capacity - q:] = labels
      self.pointer = 0
    else:
      self.features[self.pointer:self.pointer + q] = features
      self.labels[self.pointer:self.pointer + q] = labels
      self.pointer += q
    self.written = min(self.written + q, capacity)

  def read(self) -> tuple[torch.Tensor, torch.Tensor]:
    if self.ring_buffer:
      return self.features[:self.written], self.labels[:self.written]
    if self.labels[-1].item() != 0:
      return self.features, self.labels
    return self.features[:self.pointer], self.labels[:self.pointer]


class TorchProxyISA:
  """The loss and its state, one class at a time as the code (see the module docstring)."""

  def __init__(self, num_classes: int, dim: int, memory_size: int, *, alpha=32.0, margin=0.1, volume=100.0,
               eta_scale=0.9, eta_margin=0.1, hardness_scale=0.15, tau=1.5, ring_buffer=False):
    self.num_classes = num_classes
    self.alpha, self.margin, self.volume = alpha, margin, volume
    self.beta = (volume - 1) / volume
    self.k, self.lam, self.h, self.tau = eta_scale, eta_margin, hardness_scale, tau
    self.counts = [0] * num_classes  # becomes float after the first update, as the code's counter
    self.effective = torch.zeros(num_classes, dtype=torch.float64)
    self.learned = torch.ones(num_classes, dtype=torch.float64)
    self.memory = TorchMemory(memory_size, dim, ring_buffer)

  def set_counts(self, counts) -> None:
    for c, n in enumerate(counts):
      self.counts[c] = float(n)
      self.effective[c] = (1.0 - self.beta ** self.counts[c]) / (1.0 - self.beta)

  def class_quantities(self) -> dict[str, torch.Tensor]:
    e, s = self.effective, self.learned
    w_base = 1.0 / (1.0 + torch.log(1.0 + e))
    w = (1.0 + math.exp(-self.tau)) * (w_base - 1) / (1.0 + torch.exp(self.volume - self.tau - e)) + 1.0
    eta = (1.0 + self.k * (1.0 - s)) * w_base + self.lam
    return {"w": w, "threshold": s - eta}

  def step(self, x: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, *, memory_on: bool,
           filter_on: bool) -> tuple[torch.Tensor, dict]:
    """x float32 [B, D] (unit rows, leaf), labels long [B], proxies float32 [C, D] (leaf) -> loss, extras."""
    b = len(labels)
    pos_mask = F.one_hot(labels, self.num_classes).float()
    neg_mask = 1 - pos_mask
    pn = l2_rows(proxies)
    cos = x @ pn.T
    class_count = pos_mask.sum(dim=0)
    in_batch = torch.nonzero(class_count != 0).flatten().tolist()
    q = self.class_quantities()
    w, threshold = q["w"], q["threshold"]
    weights = torch.ones(b, self.num_classes, dtype=cos.dtype)
    pos_weight_sum, neg_weight_sum = 0.0, 0.0
    outliers: list[int] = []
    with torch.no_grad():
      for c in in_batch:
        rows = torch.nonzero(labels == c).flatten()
        s = cos[rows, c]
        if filter_on:
          below = s < threshold[c]  # float32 vs a float64 0-d tensor: compared in float32
          out_rows = rows[below]
          if len(out_rows):
            class_count[c] -= len(out_rows)
            outliers += out_rows.tolist()
          m = torch.where(s > self.learned[c], torch.ones_like(s) * w[c], torch.ones_like(s) + w[c]).float()
          m = torch.where(below, torch.ones_like(m) * w[c], m)
          weights[rows, c] = m
        pos_weight_sum = pos_weight_sum + weights[rows, c].mean()
      for c in range(self.num_classes):
        rows = torch.nonzero(labels != c).flatten()
        if len(rows) == 0:
          continue
        s = cos[rows, c]
        divisor = max(1.0, self.effective[c])  # the code's Python max: the float64 tensor when E > 1
        m = torch.where(s < threshold[c], torch.ones_like(s) / divisor, torch.ones_like(s)).float()
        weights[rows, c] = m
        neg_weight_sum = neg_weight_sum + m.mean()
    pos_term = torch.log(1.0 + torch.sum(pos_mask * torch.exp(self.alpha * (self.margin - cos) * weights), 0)).sum()
    neg_term = torch.log(1.0 + torch.sum(neg_mask * torch.exp(self.alpha * (cos + self.margin) * weights), 0)).sum()
    with torch.no_grad():
      if memory_on:
        kept = [i for i in range(b) if i not in outliers]
        if kept:  # the code crashes on an empty list; dml_jax enqueues nothing
          idx = torch.tensor(kept)
          self.memory.push(x.detach()[idx], labels[idx])
        mem_features, mem_labels = self.memory.read()
      for c in in_batch:
        if class_count[c].item() > 0:
          self.counts[c] += class_count[c].item()
          self.effective[c] = (1.0 - self.beta ** self.counts[c]) / (1.0 - self.beta)
        if memory_on:
          rows = torch.nonzero(mem_labels == c).flatten()
          if len(rows):
            self.learned[c] = (mem_features[rows] @ pn[c].detach()).mean() * self.h
    loss = pos_term / pos_weight_sum + neg_term / neg_weight_sum
    return loss, {"weights": weights, "outlier": torch.tensor([i in outliers for i in range(b)]),
                  "pos_weight_sum": torch.as_tensor(pos_weight_sum), "neg_weight_sum": torch.as_tensor(neg_weight_sum),
                  "threshold32": threshold.float(), "w32": w.float()}


def reference_steps(inputs: dict[str, np.ndarray], *, memory_size: int, switches: list[tuple[bool, bool]],
                    initial_counts=None, **hparams) -> dict[str, np.ndarray]:
  """Runs `TorchProxyISA` over the steps of `inputs` (x [S, B, D] float32, labels [S, B] int, proxies
  [S, C, D] float32) with (memory_on, filter_on) per step; returns per-step arrays stacked on axis 0.

  Keys: loss [S], grad_x [S, B, D], grad_proxies [S, C, D], weights [S, B, C], outlier [S, B],
  pos_weight_sum / neg_weight_sum [S], threshold32 / w32 [S, C] (before the step), and after each step
  counts [S, C] (float64), effective [S, C] (float64), learned [S, C] (float64), memory_features
  [S, T, D], memory_labels [S, T], memory_pointer [S].
  """
  steps, _, dim = inputs["x"].shape
  num_classes = inputs["proxies"].shape[1]
  ref = TorchProxyISA(num_classes, dim, memory_size, **hparams)
  if initial_counts is not None:
    ref.set_counts(initial_counts)
  if "initial_learned" in inputs:
    ref.learned = torch.tensor(inputs["initial_learned"], dtype=torch.float64)
  out: dict[str, list] = {}
  for t in range(steps):
    x = torch.tensor(inputs["x"][t], requires_grad=True)
    proxies = torch.tensor(inputs["proxies"][t], requires_grad=True)
    labels = torch.tensor(inputs["labels"][t], dtype=torch.long)
    memory_on, filter_on = switches[t]
    loss, extra = ref.step(x, labels, proxies, memory_on=memory_on, filter_on=filter_on)
    loss.backward()
    record = {"loss": loss.detach().numpy(), "grad_x": x.grad.numpy(), "grad_proxies": proxies.grad.numpy(),
              "counts": np.asarray(ref.counts, np.float64), "effective": ref.effective.numpy().copy(),
              "learned": ref.learned.numpy().copy(), "memory_features": ref.memory.features.numpy().copy(),
              "memory_labels": ref.memory.labels.numpy().copy(), "memory_pointer": np.asarray(ref.memory.pointer)}
    record.update({k: v.detach().numpy() for k, v in extra.items()})
    for key, value in record.items():
      out.setdefault(key, []).append(np.asarray(value))
  return {k: np.stack(v) for k, v in out.items()}


def reference_class_weights(counts: np.ndarray, learned: np.ndarray, *, volume: float, eta_scale: float,
                            eta_margin: float, tau: float = 1.5, sample: np.ndarray | None = None
                            ) -> dict[str, np.ndarray]:
  """The code's per-class quantities for counts n [N] and learned similarities S [N] (float32 values).

  Returns threshold32 / w32 [N] (its float64 values cast to float32, as its comparisons and weights do) and,
  for the classes in `sample` (default: all), informative32 (ones + w[c]) and negative32
  (ones / max(1.0, E[c])) computed per class with 0-d float64 operands, as the code's loops do.
  """
  ref = TorchProxyISA(len(counts), 4, 8, volume=volume, eta_scale=eta_scale, eta_margin=eta_margin, tau=tau)
  ref.set_counts(counts)
  ref.learned = torch.tensor(np.asarray(learned, np.float32), dtype=torch.float64)
  q = ref.class_quantities()
  sample = np.arange(len(counts)) if sample is None else np.asarray(sample)
  ones = torch.ones(1)
  return {"threshold32": q["threshold"].float().numpy(), "w32": q["w"].float().numpy(),
          "informative32": np.float32([(ones + q["w"][c]).item() for c in sample]),
          "negative32": np.float32([(ones / max(1.0, ref.effective[c])).item() for c in sample])}


def reference_queue(pushes: list[tuple[np.ndarray, np.ndarray]], *, capacity: int, dim: int,
                    ring_buffer: bool = False) -> dict[str, np.ndarray]:
  """The code's queue after each push of (features [q, dim] float32, labels [q]); an empty push is skipped.

  Returns features [P, capacity, dim], labels [P, capacity], pointer [P] and read_rows [P] (rows a read
  returns) after each push.
  """
  memory = TorchMemory(capacity, dim, ring_buffer)
  out: dict[str, list] = {"features": [], "labels": [], "pointer": [], "read_rows": []}
  for features, labels in pushes:
    if len(labels):
      memory.push(torch.tensor(np.asarray(features, np.float32)), torch.tensor(np.asarray(labels), dtype=torch.long))
    out["features"].append(memory.features.numpy().copy())
    out["labels"].append(memory.labels.numpy().copy())
    out["pointer"].append(memory.pointer)
    out["read_rows"].append(len(memory.read()[1]))
  return {k: np.asarray(v) for k, v in out.items()}
