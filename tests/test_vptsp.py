"""VPTSP-G on a tiny ViT against references written here from the paper and its official code (torch / numpy).

The torch reference follows the official code's structure (prompts in front of the cls token, the
`Simple_GRUCell` gate convention, the container update, the `both_all` Proxy-Anchor normaliser) on a timm
ViT holding the same weights; it never calls dml_jax's method or loss code. Its results come from
tests/references (`ref` fixture); every input is seeded numpy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import live
import ml_collections
import numpy as np
import pytest
from seeded import timm_vit_state_dict

from dml_jax import losses, methods
from dml_jax import pytree as tree_lib
from dml_jax.backbones import get_entry
from dml_jax.backbones.registry import get_pretrained_cfg
from dml_jax.convert import vit as convert_vit
from dml_jax.convert.state_dict_reader import StateDictReader
from dml_jax.convert.weights_dir import write_weights_dir
from dml_jax.methods import HostBatch, StepInfo, vptsp
from dml_jax.train import optim
from dml_jax.train.config import check_config, default_config

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
EMBED, CLASSES, K = 48, 6, 2
LABELS = np.array([0, 0, 3, 3, 1, 1, 5, 5], np.int32)  # classes 2 and 4 absent: they still count in 1/C


def tiny_config(weights: str = "", **method) -> ml_collections.ConfigDict:
  c = default_config()
  c.method = methods.method_config("vptsp")
  c.method.update(dict(num_prompts=4, prompt_depth=2, prompt_block_step=1, num_class_prompts=3, class_prompt_depth=2,
                       class_prompt_block_step=1, proxy_bias_ratio=0.3, semantic_mix="gru_relu", rnn_dropout=0.0,
                       memory_bank=False))
  c.method.loss.pos_normalizer = "all"
  c.method.unlock()
  c.method.update(method)
  c.model.backbone = "vit_small_patch16_224"
  c.model.backbone_overrides = ml_collections.ConfigDict(TINY)
  c.model.embedding_dim = EMBED
  c.model.weights = weights
  c.data.sampler = "m_per_class"
  c.data.batch_size = len(LABELS)
  c.data.samples_per_class = K
  return c


def _released_config():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "vptsp_cub_vits.py"
  spec = importlib.util.spec_from_file_location("vptsp_cub_vits", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _tiny_sd() -> dict[str, np.ndarray]:
  # Non-zero biases and LayerNorms, so that every tensor matters.
  return timm_vit_state_dict(0, **TINY)


def write_timm_weights(sd: dict[str, np.ndarray], out) -> str:
  """The timm state dict converted to a weights directory (what convert_timm_weights.py writes)."""
  arch = {**get_entry("vit_small_patch16_224").arch, **TINY}
  flat = convert_vit.from_torch(StateDictReader(sd, "test"), arch)
  write_weights_dir(out, model_name="vit_small_patch16_224", family="vit", arch=arch, flat=flat,
                    pretrained_cfg=get_pretrained_cfg("vit_small_patch16_224.augreg_in21k"), source="test",
                    dropped_keys=[])
  return str(out)


def _images(seed: int = 0, num: int = len(LABELS)) -> np.ndarray:
  return np.random.RandomState(seed).randn(num, 32, 32, 3).astype(np.float32)


# -- torch reference, from the authors' code ------------------------------------------------------------------


def torch_reference(tm, flat: dict, semantic: np.ndarray, images: np.ndarray, labels: np.ndarray, opts: dict):
  """Loss, new S and gradients of one VPTSP step, as the official code computes them.

  opts: k (samples per class), semantic_mix ('gru_relu' | 'gru' | 'mix'), alpha, keep (the EMA's lambda) and,
  for the GRU, optional `masks`: k keep-masks [B/k, E] of the code's `nn.Dropout(rnn_dropout)` after each GRU
  step (training mode: kept entries scaled by 1 / (1 - p)), with `dropout` = p.
  """
  import torch
  import torch.nn.functional as F

  def _t(x, grad=True):
    return torch.tensor(np.asarray(x), requires_grad=grad)

  for name, p in tm.named_parameters():
    p.requires_grad_("bias" in name)  # BitFit
    p.grad = None
  leaf = {k: _t(v) for k, v in flat.items() if not k.startswith("model/backbone/")}
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  y = torch.from_numpy(labels).long()
  tokens = tm.norm_pre(tm._pos_embed(tm.patch_embed(x)))

  def blocks(t, prompts):  # the code's _forward_vpt_block: prompts in front of cls, outputs dropped
    for i, blk in enumerate(tm.blocks):
      if i in prompts:
        n = prompts[i].shape[1]
        t = blk(torch.cat([prompts[i], t], dim=1))[:, n:]
      else:
        t = blk(t)
    return tm.norm(t)[:, 0]

  def head(prefix, feats):
    feats = F.layer_norm(feats, (feats.shape[-1],), leaf[f"{prefix}fc_norm/scale"], leaf[f"{prefix}fc_norm/bias"],
                         eps=1e-5)
    return F.normalize(feats @ leaf[f"{prefix}head/kernel"] + leaf[f"{prefix}head/bias"], dim=-1)

  b = len(labels)
  task = {i: leaf[f"model/task_prompts/{i}"].unsqueeze(0).expand(b, -1, -1)
          for i in range(2) if f"model/task_prompts/{i}" in leaf}
  emb = head("model/", blocks(tokens, task))
  cls = {i: leaf[f"model/proxy_net/class_prompts/{i}"][y] for i in range(2)
         if f"model/proxy_net/class_prompts/{i}" in leaf}
  p = head("model/proxy_net/", blocks(tokens, cls))

  k = opts["k"]
  u = y[::k]
  container = torch.tensor(semantic)
  per_class = p.view(b // k, k, -1)
  if opts["semantic_mix"] == "mix":
    pc = opts["keep"] * container[u] + (1 - opts["keep"]) * per_class.mean(dim=1)
  else:
    g = {n: leaf[f"model/proxy_net/gru/{n}"] for n in ("W_ir", "W_hr", "b_ir", "W_iz", "W_hz", "b_iz", "W_in",
                                                        "W_hn", "b_in")}
    h = container[u]
    for j in range(k):
      xj = per_class[:, j]
      z = torch.sigmoid(xj @ g["W_iz"] + h @ g["W_hz"] + g["b_iz"])
      r = torch.sigmoid(xj @ g["W_ir"] + h @ g["W_hr"] + g["b_ir"])
      pre = xj @ g["W_in"] + r * (h @ g["W_hn"]) + g["b_in"]
      n = torch.tanh(pre) if opts["semantic_mix"] == "gru" else F.relu(pre)  # 'gru': the tanh candidate
      h = (1 - z) * n + z * h  # z keeps the old state (the code's convention)
      if opts.get("masks") is not None:  # the cell's output dropout, every step, the injected mask
        h = h * torch.from_numpy(np.asarray(opts["masks"][j], np.float32)) / (1 - opts["dropout"])
    pc = h
  container = container.clone()
  container[u] = pc
  container = F.normalize(container, dim=-1)
  a = opts["alpha"]
  proxies = F.normalize(leaf["model/proxy_bias"] * a + container * (1 - a), dim=-1)

  # The code's both_all mode: both terms are divided by C, the number of ALL classes.
  sims = F.normalize(emb, dim=-1) @ proxies.T  # [B, C]
  pos = F.one_hot(y, proxies.shape[0]).bool()
  num_classes = proxies.shape[0]
  pos_sum = torch.where(pos, torch.exp(-32 * (sims - 0.1)), torch.zeros_like(sims)).sum(0)
  neg_sum = torch.where(~pos, torch.exp(32 * (sims + 0.1)), torch.zeros_like(sims)).sum(0)
  present = pos.any(0)
  loss_pos = torch.where(present, torch.log1p(pos_sum), torch.zeros_like(pos_sum)).sum() / num_classes
  loss_neg = torch.log1p(neg_sum).sum() / num_classes
  loss = loss_pos + loss_neg
  loss.backward()
  grads = {k: v.grad.numpy() for k, v in leaf.items()}
  for name, prm in tm.named_parameters():
    if prm.grad is not None:
      grads[name] = prm.grad.numpy()
  return float(loss.detach()), container.detach().numpy(), grads


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  weights = write_timm_weights(_tiny_sd(), tmp_path_factory.mktemp("weights"))
  method = methods.build(tiny_config(weights=weights), num_classes=CLASSES)
  params, state = method.init(jax.random.key(0))
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p, s, b: method.loss_fn(p, s, b, jax.random.key(1), StepInfo(jnp.int32(0), jnp.int32(0))),
      has_aux=True))
  return method, params, state, None, value_and_grad, weights


def _batch():
  return {"image": jnp.asarray(_images()), "label": jnp.asarray(LABELS)}


# -- tests ------------------------------------------------------------------------------------------------


def test_registered_and_layout(tiny):
  method, params, state, _, _, _ = tiny
  assert "vptsp" in methods.list_methods()
  flat = tree_lib.flatten(params)
  # N = 4, step 1: 4 prompts in block 0, 3 in block 1; m = 3, step 1: 3 and 2 class prompts.
  assert flat["model/task_prompts/0"].shape == (4, 64) and flat["model/task_prompts/1"].shape == (3, 64)
  assert flat["model/proxy_net/class_prompts/0"].shape == (CLASSES, 3, 64)
  assert flat["model/proxy_net/class_prompts/1"].shape == (CLASSES, 2, 64)
  assert flat["model/proxy_bias"].shape == (CLASSES, EMBED)
  assert flat["model/head/kernel"].shape == (64, EMBED)
  assert sorted(k for k in flat if "/gru/" in k) == sorted(
      f"model/proxy_net/gru/{n}" for n in ("W_ir", "W_hr", "b_ir", "W_iz", "W_hz", "b_iz", "W_in", "W_hn", "b_in"))
  semantic = np.asarray(state["semantic_proxies"])
  assert semantic.shape == (CLASSES, EMBED)
  np.testing.assert_allclose(np.linalg.norm(semantic, axis=1), 1.0, rtol=1e-6)
  # O = xavier_uniform / 8: every entry within sqrt(6 / (C + E)) / 8.
  assert np.abs(flat["model/proxy_bias"]).max() <= math.sqrt(6 / (CLASSES + EMBED)) / 8
  # The released configs' freezing rule keeps exactly the ViT biases trainable (BitFit, `'bias' in name`).
  rule = next(r for r in _released_config().optim.groups if r[1]["name"] == "frozen_vit")
  plan = optim.ParamPlan(ml_collections.ConfigDict(dict(optimizer="adamw", lr=1e-3, groups=(rule,))), list(flat))
  frozen = set(plan.groups(0).frozen)
  trainable_backbone = sorted(p for p in flat if p.startswith("model/backbone/") and p not in frozen)
  assert trainable_backbone and all(p.endswith("/bias") for p in trainable_backbone)
  assert "model/backbone/blocks/0/attn/qkv/kernel" in frozen and "model/backbone/pos_embed" in frozen
  assert "model/backbone/patch_embed/proj/bias" in trainable_backbone
  assert not any(p.startswith("model/backbone/") for p in set(flat) - frozen - set(trainable_backbone))


def _seeded_method_values(params, state, seed: int = 3):
  """The method's own parameters (outside the backbone) and S replaced by seeded numpy values of the same
  shapes, so that the reference's inputs do not depend on dml_jax's initialisers."""
  rng = np.random.default_rng(seed)
  flat = tree_lib.flatten(params)
  for path, value in flat.items():
    if path.startswith("model/backbone/"):
      continue
    noise = rng.standard_normal(value.shape)
    if path.endswith("fc_norm/scale"):
      noise = 1.0 + 0.1 * noise
    elif path.endswith("bias") or "/gru/b_" in path:
      noise = 0.1 * noise
    else:  # prompts, kernels, GRU matrices, the proxy bias O: about the scale of their xavier inits
      noise = noise / math.sqrt(max(value.shape[-1], 1))
    flat[path] = jnp.asarray(noise, value.dtype)
  semantic = rng.standard_normal(state["semantic_proxies"].shape)
  semantic /= np.linalg.norm(semantic, axis=1, keepdims=True)
  return (tree_lib.nest(flat, tree_lib.key_index(params)),
          {**state, "semantic_proxies": jnp.asarray(semantic, state["semantic_proxies"].dtype)})


def test_loss_state_and_gradients_match_torch_reference(tiny, ref):
  method, params, state, _, value_and_grad, _ = tiny
  params, state = _seeded_method_values(params, state)
  (loss, (metrics, new_state)), grads = value_and_grad(params, state, _batch())
  flat = {k: np.asarray(v) for k, v in tree_lib.flatten(params).items()}

  def compute():
    tm = live.timm_vit(_tiny_sd(), **TINY)
    ref_loss, ref_semantic, ref_grads = torch_reference(
        tm, flat, np.asarray(state["semantic_proxies"]), _images(), LABELS,
        dict(k=K, semantic_mix="gru_relu", alpha=0.3))
    return {"loss": ref_loss, "semantic": ref_semantic, **{f"grad:{k}": v for k, v in ref_grads.items()}}

  expected = ref("vptsp/tiny_step", compute)
  ref_loss, ref_semantic = float(expected["loss"]), expected["semantic"]
  ref_grads = {k[len("grad:"):]: v for k, v in expected.items() if k.startswith("grad:")}
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new_state["semantic_proxies"]), ref_semantic, atol=2e-6)
  # Only the batch's classes moved in S (the others are re-normalised unit rows: equal to 1 ulp).
  old = np.asarray(state["semantic_proxies"])
  np.testing.assert_allclose(np.asarray(new_state["semantic_proxies"])[[2, 4]], old[[2, 4]], rtol=0, atol=1e-7)
  assert np.abs(np.asarray(new_state["semantic_proxies"])[[0, 1, 3, 5]] - old[[0, 1, 3, 5]]).max(axis=1).min() > 1e-2
  assert "proxy_bias_norm" in metrics
  ours = {k: np.asarray(v) for k, v in tree_lib.flatten(grads).items()}
  checked = 0
  for path, ref in ref_grads.items():
    mine = ours[path if path.startswith("model/") else f"model/backbone/{_timm_to_ours(path)}"]
    if path.startswith("model/") and "kernel" not in path or not path.startswith("model/"):
      mine = mine.reshape(ref.shape)
    scale = max(np.abs(ref).max(), 1e-8)
    np.testing.assert_allclose(mine, ref, atol=2e-4 * scale, rtol=1e-3, err_msg=path)
    checked += 1
  assert checked == len(ref_grads) and checked > 30
  # Absent classes get no class-prompt gradient; the bias O gets one on every row (negatives).
  assert np.all(ours["model/proxy_net/class_prompts/0"][[2, 4]] == 0)
  assert np.all(np.abs(ours["model/proxy_bias"]).sum(axis=1) > 0)


# The semantic-proxy update in the recipes' other settings, each against the torch reference: the GRU's output
# dropout (SOP-S and In-Shop-S: rnn_dropout 0.1, SOP-B 0.5) with masks injected into both sides, one sample per
# class (k = 1: the SOP / In-Shop / iNaturalist samplers) and the tanh candidate (`semantic_mix='gru'`).
GRU_CASES = {
    "dropout_k2": dict(semantic_mix="gru_relu", labels=LABELS, k=K, dropout=0.5),
    "dropout_k1": dict(semantic_mix="gru_relu", labels=np.array([0, 3, 1, 5, 2], np.int32), k=1, dropout=0.1),
    "tanh_k2": dict(semantic_mix="gru", labels=LABELS, k=K, dropout=0.0),
}


@pytest.mark.parametrize("case", sorted(GRU_CASES))
def test_gru_dropout_k1_and_tanh_match_torch_reference(tiny, ref, case, monkeypatch):
  _, params, state, _, _, weights = tiny
  o = GRU_CASES[case]
  labels, k, p = o["labels"], o["k"], o["dropout"]
  c = tiny_config(weights=weights, semantic_mix=o["semantic_mix"], rnn_dropout=p)
  c.data.batch_size, c.data.samples_per_class = len(labels), k
  method = methods.build(c, num_classes=CLASSES)
  method.init(jax.random.key(0))
  params, state = _seeded_method_values(params, state)
  rows = len(labels) // k
  # Keep-masks for the k GRU steps, from seeded numpy; both sides apply exactly these (the method's own draws are
  # replaced), so the comparison checks that dropout acts after every step, with torch's 1 / (1 - p) scaling.
  masks = np.random.default_rng(7).random((k, rows, EMBED)) >= p
  if p > 0:
    assert 0 < masks.mean() < 1
    calls = iter(range(k))
    monkeypatch.setattr(jax.random, "bernoulli", lambda key, keep, shape: jnp.asarray(masks[next(calls)]))
  # Differentiated with respect to the GRU and the proxy bias only: the update under test is all after the
  # towers, so the ViT's backward (and its compile) is not needed.
  flat = tree_lib.flatten(params)
  wrt = {n: v for n, v in flat.items() if "/gru/" in n or n == "model/proxy_bias"}
  keys = tree_lib.key_index(params)
  batch = {"image": jnp.asarray(_images(num=len(labels))), "label": jnp.asarray(labels)}

  def loss_of(values):
    loss, (_, new_state) = method.loss_fn(tree_lib.nest({**flat, **values}, keys), state, batch, jax.random.key(1),
                                          StepInfo(jnp.int32(0), jnp.int32(0)))
    return loss, new_state

  (loss, new_state), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(wrt)
  numpy_flat = {n: np.asarray(v) for n, v in flat.items()}

  def compute():
    tm = live.timm_vit(_tiny_sd(), **TINY)
    ref_loss, ref_semantic, ref_grads = torch_reference(
        tm, numpy_flat, np.asarray(state["semantic_proxies"]), _images(num=len(labels)), labels,
        dict(k=k, semantic_mix=o["semantic_mix"], alpha=0.3, masks=masks if p > 0 else None, dropout=p))
    return {"loss": ref_loss, "semantic": ref_semantic, **{f"grad:{n}": ref_grads[n] for n in wrt}}

  expected = ref(f"vptsp/gru_{case}", compute)
  np.testing.assert_allclose(float(loss), float(expected["loss"]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new_state["semantic_proxies"]), expected["semantic"], atol=2e-6)
  for name, value in grads.items():
    want = expected[f"grad:{name}"]
    np.testing.assert_allclose(np.asarray(value), want, atol=2e-4 * max(np.abs(want).max(), 1e-8), rtol=1e-3,
                               err_msg=name)
  assert np.abs(expected["grad:model/proxy_net/gru/W_in"]).max() > 0


def _timm_to_ours(name: str) -> str:
  # BitFit biases: timm 'blocks.0.attn.qkv.bias' -> 'blocks/0/attn/qkv/bias' (LayerNorm 'weight' never trains).
  return name.replace(".", "/")


def test_memory_bank_buffers_give_the_dense_loss_and_row_gradients(tiny):
  method, params, state, _, value_and_grad, weights = tiny
  bank_method = methods.build(tiny_config(weights=weights, memory_bank=True), num_classes=CLASSES)
  bank_params, _ = bank_method.init(jax.random.key(0))
  tables = bank_method.host_state().tables
  assert sorted(tables) == ["class_prompts_00", "class_prompts_01"]
  assert tables["class_prompts_01"].row_shape == (2, 64) and tables["class_prompts_01"].num_rows == CLASSES
  rows = bank_method.batch_rows(HostBatch(label=LABELS, index=np.arange(len(LABELS))))
  np.testing.assert_array_equal(rows, [0, 3, 1, 5])
  with pytest.raises(ValueError, match="contiguous"):
    bank_method.batch_rows(HostBatch(label=np.array([0, 3, 0, 3, 1, 1, 5, 5]), index=np.arange(8)))
  flat = tree_lib.flatten(params)
  bank_flat = tree_lib.flatten(bank_params)
  buffers = {}
  for path in bank_flat:
    if "class_prompt_rows" in path:
      buffers[path] = flat[f"model/proxy_net/class_prompts/{path.rsplit('/', 1)[1]}"][rows]
    else:
      bank_flat[path] = flat[path]
  keys = tree_lib.key_index(bank_params)

  def bank_loss(buffer_values):  # differentiated w.r.t. the buffers only: half the compile of a full step
    p = tree_lib.nest({**bank_flat, **buffer_values}, keys)
    return bank_method.loss_fn(p, state, _batch(), jax.random.key(1), StepInfo(jnp.int32(0), jnp.int32(0)))[0]

  loss_value, bank_grads = jax.jit(jax.value_and_grad(bank_loss))(buffers)
  (loss, _), grads = value_and_grad(params, state, _batch())
  np.testing.assert_allclose(float(loss_value), float(loss), rtol=1e-6)
  g = tree_lib.flatten(grads)
  for layer in ("0", "1"):
    dense_rows = np.asarray(g[f"model/proxy_net/class_prompts/{layer}"])[rows]
    np.testing.assert_allclose(np.asarray(bank_grads[f"model/proxy_net/class_prompt_rows/{layer}"]), dense_rows,
                               rtol=1e-4, atol=1e-5 * np.abs(dense_rows).max())  # same math, other fusions
  # Table init: the code's xavier_normal_ std on (C, m, D).
  table = tables["class_prompts_00"].init(np.random.default_rng(0))
  assert table.shape == (CLASSES, 3, 64) and table.dtype == np.float32
  assert abs(table.std() / math.sqrt(2 / ((3 + CLASSES) * 64)) - 1) < 0.1


def test_gru_cell_matches_the_spec_formulas():
  cell = vptsp.SimpleGRUCell(5, rngs=__import__("flax").nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for name in ("b_ir", "b_iz", "b_in"):
    getattr(cell, name)[...] = jnp.asarray(rng.normal(size=5), jnp.float32)
  x, h = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  w = {n: np.asarray(getattr(cell, n)[...], np.float64) for n in ("W_ir", "W_hr", "b_ir", "W_iz", "W_hz", "b_iz",
                                                                  "W_in", "W_hn", "b_in")}
  sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
  z = sig(x @ w["W_iz"] + h @ w["W_hz"] + w["b_iz"])
  r = sig(x @ w["W_ir"] + h @ w["W_hr"] + w["b_ir"])
  n = np.maximum(x @ w["W_in"] + r * (h @ w["W_hn"]) + w["b_in"], 0)
  np.testing.assert_allclose(np.asarray(cell(jnp.asarray(x), jnp.asarray(h))), (1 - z) * n + z * h, atol=1e-5)
  # The gate convention: a saturated z keeps the old state.
  cell.b_iz[...] = jnp.full((5,), 50.0)
  np.testing.assert_allclose(np.asarray(cell(jnp.asarray(x), jnp.asarray(h))), h, atol=1e-6)
  # xavier-uniform kernels within sqrt(6 / (E + E)), zero biases at init.
  fresh = vptsp.SimpleGRUCell(5, rngs=__import__("flax").nnx.Rngs(1))
  assert np.abs(np.asarray(fresh.W_hn[...])).max() <= math.sqrt(6 / 10)
  assert not np.any(np.asarray(fresh.b_in[...]))


def test_positive_normaliser_counts_all_classes():
  rng = np.random.default_rng(1)
  num_classes = 7
  emb = rng.normal(size=(6, 4))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  prox = rng.normal(size=(num_classes, 4))
  prox /= np.linalg.norm(prox, axis=1, keepdims=True)
  labels = np.array([0, 0, 2, 2, 5, 5])
  s = emb @ prox.T
  pos = labels[:, None] == np.arange(num_classes)[None]
  # both_all written out: sums over classes, BOTH divided by C = 7 (not by the 3 classes present).
  l_pos = sum(np.log1p(np.exp(-32 * (s[pos[:, c], c] - 0.1)).sum()) for c in range(num_classes) if pos[:, c].any())
  l_neg = sum(np.log1p(np.exp(32 * (s[~pos[:, c], c] + 0.1)).sum()) for c in range(num_classes))
  expected = (l_pos + l_neg) / num_classes
  got = losses.proxy_anchor_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(labels), jnp.asarray(prox, jnp.float32),
                                 alpha=32.0, margin=0.1, pos_normalizer="all")
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  present = losses.proxy_anchor_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(labels),
                                     jnp.asarray(prox, jnp.float32), alpha=32.0, margin=0.1)
  np.testing.assert_allclose(float(present), l_pos / 3 + l_neg / num_classes, rtol=1e-5)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="semantic_mix"):
    methods.build(tiny_config(semantic_mix="lstm"), num_classes=CLASSES)
  c = tiny_config()
  c.method.num_prompt = 3  # the YAML spelling
  with pytest.raises(ValueError, match="num_prompts"):
    check_config(c)
  c = tiny_config()
  c.data.sampler = "random"
  with pytest.raises(ValueError, match="m_per_class"):
    methods.build(c, num_classes=CLASSES)
  with pytest.raises(ValueError, match="prompt depth"):
    vptsp.prompt_counts(5, 13, 0, 12)
  assert vptsp.prompt_counts(5, 4, 5, 12) == [5]  # CUB-B: class prompts in block 0 only
  assert vptsp.prompt_counts(80, 11, 2, 12) == [80 - 2 * i for i in range(11)]


def test_ema_variant_updates_the_batch_classes():
  # VPTSP-M (`semantic_mix='mix'`): S[U] <- 0.8 S[U] + 0.2 mean_k(p), then every row L2-normalised.
  method = methods.build(tiny_config(semantic_mix="mix", mix_keep_ratio=0.8), num_classes=CLASSES)
  rng = np.random.default_rng(2)
  semantic = rng.normal(size=(CLASSES, EMBED)).astype(np.float32)
  semantic /= np.linalg.norm(semantic, axis=1, keepdims=True)
  proxy_emb = rng.normal(size=(len(LABELS), EMBED)).astype(np.float32)
  got = method.update_semantic_proxies(None, jnp.asarray(semantic), jnp.asarray(proxy_emb), jnp.asarray(LABELS),
                                       jax.random.key(0))
  expected = semantic.copy()
  for j, c in enumerate(LABELS[::K]):
    expected[c] = 0.8 * semantic[c] + 0.2 * proxy_emb[j * K:(j + 1) * K].mean(axis=0)
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters_and_gradients(tiny):
  method, params, state, _, value_and_grad, weights = tiny
  c = tiny_config(weights=weights)
  c.compute_dtype = "bfloat16"
  bf16 = methods.build(c, num_classes=CLASSES)
  bf16.init(jax.random.key(0))
  (loss, (_, new_state)), grads = jax.jit(jax.value_and_grad(
      lambda p: bf16.loss_fn(p, state, _batch(), jax.random.key(1), StepInfo(jnp.int32(0), jnp.int32(0))),
      has_aux=True))(params)
  (ref_loss, _), _ = value_and_grad(params, state, _batch())
  assert abs(float(loss) - float(ref_loss)) < 0.05 * abs(float(ref_loss))
  assert new_state["semantic_proxies"].dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert np.all(np.isfinite(np.asarray(tree_lib.flatten(grads)["model/task_prompts/0"])))
