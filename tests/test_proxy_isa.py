"""Proxy-ISA's loss, class state and memory against a torch re-creation of the authors' code
(tests/proxy_isa_torch.py, its results committed in tests/references/proxy_isa: `ref` fixture, every input
seeded numpy) and against numbers produced by running that code itself (`rioyokotalab/ProxyISA` at commit
8a3597b, code/losses.py + code/memory.py on CPU, with `.cuda()` dropped and `torch.exp(-self.tau)` ->
`math.exp(-self.tau)`, the one change it needs to run): tests/data/proxy_isa_authors_8a3597b.npz."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax.losses import proxy_isa as isa_loss
from dml_jax.losses.ops import l2_normalize
from dml_jax.losses.pairwise import cosine_similarity
from dml_jax.methods import proxy_isa


def torch_steps(inputs: dict, **kwargs):
  """`compute` for `ref`: the re-creation over the steps of `inputs` (torch is imported only here)."""
  def compute():
    from proxy_isa_torch import reference_steps
    return reference_steps(inputs, **kwargs)
  return compute

GOLDEN = pathlib.Path(__file__).parent / "data" / "proxy_isa_authors_8a3597b.npz"

# Scenario A: small V so that E saturates within a few steps (w < 1, 1/E weights), h = 1 so that S is large
# enough for the filter to catch the anti-aligned samples; 10 steps over both switches; T = 40 with batches
# of 12 wraps the queue at step 6.
SCENARIO_A = dict(seed=0, steps=10, num_classes=7, dim=16, batch=12)
SWITCHES_A = [(False, False)] * 3 + [(True, False)] * 2 + [(True, True)] * 5
HPARAMS_A = dict(volume=4.0, eta_scale=0.9, eta_margin=0.1, hardness_scale=1.0)
MEMORY_A = 40
# Scenario B: the recipe's constants (V 100, h 0.15, k 0.4 as Cars) from counts spread over E's range and
# learned similarities of the size the memory gives.
SCENARIO_B = dict(seed=1, steps=6, num_classes=9, dim=32, batch=16)
SWITCHES_B = [(False, False)] + [(True, False)] + [(True, True)] * 4
HPARAMS_B = dict(volume=100.0, eta_scale=0.4, eta_margin=0.1, hardness_scale=0.15)
MEMORY_B = 48
COUNTS_B = [0, 3, 50, 200, 320, 400, 1000, 5000, 12]


def scenario_inputs(seed: int, *, steps: int, num_classes: int, dim: int, batch: int) -> dict[str, np.ndarray]:
  """Per step: proxies drifting from an N(0, 2/C) draw, labels (class 0 always present), unit embeddings
  near their class's proxy, a quarter of them anti-aligned (future outliers). float32 / int32."""
  rng = np.random.default_rng(seed)
  base = rng.normal(0.0, np.sqrt(2.0 / num_classes), (num_classes, dim))
  xs, labels, proxies = [], [], []
  for t in range(steps):
    p = base + 0.05 * t * rng.normal(0.0, np.sqrt(2.0 / num_classes), base.shape)
    y = rng.integers(0, num_classes, batch)
    y[0] = 0
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    sign = np.where(rng.random(batch) < 0.25, -0.8, 1.0)
    x = sign[:, None] * pn[y] + 2.4 * rng.normal(size=(batch, dim)) / np.sqrt(dim)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    xs.append(x.astype(np.float32))
    labels.append(y.astype(np.int32))
    proxies.append(p.astype(np.float32))
  return {"x": np.stack(xs), "labels": np.stack(labels), "proxies": np.stack(proxies)}


def scenario_b_inputs() -> dict[str, np.ndarray]:
  inputs = scenario_inputs(**SCENARIO_B)
  learned = np.random.default_rng(5).uniform(-0.15, 0.15, SCENARIO_B["num_classes"]).astype(np.float32)
  learned[0] = 1.0  # a class not seen since the memory started
  inputs["initial_learned"] = learned.astype(np.float64)
  return inputs


def settings_of(hparams: dict, ring_buffer: bool = False) -> proxy_isa.ISASettings:
  return proxy_isa.ISASettings(alpha=32.0, margin=0.1, eta_scale=hparams["eta_scale"],
                               eta_margin=hparams["eta_margin"], hardness_scale=hparams["hardness_scale"],
                               ring_buffer=ring_buffer, tables=isa_loss.count_tables(hparams["volume"], 1.5))


@functools.cache
def _jitted_step(hparams: tuple, ring_buffer: bool):
  settings = settings_of(dict(hparams), ring_buffer)

  @functools.partial(jax.jit, static_argnums=(5, 6))
  def step(x, labels, proxies, classes, memory, memory_on, filter_on):
    weights = isa_loss.class_weights(classes["count"], classes["similarity"], settings.tables,
                                     eta_scale=settings.eta_scale, eta_margin=settings.eta_margin)
    cos = cosine_similarity(x, l2_normalize(proxies))
    positive = labels[:, None] == jnp.arange(proxies.shape[0])[None]
    pair = isa_loss.pair_weights(cos, positive, weights, filter_on=filter_on)

    def loss_of(x, proxies):
      return proxy_isa.isa_step(x, labels, proxies, classes, memory, settings, memory_on=memory_on,
                                filter_on=filter_on)

    (loss, (metrics, new_classes, new_memory)), (gx, gp) = jax.value_and_grad(loss_of, (0, 1), has_aux=True)(
        x, proxies)
    return loss, gx, gp, metrics, new_classes, new_memory, weights, pair

  return step


def run_ours(inputs: dict, *, memory_size: int, switches, hparams: dict, initial_counts=None,
             ring_buffer: bool = False) -> dict[str, np.ndarray]:
  """dml_jax's `isa_step` over the steps of `inputs`, recorded with the keys of `reference_steps`."""
  steps, _, dim = inputs["x"].shape
  num_classes = inputs["proxies"].shape[1]
  settings = settings_of(hparams, ring_buffer)
  tables = settings.tables
  counts = np.zeros(num_classes, np.int32) if initial_counts is None else np.asarray(initial_counts, np.int32)
  classes = {"count": jnp.asarray(counts),
             "similarity": jnp.asarray(np.float32(inputs.get("initial_learned", np.ones(num_classes))))}
  memory = proxy_isa.init_memory(memory_size, dim)
  step = _jitted_step(tuple(sorted(hparams.items())), ring_buffer)
  out: dict[str, list] = {}
  for t in range(steps):
    loss, gx, gp, metrics, classes, memory, weights, pair = step(
        jnp.asarray(inputs["x"][t]), jnp.asarray(inputs["labels"][t]), jnp.asarray(inputs["proxies"][t]), classes,
        memory, *switches[t])
    n = np.asarray(classes["count"])
    record = {"loss": loss, "grad_x": gx, "grad_proxies": gp, "counts": n.astype(np.float64),
              "effective": tables.effective_number[np.minimum(n, tables.saturation)],
              "learned": np.asarray(classes["similarity"]).astype(np.float64), "memory_features": memory["features"],
              "memory_labels": memory["labels"], "memory_pointer": memory["pointer"], "weights": pair,
              "threshold32": weights.threshold, "w32": weights.weight,
              "pos_weight_sum": metrics["isa/pos_weight_sum"], "neg_weight_sum": metrics["isa/neg_weight_sum"],
              "outliers": metrics["isa/outliers"]}
    for key, value in record.items():
      out.setdefault(key, []).append(np.asarray(value))
  return {k: np.stack(v) for k, v in out.items()}


def assert_steps_match(ours: dict, expected: dict, *, exact_weights: bool = True) -> None:
  """Loss and gradients to 1e-5 (relative to each step's largest entry), counts, E and memory exactly, S to
  float32 rounding of a mean of cosines (1e-7: the per-class sum over memory rows runs in another order)."""
  np.testing.assert_allclose(ours["loss"], expected["loss"], rtol=1e-5)
  for key in ("grad_x", "grad_proxies"):
    for t in range(len(expected[key])):
      scale = np.abs(expected[key][t]).max()
      np.testing.assert_allclose(ours[key][t], expected[key][t], rtol=0, atol=1e-5 * scale, err_msg=f"{key} step {t}")
  for key in ("counts", "effective", "memory_features", "memory_labels", "memory_pointer"):
    np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
  np.testing.assert_allclose(ours["learned"], expected["learned"], rtol=1e-6, atol=1e-7)
  if exact_weights:
    np.testing.assert_array_equal(ours["weights"], expected["weights"])
    np.testing.assert_array_equal(ours["w32"], expected["w32"])
    np.testing.assert_array_equal(ours["outliers"], expected["outlier"].sum(axis=1))
  # O is exact given S (test_thresholds_and_weights_are_the_code_float64_values_rounded); S differs by its
  # rounding, which moves O by as much.
  np.testing.assert_allclose(ours["threshold32"], expected["threshold32"], rtol=0, atol=2e-7)
  np.testing.assert_allclose(ours["pos_weight_sum"], expected["pos_weight_sum"], rtol=1e-6)
  np.testing.assert_allclose(ours["neg_weight_sum"], expected["neg_weight_sum"], rtol=1e-6)


# -- the loss, the class state and the memory over steps ---------------------------------------------------


@pytest.fixture(scope="module")
def scenario_a(ref):
  inputs = scenario_inputs(**SCENARIO_A)
  expected = ref("proxy_isa/scenario_a",
                 torch_steps(inputs, memory_size=MEMORY_A, switches=SWITCHES_A, **HPARAMS_A))
  ours = run_ours(inputs, memory_size=MEMORY_A, switches=SWITCHES_A, hparams=HPARAMS_A)
  return inputs, expected, ours


def test_steps_over_both_switches_match_the_torch_reference(scenario_a):
  inputs, expected, ours = scenario_a
  assert_steps_match(ours, expected)
  # What the scenario covers: memory off (0-2), memory without filter (3-4), both (5-9); the queue wraps
  # (last-rows write, pointer back to 0) at step 6; outliers from step 7; every kind of positive weight.
  np.testing.assert_array_equal(expected["memory_pointer"], [0, 0, 0, 12, 24, 36, 0, 11, 21, 31])
  assert expected["outlier"][:7].sum() == 0 and expected["outlier"][7:].sum() >= 4
  assert not np.any(expected["memory_labels"][:3]) and np.all(expected["learned"][:3] == 1.0)
  # Outliers are counted out of n and kept out of the memory, yet stay in the loss.
  kept = ~expected["outlier"][8]
  labels = inputs["labels"][8]
  np.testing.assert_array_equal(expected["counts"][8] - expected["counts"][7], np.bincount(labels[kept], minlength=7))
  np.testing.assert_array_equal(expected["memory_features"][8][11:21], inputs["x"][8][kept])
  positive = labels[:, None] == np.arange(7)[None]
  w = expected["w32"][8][labels]
  pos_weights = expected["weights"][8][positive]
  assert set(np.unique(pos_weights)) >= {w[expected["outlier"][8]][0]}
  assert np.any(pos_weights > 1.0) and np.any(pos_weights < 1.0)  # 1 + w (informative) and w
  assert np.any(expected["weights"][8][~positive] < 1.0)  # 1 / E for far negatives


def test_recipe_constants_from_spread_counts_match_the_torch_reference(ref):
  inputs = scenario_b_inputs()
  expected = ref("proxy_isa/scenario_b", torch_steps(inputs, memory_size=MEMORY_B, switches=SWITCHES_B,
                                                      initial_counts=COUNTS_B, **HPARAMS_B))
  ours = run_ours(inputs, memory_size=MEMORY_B, switches=SWITCHES_B, hparams=HPARAMS_B, initial_counts=COUNTS_B)
  assert_steps_match(ours, expected)
  assert expected["outlier"].sum() >= 5 and expected["memory_pointer"][4] == 0  # outliers and a wrap
  # The class weight is 1 while E is far from V, and w_base ~ 0.18 once E has saturated (n = 5000).
  assert expected["w32"][0][0] == 1.0 and abs(expected["w32"][0][7] - 1 / (1 + np.log(1 + 100 - 1e-13))) < 1e-6


def test_authors_code_numbers(scenario_a):
  """The values the authors' own code computed on scenario A (see the module docstring): the re-creation
  equals them to float32 rounding (bit for bit on the Intel CPU that ran both; torch's CPU kernels round
  differently on an AVX2-only AMD one, by ~1e-7 relative), dml_jax to the tolerances of `assert_steps_match`."""
  inputs, expected, ours = scenario_a
  golden = dict(np.load(GOLDEN))
  for key in ("x", "labels", "proxies"):
    np.testing.assert_array_equal(golden[key], inputs[key])
  for key in ("loss", "grad_x", "grad_proxies", "counts", "effective", "learned", "memory_labels",
              "memory_pointer"):
    np.testing.assert_allclose(expected[key], golden[key], rtol=1e-6, atol=1e-6,
                               err_msg=f"re-creation vs the authors' code: {key}")
  assert_steps_match(ours, {**expected, **{k: golden[k] for k in golden if k in expected}}, exact_weights=False)


def test_thresholds_and_weights_are_the_code_float64_values_rounded(ref):
  """O, w, 1 + w and 1 / max(1, E) for 6,000 classes (every count to 4,000, random ones beyond, random learned
  similarities) at three settings equal the code's float64 arithmetic (torch) rounded as its comparisons and
  casts do, bit for bit."""
  rng = np.random.default_rng(0)
  num = 6000
  counts = np.concatenate([np.arange(0, 4000), rng.integers(4000, 20_000, num - 4000)]).astype(np.int32)
  learned = np.concatenate([[1.0] * 100, rng.uniform(-0.2, 0.2, num - 1100),
                            rng.uniform(-1, 1, 1000)]).astype(np.float32)
  rng.shuffle(learned)
  sample = np.linspace(0, num - 1, 1500).astype(int)  # the per-class torch loop is slow
  for volume, k in ((100.0, 0.9), (100.0, 0.1), (7.0, 0.4)):
    tables = isa_loss.count_tables(volume, 1.5)
    weights_of = functools.partial(isa_loss.class_weights, tables=tables, eta_scale=k, eta_margin=0.1)
    ours = jax.jit(weights_of)(jnp.asarray(counts), jnp.asarray(learned))

    def compute(volume=volume, k=k):
      from proxy_isa_torch import reference_class_weights
      return reference_class_weights(counts, learned, volume=volume, eta_scale=k, eta_margin=0.1, sample=sample)

    expected = ref(f"proxy_isa/class_weights_v{volume:g}_k{k:g}", compute)
    np.testing.assert_array_equal(np.asarray(ours.threshold), expected["threshold32"])
    np.testing.assert_array_equal(np.asarray(ours.weight), expected["w32"])
    np.testing.assert_array_equal(np.asarray(ours.informative_weight)[sample], expected["informative32"])
    np.testing.assert_array_equal(np.asarray(ours.negative_weight)[sample], expected["negative32"])
    np.testing.assert_array_equal(np.asarray(ours.similarity), learned)
  assert 3000 < isa_loss.count_tables(100.0, 1.5).saturation < 4000


# -- the memory queue --------------------------------------------------------------------------------------


def _push(memory, rows, labels, keep=None, ring_buffer=False):
  feats = jnp.asarray(np.asarray(rows, np.float32).reshape(len(labels), -1))
  keep = np.ones(len(labels), bool) if keep is None else np.asarray(keep)
  return proxy_isa.enqueue(memory, feats, jnp.asarray(labels, jnp.int32), jnp.asarray(keep), ring_buffer=ring_buffer)


@pytest.mark.parametrize("ring_buffer", [False, True])
def test_queue_matches_the_code_on_random_pushes(ring_buffer, ref):
  rng = np.random.default_rng(3)
  batches = []
  for _ in range(40):
    b = int(rng.integers(1, 7))
    batches.append((rng.normal(size=(b, 2)).astype(np.float32), rng.integers(0, 4, b), rng.random(b) < 0.7))

  def compute():
    from proxy_isa_torch import reference_queue
    return reference_queue([(f[keep], y[keep]) for f, y, keep in batches], capacity=10, dim=2,
                           ring_buffer=ring_buffer)

  expected = ref(f"proxy_isa/queue_{'ring' if ring_buffer else 'code'}", compute)
  ours = proxy_isa.init_memory(10, 2)
  for t, (feats, labels, keep) in enumerate(batches):
    ours = _push(ours, feats, labels, keep, ring_buffer)
    np.testing.assert_array_equal(np.asarray(ours["features"]), expected["features"][t])
    np.testing.assert_array_equal(np.asarray(ours["labels"]), expected["labels"][t])
    assert int(ours["pointer"]) == expected["pointer"][t]
    readable = np.asarray(proxy_isa.readable_rows(ours, ring_buffer=ring_buffer))
    assert readable.sum() == expected["read_rows"][t] and np.all(readable[:expected["read_rows"][t]])
  assert expected["pointer"].min() == 0 and len(set(expected["read_rows"].tolist())) > 3


def test_queue_overflow_writes_the_last_rows_and_class_zero_reads_as_not_full():
  memory = proxy_isa.init_memory(10, 1)
  memory = _push(memory, [1, 2, 3, 4], [1, 1, 2, 2])
  memory = _push(memory, [5, 6, 7, 8], [3, 3, 3, 3])
  assert int(memory["pointer"]) == 8
  np.testing.assert_array_equal(np.asarray(proxy_isa.readable_rows(memory)), [1] * 8 + [0] * 2)
  # 8 + 3 > 10: the three rows go to slots 7, 8, 9 (overwriting row 7), the pointer returns to 0.
  memory = _push(memory, [9, 10, 11], [4, 4, 5])
  np.testing.assert_array_equal(np.asarray(memory["features"])[:, 0], [1, 2, 3, 4, 5, 6, 7, 9, 10, 11])
  np.testing.assert_array_equal(np.asarray(memory["labels"]), [1, 1, 2, 2, 3, 3, 3, 4, 4, 5])
  assert int(memory["pointer"]) == 0
  assert np.all(proxy_isa.readable_rows(memory))  # last label 5 != 0: full, all ten rows
  # The same wrap with class 0 in the last row: "not full", and the pointer is 0, so nothing is readable.
  quirk = _push(_push(_push(proxy_isa.init_memory(10, 1), [1, 2, 3, 4], [1, 1, 2, 2]), [5, 6, 7, 8], [3, 3, 3, 3]),
                [9, 10, 11], [4, 4, 0])
  assert not np.any(proxy_isa.readable_rows(quirk))
  # The fix: a true ring buffer wraps (slots 8, 9, 0) and reads every row written.
  ring = proxy_isa.init_memory(10, 1)
  for feats, labels in (([1, 2, 3, 4], [1, 1, 2, 2]), ([5, 6, 7, 8], [3, 3, 3, 3]), ([9, 10, 11], [4, 4, 0])):
    ring = _push(ring, feats, labels, ring_buffer=True)
  np.testing.assert_array_equal(np.asarray(ring["features"])[:, 0], [11, 2, 3, 4, 5, 6, 7, 8, 9, 10])
  assert int(ring["pointer"]) == 1 and np.all(proxy_isa.readable_rows(ring, ring_buffer=True))
  with pytest.raises(ValueError, match="does not fit"):
    _push(proxy_isa.init_memory(3, 1), [1, 2, 3, 4], [1, 1, 1, 1])


def test_class_zero_in_the_last_row_leaves_the_learned_similarity_unchanged(ref):
  """Through a whole step: after a wrap that ends on class 0 the code reads an empty memory, so no class of
  the batch gets a new S; with the ring buffer every class of the batch does. Both as the re-creation."""
  hparams = dict(volume=100.0, eta_scale=0.9, eta_margin=0.1, hardness_scale=0.15)
  rng = np.random.default_rng(7)
  proxies = rng.normal(size=(2, 4, 8)).astype(np.float32)
  x = rng.normal(size=(2, 6, 8))
  x = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  labels = np.array([[1, 2, 3, 1, 2, 3], [3, 1, 2, 3, 2, 0]], np.int32)  # the second batch ends on class 0
  inputs = {"x": x, "labels": labels, "proxies": proxies}
  switches = [(True, False)] * 2
  for ring_buffer in (False, True):
    expected = ref(f"proxy_isa/class_zero_{'ring' if ring_buffer else 'code'}",
                   torch_steps(inputs, memory_size=9, switches=switches, ring_buffer=ring_buffer, **hparams))
    ours = run_ours(inputs, memory_size=9, switches=switches, hparams=hparams, ring_buffer=ring_buffer)
    assert_steps_match(ours, expected)
    if ring_buffer:
      assert np.all(expected["learned"][1] != expected["learned"][0])
    else:
      assert expected["memory_pointer"][1] == 0 and expected["memory_labels"][1][-1] == 0
      np.testing.assert_array_equal(expected["learned"][1], expected["learned"][0])


def test_a_batch_of_outliers_only_enqueues_nothing(ref):
  """The code crashes here (an empty float index tensor); defined as an empty enqueue: memory and counts
  unchanged, S recomputed from the memory as it stands, the loss as usual."""
  hparams = dict(volume=100.0, eta_scale=0.9, eta_margin=0.1, hardness_scale=0.15)
  inputs = scenario_inputs(2, steps=2, num_classes=5, dim=8, batch=6)
  p = inputs["proxies"][1]
  # Step 1: every sample opposite its proxy (cos -1), below any threshold (O > -0.4 for |S| <= 0.15).
  inputs["x"][1] = -(p / np.linalg.norm(p, axis=1, keepdims=True))[inputs["labels"][1]]
  counts = [4000] * 5  # E saturated
  switches = [(True, False), (True, True)]
  expected = ref("proxy_isa/all_outliers", torch_steps(inputs, memory_size=20, switches=switches,
                                                       initial_counts=counts, **hparams))
  ours = run_ours(inputs, memory_size=20, switches=switches, hparams=hparams, initial_counts=counts)
  assert expected["outlier"][1].all()
  assert_steps_match(ours, expected)
  np.testing.assert_array_equal(ours["memory_features"][1], ours["memory_features"][0])
  np.testing.assert_array_equal(ours["counts"][1], ours["counts"][0])
  assert np.isfinite(ours["loss"]).all()
