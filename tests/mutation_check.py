"""Mutation check: plausible bugs injected one at a time into a scratch copy; the tests must catch each.

  python tests/mutation_check.py                 # quick (CI): each mutant runs its named tests, 2 in parallel
  python tests/mutation_check.py --full          # developers: each mutant runs its tests' whole files
  python tests/mutation_check.py --list          # the mutants and their tests
  python tests/mutation_check.py --only vit_layernorm_one_pass kmeans_last_restart

Every mutant is an exact source edit (`old` occurs exactly once in `path`) that a careless port or a later
refactoring could make: numerics that differ from the reference library or the authors' code, an engine rule
broken. For each, a scratch copy of the repository (the files git tracks or would track; never the working
tree) gets the edit and pytest runs the mutant's tests there (the default, torch-free selection). Outcomes:

  caught     the tests fail (exit status 1, or 2 when the mutant breaks collection)
  survived   the tests pass: a test is missing, unless the mutant is marked `equivalent` (a change no test
             can observe; the reason is given here and in docs/testing.md)
  stale      `old` is no longer in the file exactly once: the source moved on; update the mutant
  absent     the mutant's file is not in this checkout (a method still on its branch); not a failure
  error      pytest found no test or failed otherwise (a selection that no longer exists)
  timeout    the run exceeded --timeout
  not run    the total --budget was spent before the mutant ran (or finished)

The exit status is 0 only when every mutant was run and is caught (or survived as marked equivalent).
Scratch copies share the repository's XLA compilation cache (.jax_cache), so unchanged code compiles once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
  """One injected bug: `edits` ((old, new), ...) in `path`, caught by `tests` (pytest node ids or files)."""

  name: str
  area: str
  path: str
  edits: tuple[tuple[str, str], ...]
  tests: tuple[str, ...]
  why: str
  equivalent: str = ""  # why no test can observe this mutant; it is then expected to survive

  def files(self) -> tuple[str, ...]:
    """The test files of the quick selection (the full mode runs them whole)."""
    return tuple(dict.fromkeys(t.split("::", 1)[0] for t in self.tests))


def _m(name, area, path, old, new, tests, why, equivalent=""):
  edits = ((old, new),) if isinstance(old, str) else tuple(zip(old, new))
  return Mutant(name, area, path, edits, tuple([tests] if isinstance(tests, str) else tests), why, equivalent)


VIT = "dml_jax/backbones/vit.py"
T_VIT = "tests/test_backbone_vit.py"
T_VIT_TIMM = f"{T_VIT}::test_tiny_features_and_tokens_match_timm"
T_VIT_GRADS = f"{T_VIT}::test_every_parameter_gradient_matches_timm"
ATTENTION = "dml_jax/backbones/attention.py"
T_ATTENTION = "tests/test_attention.py"
BN = "dml_jax/backbones/batchnorm.py"
T_RESNET = "tests/test_backbone_resnet.py"
OPTIM = "dml_jax/train/optim.py"
T_OPTIM = "tests/test_train_optim.py"
SCHED = "dml_jax/train/schedules.py"
METRICS = "dml_jax/eval/metrics.py"
T_METRICS = "tests/test_eval_metrics.py"
KMEANS = "dml_jax/eval/kmeans.py"
T_KMEANS = "tests/test_eval_kmeans.py"
TRANSFORMS = "dml_jax/data/transforms.py"
T_TRANSFORMS = "tests/test_data_transforms.py"
VPTSP = "dml_jax/methods/vptsp.py"
DFML = "dml_jax/methods/dfml.py"
FVIT = "dml_jax/backbones/factorized_vit.py"
T_DFML_GOLDEN = "tests/test_dfml.py::test_golden_numbers_of_the_authors_code"
T_VPTSP_GRU = "tests/test_vptsp.py::test_gru_dropout_k1_and_tanh_match_torch_reference"
T_LOSSES = "tests/test_losses.py"

MUTANTS: tuple[Mutant, ...] = (
    # -- backbones ----------------------------------------------------------------------------------------
    _m("vit_layernorm_one_pass", "backbone", VIT,
       "  rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)",
       "  rstd = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True)\n"
       "                       - jnp.square(jnp.mean(xf, axis=-1, keepdims=True)) + eps)",
       f"{T_VIT}::test_layer_norm_keeps_its_digits_at_large_activations",
       "LayerNorm variance as E[x^2] - E[x]^2 (flax's fast variance): digits lost on large residual streams"),
    _m("vit_gelu_tanh", "backbone", VIT, "return x * (1 + jax.lax.erf(x * math.sqrt(0.5))) * 0.5",
       "return jax.nn.gelu(x, approximate=True)", T_VIT_TIMM,
       "jax.nn.gelu's default tanh approximation instead of timm's exact erf GELU"),
    _m("vit_bias_gradient_skips_a_token", "backbone", VIT,
       "jnp.dot(jnp.ones((rows.shape[0],), rows.dtype), rows,",
       "jnp.dot(jnp.ones((rows.shape[0],), rows.dtype).at[0].set(0), rows,", T_VIT_GRADS,
       "the Linear layers' bias gradient summing all tokens but the first"),
    _m("attention_backward_without_delta", "backbone", ATTENTION,
       "d_logits = (probs * (d_probs - delta)).astype(qh.dtype)", "d_logits = (probs * d_probs).astype(qh.dtype)",
       [T_ATTENTION, T_VIT_GRADS],
       "the softmax backward without its row-sum term (the gradient of exp instead of softmax)"),
    _m("attention_dq_unscaled", "backbone", ATTENTION,
       "dq = jnp.einsum(\"bhnm,bhmd->bhnd\", d_logits, kh) * _scale(qh)",
       "dq = jnp.einsum(\"bhnm,bhmd->bhnd\", d_logits, kh)", [T_ATTENTION, T_VIT_GRADS],
       "the query gradient missing the 1/sqrt(head_dim) that the forward put on q"),
    _m("vit_qkv_order", "backbone", VIT, "return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]",
       "return qkv[:, :, 1], qkv[:, :, 0], qkv[:, :, 2]", T_VIT_TIMM,
       "the fused qkv output read as [k; q; v]"),
    _m("vit_pos_embed_skips_cls", "backbone", VIT, "    return tokens + self.pos_embed[...].astype(dtype)",
       "    k = self.num_prefix_tokens\n"
       "    return tokens.at[:, k:].add(self.pos_embed[...][:, k:].astype(dtype))", T_VIT_TIMM,
       "position embedding added to the patches only (the cls token's row ignored)"),
    _m("vit_pos_resample_no_antialias", "backbone", VIT, 'method="bicubic", antialias=True)',
       'method="bicubic", antialias=False)', f"{T_VIT}::test_resample_function_matches_timm",
       "pos_embed resampled without antialiasing (timm antialiases when shrinking the grid)"),
    _m("bn_momentum_flax_convention", "backbone", BN,
       "self.mean[...] = jax.lax.stop_gradient((1.0 - m) * self.mean[...] + m * mean)",
       "self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1.0 - m) * mean)",
       f"{T_RESNET}::test_batch_statistics_mode_matches_torch_train_mode",
       "running mean with flax's momentum convention (weight of the old value) instead of torch's"),
    _m("bn_biased_running_var", "backbone", BN, "m * var * (n / (n - 1))", "m * var",
       f"{T_RESNET}::test_batch_statistics_mode_matches_torch_train_mode",
       "running variance updated with the biased batch variance (flax) instead of torch's unbiased one"),
    _m("bn_eps_1e-3", "backbone", BN, "momentum: float = 0.1, epsilon: float = 1e-5,",
       "momentum: float = 0.1, epsilon: float = 1e-3,", f"{T_RESNET}::test_tiny_resnet_matches_timm",
       "BatchNorm eps 1e-3 (Keras / TF default) instead of torch's 1e-5"),
    _m("resnet_stride_on_1x1", "backbone", "dml_jax/backbones/resnet.py",
       ("    self.conv1 = _conv(in_channels, width, 1, 1, rngs)",
        "    self.conv2 = _conv(width, width, 3, stride, rngs)"),
       ("    self.conv1 = _conv(in_channels, width, 1, stride, rngs)",
        "    self.conv2 = _conv(width, width, 3, 1, rngs)"),
       f"{T_RESNET}::test_tiny_resnet_matches_timm",
       "ResNet v1 (stride on the first 1x1 conv) instead of torchvision's v1.5 (stride on the 3x3)"),
    _m("bninception_pool_floor", "backbone", "dml_jax/backbones/bninception.py",
       "    out = math.ceil((size + 2 * padding - window) / stride) + 1",
       "    out = (size + 2 * padding - window) // stride + 1", "tests/test_backbone_bninception.py",
       "BN-Inception's 3x3/2 max pools in floor mode instead of Caffe's ceil_mode"),
    _m("resnet_relu_as_maximum", "backbone", "dml_jax/backbones/resnet.py",
       "    return out * (out > 0).astype(out.dtype)", "    return jax.nn.relu(out)",
       f"{T_RESNET}::test_tiny_resnet_matches_timm",
       "the bottleneck's output relu as max(x, 0) instead of the masked product",
       equivalent="relu(x) and x * (x > 0) are equal in value and gradient for every float (also at 0 and for "
       "-0.0 up to the sign of zero, which nothing downstream reads); the product only changes how XLA's CPU "
       "fusion pass treats the residual stream, i.e. speed, which benchmarks/train_step.py --hlo-report tracks"),
    # -- losses --------------------------------------------------------------------------------------------
    _m("proxy_anchor_pos_over_all_classes", "loss", "dml_jax/losses/proxy_anchor.py",
       '  if pos_normalizer == "present":', '  if pos_normalizer != "present":',
       f"{T_LOSSES}::test_proxy_anchor_matches_pml",
       "Proxy-Anchor's positive term divided by all C classes instead of the classes present"),
    _m("proxy_anchor_negative_margin_sign", "loss", "dml_jax/losses/proxy_anchor.py",
       "neg_terms = masked_logsumexp(alpha * (cos + margin), ~pos, axis=0)",
       "neg_terms = masked_logsumexp(alpha * (cos - margin), ~pos, axis=0)",
       f"{T_LOSSES}::test_proxy_anchor_matches_pml", "the negative margin with the positive term's sign"),
    _m("multi_similarity_neg_scale", "loss", "dml_jax/losses/multi_similarity.py",
       "neg_terms = masked_logsumexp(beta * (sim - base), neg_mask, axis=1) / beta",
       "neg_terms = masked_logsumexp(beta * (sim - base), neg_mask, axis=1) / alpha",
       f"{T_LOSSES}::test_multi_similarity_matches_pml", "MS negative term divided by alpha instead of beta"),
    _m("triplet_margin_sign", "loss", "dml_jax/losses/triplet.py",
       "losses = jax.nn.relu(dist[:, :, None] - dist[:, None, :] + margin)",
       "losses = jax.nn.relu(dist[:, :, None] - dist[:, None, :] - margin)",
       f"{T_LOSSES}::test_triplet_matches_pml", "triplet hinge with the margin subtracted"),
    _m("l2_normalize_clamp_form", "loss", "dml_jax/losses/ops.py", "  return x * jax.lax.rsqrt(sq + eps)",
       "  return x / jnp.maximum(jnp.sqrt(sq), eps)",
       (f"{T_LOSSES}::test_proxy_anchor_matches_pml", f"{T_LOSSES}::test_proxy_anchor_matches_spec_formula"),
       "Proxy-Anchor's x / sqrt(|x|^2 + eps) replaced by torch's x / max(|x|, eps)",
       equivalent="with eps = 1e-12 the two forms differ by a relative 1e-12 / |x|^2 on any non-zero row (below "
       "float32 resolution for |x| > 1e-2) and are both exactly 0 on a zero row; only the gradient at an exactly "
       "zero embedding differs (finite vs 1/eps), which no network output reaches"),
    # -- metrics -------------------------------------------------------------------------------------------
    _m("map_r_window_plus_one", "metric", METRICS,
       "in_window = relevant & (np.arange(relevant.shape[1])[None, :] < window[:, None])",
       "in_window = relevant & (np.arange(relevant.shape[1])[None, :] <= window[:, None])",
       f"{T_METRICS}::test_leave_one_out_matches_pml", "MAP@R / R-Precision reading R + 1 neighbours"),
    _m("recall_without_self_exclusion", "metric", METRICS, "  exclude = gallery_position[query_rows]",
       "  exclude = np.full(len(query_rows), -1, np.int64)", f"{T_METRICS}::test_leave_one_out_matches_pml",
       "leave-one-out queries not removed from their own ranking (every query finds itself first)"),
    _m("recall_at_k_off_by_one", "metric", METRICS,
       "np.sum(first_hit[:, None] < np.asarray(recall_ks)[None, :], axis=0)",
       "np.sum(first_hit[:, None] <= np.asarray(recall_ks)[None, :], axis=0)",
       f"{T_METRICS}::test_recall_at_k_matches_numpy_brute_force", "Recall@K counting a hit at rank K + 1"),
    _m("nmi_geometric_mean", "metric", METRICS,
       "  return mutual_information / ((entropy(label_sizes) + entropy(cluster_sizes)) / 2.0)",
       "  return mutual_information / math.sqrt(entropy(label_sizes) * entropy(cluster_sizes))",
       f"{T_METRICS}::test_nmi_formula_matches_sklearn_on_fixed_assignments",
       "NMI normalised by the geometric mean of the entropies instead of the arithmetic mean"),
    # -- k-means -------------------------------------------------------------------------------------------
    _m("kmeans_last_restart", "kmeans", KMEANS, "    if objective < best_objective:", "    if True:",
       f"{T_KMEANS}::test_restarts_return_the_best_restart_not_the_last",
       "nredo restarts keep the last result instead of the lowest objective"),
    _m("kmeans_split_largest", "kmeans", KMEANS,
       "    source = int(rng.choice(num_clusters, p=weights / weights.sum()))", "    source = int(np.argmax(counts))",
       f"{T_KMEANS}::test_empty_cluster_source_is_drawn_by_size_not_the_largest",
       "empty clusters re-seeded from the largest cluster instead of faiss's draw weighted by size - 1"),
    # -- optimizers ----------------------------------------------------------------------------------------
    _m("adamw_coupled_decay", "optimizer", OPTIM,
       "    parts.append(scale_by_torch_adam(b1=settings.b1, b2=settings.b2, eps=settings.eps))\n"
       "    if wd:\n"
       "      parts.append(optax.add_decayed_weights(wd))  # decoupled: lr * wd * p, outside the moments",
       "    if wd:\n"
       "      parts.append(optax.add_decayed_weights(wd))\n"
       "    parts.append(scale_by_torch_adam(b1=settings.b1, b2=settings.b2, eps=settings.eps))",
       f"{T_OPTIM}::test_optimizers_match_torch", "AdamW with the decay inside the moments (Adam's coupled L2)"),
    _m("clip_after_weight_decay", "optimizer", OPTIM,
       ("  if settings.clip_value:\n    parts.append(optax.clip(settings.clip_value))\n  wd = settings.weight_decay",
        "      parts.append(optax.add_decayed_weights(wd))  # coupled L2: part of the gradient the moments see"),
       ("  wd = settings.weight_decay",
        "      parts.append(optax.add_decayed_weights(wd))\n"
        "    if settings.clip_value:\n      parts.append(optax.clip(settings.clip_value))"),
       f"{T_OPTIM}::test_optimizers_match_torch",
       "Adam's gradient clamp applied after the coupled L2 term instead of before it (torch clamps .grad)"),
    _m("adam_no_second_moment_bias_correction", "optimizer", OPTIM,
       "    bc2_sqrt = jnp.sqrt(-jnp.expm1(t * jnp.float32(log_b2)))", "    bc2_sqrt = jnp.float32(1.0)",
       f"{T_OPTIM}::test_optimizers_match_torch", "Adam without the bias correction of the second moment"),
    _m("adam_bias_correction_float32_cancellation", "optimizer", OPTIM,
       "    bc1 = -jnp.expm1(t * jnp.float32(log_b1))\n    bc2_sqrt = jnp.sqrt(-jnp.expm1(t * jnp.float32(log_b2)))",
       "    bc1 = 1.0 - jnp.float32(b1) ** t\n    bc2_sqrt = jnp.sqrt(1.0 - jnp.float32(b2) ** t)",
       f"{T_OPTIM}::test_adam_bias_correction_is_torch_exact_in_the_first_steps",
       "bias corrections 1 - b ** t in float32 (optax's form): 1.3e-5 relative off torch's at t = 1"),
    _m("sgd_momentum_dampening", "optimizer", OPTIM,
       "      parts.append(optax.trace(decay=settings.momentum, nesterov=settings.nesterov))",
       "      parts.append(optax.ema(decay=settings.momentum, debias=False))",
       f"{T_OPTIM}::test_optimizers_match_torch",
       "SGD momentum as an EMA (dampening 1 - momentum) instead of torch's undampened buffer"),
    # -- schedules -----------------------------------------------------------------------------------------
    _m("schedule_stepped_before_the_epoch", "schedule", SCHED, "    e = max(int(epoch) - self.offset, 0)",
       "    e = max(int(epoch) + 1 - self.offset, 0)", f"{T_OPTIM}::test_schedules_match_torch",
       "scheduler stepped at the start of each epoch (epoch 0 already decayed): off by one"),
    _m("schedule_offset_ignored", "schedule", SCHED, "    e = max(int(epoch) - self.offset, 0)",
       "    e = max(int(epoch), 0)", f"{T_OPTIM}::test_schedules_match_torch",
       "a scheduler that starts after the warm-up counting the warm-up epochs"),
    _m("multistep_milestone_exclusive", "schedule", SCHED, "sum(m <= e for m in self.milestones)",
       "sum(m < e for m in self.milestones)", f"{T_OPTIM}::test_schedules_match_torch",
       "MultiStepLR decaying one epoch after its milestone"),
    # -- transforms ----------------------------------------------------------------------------------------
    _m("resize_rounds_long_side", "transform", TRANSFORMS,
       ("    return shorter, int(shorter * height / width)", "  return int(shorter * width / height), shorter"),
       ("    return shorter, int(round(shorter * height / width))",
        "  return int(round(shorter * width / height)), shorter"),
       (f"{T_TRANSFORMS}::test_resize_floors_and_center_crop_rounds_half_to_even",
        f"{T_TRANSFORMS}::test_eval_transform_matches_torchvision"),
       "Resize rounding the long side instead of flooring it (torchvision: int())"),
    _m("center_crop_floors_offset", "transform", TRANSFORMS,
       "  top = int(round((h - size) / 2.0))\n  left = int(round((w - size) / 2.0))",
       "  top = (h - size) // 2\n  left = (w - size) // 2",
       (f"{T_TRANSFORMS}::test_resize_floors_and_center_crop_rounds_half_to_even",
        f"{T_TRANSFORMS}::test_eval_transform_matches_torchvision"),
       "CenterCrop flooring its offset instead of rounding it (torchvision: int(round()))"),
    _m("center_crop_rounds_half_up", "transform", TRANSFORMS,
       "  top = int(round((h - size) / 2.0))\n  left = int(round((w - size) / 2.0))",
       "  top = int((h - size) / 2.0 + 0.5)\n  left = int((w - size) / 2.0 + 0.5)",
       (f"{T_TRANSFORMS}::test_resize_floors_and_center_crop_rounds_half_to_even",
        f"{T_TRANSFORMS}::test_eval_transform_matches_torchvision"),
       "CenterCrop rounding half up instead of Python's round half to even"),
    _m("random_resized_crop_truncates", "transform", TRANSFORMS,
       "    w = int(round(math.sqrt(target_area * aspect)))", "    w = int(math.sqrt(target_area * aspect))",
       f"{T_TRANSFORMS}::test_train_transform_matches_torchvision_resized_crop",
       "RandomResizedCrop truncating the box width instead of rounding it"),
    # -- engine --------------------------------------------------------------------------------------------
    _m("phases_run_in_reverse", "engine", "dml_jax/train/step.py",
       "    for index, phase, objective, labels, paths in plans:",
       "    for index, phase, objective, labels, paths in plans[::-1]:",
       "tests/test_train_phases.py::test_two_phase_step_equals_the_hand_written_optax_sequence",
       "a method's phases run in reverse order (the generator before the discriminators)"),
    _m("phase_steps_every_group", "engine", "dml_jax/train/step.py",
       "    labels = groups.labels_of(phase.groups)", "    labels = groups.labels_of(None)",
       "tests/test_train_phases.py::test_two_phase_step_equals_the_hand_written_optax_sequence",
       "every phase differentiates and steps every trainable group, not only its own"),
    _m("stop_epoch_ignored", "engine", OPTIM, "      if not start <= epoch < stop:", "      if not start <= epoch:",
       "tests/test_train_phases.py::test_lr_cycle_keeps_adam_moments_running_like_torch_lr_zero",
       "a group whose training window ended (stop_epoch) keeps getting updates"),
    _m("lr_cycle_ignored", "engine", OPTIM,
       "    return self.schedule.learning_rate(epoch, self.lr) * self.lr_cycle[epoch % len(self.lr_cycle)]",
       "    return self.schedule.learning_rate(epoch, self.lr)",
       "tests/test_train_phases.py::test_lr_cycle_keeps_adam_moments_running_like_torch_lr_zero",
       "lr_cycle's multipliers dropped (D&C's alternate-epoch backbone freeze trains every epoch)"),
    _m("late_group_shares_optimizer_state", "engine", OPTIM,
       '      label = name if start == 0 else f"{name}_from_epoch{int(start)}"', "      label = name",
       f"{T_OPTIM}::test_warmup_unfreeze_starts_fresh_adam_count_like_torch",
       "a group unfrozen after warm-up continues another group's Adam state instead of starting fresh"),
    _m("frozen_parameters_differentiated", "engine", "dml_jax/train/step.py",
       "    trainable = {p: flat[p] for p in paths}", "    trainable = {p: flat[p] for p in flat}",
       "tests/test_vptsp_train.py::test_frozen_vit_is_never_differentiated",
       "the step differentiates every parameter, frozen ones included (no update, but every frozen gradient "
       "is formed: the cost the design avoids)"),
    # -- methods: Proxy-Anchor family (metric_loss) ----------------------------------------------------------
    _m("metric_loss_gap_only", "method:metric_loss", "dml_jax/methods/metric_loss.py",
       "      pooled = jnp.mean(fmap, axis=(1, 2)) + jnp.max(fmap, axis=(1, 2))",
       "      pooled = jnp.mean(fmap, axis=(1, 2))",
       "tests/test_methods_metric_loss.py::test_gap_gmp_head_and_frozen_batchnorm",
       "the Proxy-Anchor head pooling by average only (GMP dropped)"),
    # -- methods: Proxy-ISA ---------------------------------------------------------------------------------
    _m("proxy_isa_outliers_keep_informative_weight", "method:proxy_isa", "dml_jax/losses/proxy_isa.py",
       "    pos = jnp.where(below, weights.weight[None, :], pos)\n", "",
       "tests/test_proxy_isa.py::test_steps_over_both_switches_match_the_torch_reference",
       "positive pairs below the outlier threshold keep the informative weight instead of the plain class weight"),
    _m("proxy_isa_negatives_undamped", "method:proxy_isa", "dml_jax/losses/proxy_isa.py",
       "  neg = jnp.where(below, weights.negative_weight[None, :], 1.0)", "  neg = jnp.ones_like(cos)",
       "tests/test_proxy_isa.py::test_steps_over_both_switches_match_the_torch_reference",
       "negative pairs below the threshold not damped by 1 / E(n)"),
    # -- methods: Divide & Conquer --------------------------------------------------------------------------
    _m("dnc_relabel_intended_matching", "method:divide_and_conquer", "dml_jax/methods/divide_and_conquer.py",
       "def relabel_to_previous(current: np.ndarray, previous: np.ndarray, *, inverse_bug: bool = True)",
       "def relabel_to_previous(current: np.ndarray, previous: np.ndarray, *, inverse_bug: bool = False)",
       ("tests/test_divide_and_conquer.py::test_relabelling_quirk_on_a_cycle",
        "tests/test_divide_and_conquer.py::test_reclustering_equals_the_codes"),
       "the Hungarian relabelling applied as the intended matching, not the code's inverse permutation"),
    _m("dnc_overlap_counts_self_pairs", "method:divide_and_conquer", "dml_jax/methods/divide_and_conquer.py",
       "  pairs = active[:, None] & active[None, :] & ~jnp.eye(masks.shape[0], dtype=bool)",
       "  pairs = active[:, None] & active[None, :]",
       "tests/test_divide_and_conquer.py::test_masks_regulariser_and_updates_match_torch",
       "the masks' overlap regulariser also averaging each mask with itself"),
    _m("dnc_overlap_without_relu", "method:divide_and_conquer", "dml_jax/methods/divide_and_conquer.py",
       "  m = jax.nn.relu(masks) if relu else masks\n", "  m = masks\n",
       "tests/test_divide_and_conquer.py::test_masks_regulariser_and_updates_match_torch",
       "the overlap regulariser on the raw masks instead of their ReLU"),
    # -- methods: DADA and DFML (written against their branches; 'absent' until merged) ------------------------
    _m("dada_discrepancy_sign", "method:dada", "dml_jax/methods/dada.py",
       "    loss = (1.0 - r) * terms.domain + r * (terms.category - terms.discrepancy)",
       "    loss = (1.0 - r) * terms.domain + r * (terms.category + terms.discrepancy)",
       "tests/test_dada.py::test_discriminator_objective_matches_torch",
       "the discriminators' objective adding the category discrepancy instead of subtracting it"),
    _m("dada_pairs_last_partner", "method:dada", "dml_jax/methods/dada.py",
       "  partner = jnp.argmax(later, axis=1)",
       "  partner = later.shape[1] - 1 - jnp.argmax(later[:, ::-1], axis=1)",
       "tests/test_dada.py::test_positive_pairs_are_the_codes",
       "a label's mixup partner its last later sample instead of the code's next one (labels drawn 3+ times)"),
    _m("dada_bn_counts_padding_rows", "method:dada", "dml_jax/methods/dada.py",
       "  mean = jnp.sum(x * w, axis=0) / count", "  mean = jnp.sum(x * w, axis=0) / x.shape[0]",
       "tests/test_dada.py::test_discriminator_objective_matches_torch",
       "the discriminators' BatchNorm mean divided by all rows, unused mixture slots included, not the B' valid"),
    _m("dada_bn_running_var_biased", "method:dada", "dml_jax/methods/dada.py",
       "m * var * (count / (count - 1.0))", "m * var",
       "tests/test_dada.py::test_discriminator_objective_matches_torch",
       "the discriminators' running variance updated with the biased batch variance (torch: unbiased)"),
    _m("dada_dropout_unscaled", "method:dada", "dml_jax/methods/dada.py",
       "h / (1.0 - dropout), 0.0)", "h, 0.0)",
       "tests/test_dada.py::test_generator_objective_matches_torch",
       "D_c's dropout without torch's 1 / (1 - p) scaling of the kept entries"),
    _m("dfml_distillation_not_detached", "method:dfml", DFML,
       "factorized_vit.safe_norm(m2 - jax.lax.stop_gradient(m1))", "factorized_vit.safe_norm(m2 - m1)",
       T_DFML_GOLDEN, "the distillation target (the full stream) not detached: the teacher learns from the student"),
    _m("dfml_layer_divisor_is_depth", "method:dfml", DFML,
       'o["layer_distill_weight"] / o["layer_distill_divisor"] * distill_layers',
       'o["layer_distill_weight"] / match.attn_distance.shape[0] * distill_layers', T_DFML_GOLDEN,
       "the matching terms divided by the model's depth instead of the code's literal 12 (equal only for DeiT-S)"),
    _m("dfml_embedding_distill_mean", "method:dfml", DFML,
       "distill_embedding = jnp.sum(factorized_vit.safe_norm(",
       "distill_embedding = jnp.mean(factorized_vit.safe_norm(",
       T_DFML_GOLDEN, "the embedding distillation averaged over the batch instead of the code's sum"),
    _m("dfml_straight_through_hard_only", "method:dfml", FVIT, "  return jax.lax.stop_gradient(hard - soft) + soft",
       "  return hard", "tests/test_dfml.py::test_straight_through_is_one_hot_forward_and_softmax_backward",
       "the router's one-hot weights without the softmax's straight-through gradient: the routers never learn"),
    _m("dfml_safe_norm_plain_sqrt", "method:dfml", FVIT,
       "  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)", "  return jnp.sqrt(sq)",
       "tests/test_dfml.py::test_safe_norm_is_exact_and_has_zero_gradient_at_zero",
       "a plain sqrt in the matching distances: NaN gradients where a routed token equals its target (torch's too)"),
    _m("dfml_bias_not_split", "method:dfml", FVIT,
       "out[key] = np.broadcast_to(value / value.dtype.type(g), (g,) + value.shape)",
       "out[key] = np.broadcast_to(value, (g,) + value.shape)", T_DFML_GOLDEN,
       "proj / fc2 biases copied whole into every sub-block: the summed sub-blocks are no longer the DeiT"),
    _m("dfml_qkv_relayout_group_major", "method:dfml", FVIT,
       "value.reshape(value.shape[0], 3, g, -1).transpose(2, 0, 1, 3)",
       "value.reshape(value.shape[0], g, 3, -1).transpose(1, 0, 2, 3)", T_DFML_GOLDEN,
       "the plain qkv columns read as (G, q|k|v) instead of timm's (q|k|v, heads): sub-blocks mix q, k and v"),
    _m("dfml_mlp_router_reads_normalised", "method:dfml", FVIT, "    r_mlp = self.gate(xh1)",
       "    r_mlp = self.gate(self.norm2(xh1))", T_DFML_GOLDEN,
       "the MLP router on norm2(x) like the attention router, instead of the code's un-normalised stream"),
    _m("dfml_attn_match_router_not_detached", "method:dfml", FVIT,
       "    r_attn_detached = self.attn.gate(u, detach_input=True)", "    r_attn_detached = self.attn.gate(u)",
       "tests/test_dfml.py::test_gradient_paths_follow_the_codes_detach_points",
       "the attention matching term's router reading the un-detached tokens: its gradient reaches the backbone"),
    _m("dfml_mlp_match_on_block_input", "method:dfml", FVIT,
       "    d_mlp = sg(xh2) + self.mlp(self.norm2(sg(xh2)), r_mlp)",
       "    d_mlp = sg(xh1) + self.mlp(self.norm2(sg(xh1)), r_mlp)", T_DFML_GOLDEN,
       "the MLP matching term's routed MLP applied to the block's input after attention instead of its output "
       "(the code applies it to the block's output)"),
    _m("dfml_routed_stream_unrouted", "method:dfml", FVIT, "    xh1 = xh + proj.merge(heads, r_attn)",
       "    xh1 = xh + proj.merge(heads)", T_DFML_GOLDEN,
       "the routed stream's attention summing every sub-block (the full attention) instead of the routed one"),
    # -- methods: VPTSP-G -----------------------------------------------------------------------------------
    _m("vptsp_rnn_dropout_not_applied", "method:vptsp", VPTSP, "        if drop > 0:  # torch nn.Dropout",
       "        if drop > 1:  # torch nn.Dropout", T_VPTSP_GRU,
       "the GRU's rnn_dropout never applied (the SOP and In-Shop recipes use 0.1 and 0.5)"),
    _m("vptsp_dropout_skips_last_step", "method:vptsp", VPTSP, "        if drop > 0:  # torch nn.Dropout",
       "        if drop > 0 and j < k - 1:  # torch nn.Dropout", T_VPTSP_GRU,
       "dropout only between GRU steps: with one sample per class (k = 1, SOP) never"),
    _m("vptsp_dropout_unscaled", "method:vptsp", VPTSP, "h / (1.0 - drop), 0.0)", "h, 0.0)", T_VPTSP_GRU,
       "dropout without torch's 1 / (1 - p) scaling of the kept entries"),
    _m("vptsp_gru_always_relu", "method:vptsp", VPTSP,
       'candidate="relu" if semantic_mix == "gru_relu" else "tanh"', 'candidate="relu"', T_VPTSP_GRU,
       "semantic_mix='gru' built with the ReLU candidate instead of tanh"),
    _m("vptsp_gru_gate_convention", "method:vptsp", VPTSP, "    return (1.0 - z) * n + z * h",
       "    return z * n + (1.0 - z) * h", "tests/test_vptsp.py::test_loss_state_and_gradients_match_torch_reference",
       "the paper's Eq. 4-7 gate roles instead of the code's (z keeps the old state)"),
    _m("vptsp_prompts_in_front_of_cls", "method:vptsp", VIT,
       ("        x = block(jnp.concatenate([tokens[:, :k], p, tokens[:, k:]], axis=1).reshape(b * m, d), m)",
        "        x = jnp.concatenate([tokens[:, :k], tokens[:, m - n + k:]], axis=1).reshape(b * n, d)"),
       ("        x = block(jnp.concatenate([p, tokens], axis=1).reshape(b * m, d), m)",
        "        x = tokens[:, m - n:].reshape(b * n, d)"),
       "tests/test_vptsp.py::test_loss_state_and_gradients_match_torch_reference",
       "deep prompts inserted in front of the cls token (the VPTSP code's placement) instead of after it",
       equivalent="attention, LayerNorm and the MLP act per token and attention is permutation-equivariant, and "
       "prompts carry no position embedding, so every output token is the same wherever the prompts sit "
       "(up to float summation order, ~1e-7); the VPTSP torch reference puts them in front, VPT's after"),
    _m("compile_options_not_passed", "train", "dml_jax/train/step.py",
       "donate_argnums=(0,) if self.donate else (),\n" + " " * 33 + "compiler_options=self.compiler_options)",
       "donate_argnums=(0,) if self.donate else ())",
       "tests/test_compile_options.py::test_the_update_step_is_compiled_with_them",
       "the update step jitted without dml_jax's CPU compile options (jaxlib's slower YNNPACK fusions come back)"),
)


# -- running --------------------------------------------------------------------------------------------------


def _repo_files() -> list[str]:
  """Files of the working tree that git tracks or would track (untracked, not ignored)."""
  out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                       capture_output=True).stdout.decode()
  return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def _scratch_copy(files: list[str]) -> pathlib.Path:
  root = pathlib.Path(tempfile.mkdtemp(prefix="dml_jax_mutant_"))
  for f in files:
    target = root / f
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / f, target)
  return root


def check_applies(m: Mutant) -> str:
  """'' when every edit's `old` occurs exactly once in the file (and differs from `new`), else what is wrong."""
  path = REPO / m.path
  if not path.is_file():
    return f"{m.path} does not exist"
  text = path.read_text()
  for old, new in m.edits:
    count = text.count(old)
    if count != 1:
      return f"{m.path}: the text to replace occurs {count} times (expected once): {old.strip()[:70]!r}"
    if old == new:
      return "edit does not change the text"
  return ""


def _mutate(text: str, m: Mutant) -> str:
  for old, new in m.edits:
    text = text.replace(old, new, 1)
  return text


def _pytest(root: pathlib.Path, selection: list[str], timeout: float) -> tuple[int | None, str, float]:
  env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
  cache = REPO / ".jax_cache"
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not parity", *selection]
  start = time.monotonic()
  try:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    return None, out, time.monotonic() - start
  return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _outcome(returncode: int | None, equivalent: bool) -> str:
  if returncode is None:
    return "timeout"
  if returncode in (1, 2):
    return "caught"
  if returncode == 0:
    return "survived (equivalent)" if equivalent else "survived"
  return "error"


def _last_lines(text: str, n: int = 6) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return "\n".join(lines[-n:])


def run(mutants: list[Mutant], *, full: bool, jobs: int, timeout: float, budget: float, baseline: bool,
        verbose: bool) -> list[dict]:
  files = _repo_files()
  results: list[dict] = []
  runnable = []
  for m in mutants:
    if not (REPO / m.path).is_file():
      results.append(dict(name=m.name, area=m.area, outcome="absent", seconds=0.0, detail=f"no {m.path}"))
      continue
    problem = check_applies(m)
    if problem:
      results.append(dict(name=m.name, area=m.area, outcome="stale", seconds=0.0, detail=problem))
    else:
      runnable.append(m)
  lock = threading.Lock()
  free_roots: list[pathlib.Path] = [_scratch_copy(files) for _ in range(max(1, min(jobs, len(runnable) or 1)))]
  deadline = time.monotonic() + budget
  try:
    if baseline:
      selection = sorted({t for m in runnable for t in (m.files() if full else m.tests)})
      rc, out, seconds = _pytest(free_roots[0], selection, timeout * 4)
      print(f"baseline (unmutated, {len(selection)} selections): exit {rc}, {seconds:.0f} s", flush=True)
      if rc != 0:
        print(_last_lines(out, 20))
        raise SystemExit("the unmutated tests fail: fix them before judging mutants")

    def one(m: Mutant) -> dict:
      with lock:
        root = free_roots.pop()
      try:
        remaining = deadline - time.monotonic()
        if remaining <= 1:
          return dict(name=m.name, area=m.area, outcome="not run", seconds=0.0, detail="budget spent")
        target = root / m.path
        original = target.read_text()
        mutated = _mutate(original, m)
        try:
          compile(mutated, m.path, "exec")
        except SyntaxError as e:
          return dict(name=m.name, area=m.area, outcome="error", seconds=0.0, detail=f"mutant does not compile: {e}")
        target.write_text(mutated)
        try:
          selection = list(m.files() if full else m.tests)
          rc, out, seconds = _pytest(root, selection, min(timeout, remaining))
        finally:
          target.write_text(original)
        outcome = _outcome(rc, bool(m.equivalent))
        if outcome == "timeout" and remaining < timeout:
          outcome = "not run"  # stopped by the total budget, not by its own timeout
        detail = _last_lines(out, 8)
        if outcome == "caught":  # the first failure's one-line summary: an assertion, not a crash of the mutant
          failures = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
          detail = failures[0] if failures else _last_lines(out, 1)
        result = dict(name=m.name, area=m.area, outcome=outcome, seconds=round(seconds, 1), detail=detail)
        with lock:
          print(f"{outcome:22s} {seconds:6.1f} s  {m.name}", flush=True)
          if verbose or outcome != "survived (equivalent)":
            print("    " + result["detail"].replace("\n", "\n    "), flush=True)
        return result
      finally:
        with lock:
          free_roots.append(root)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(free_roots)) as pool:
      results.extend(pool.map(one, runnable))
  finally:
    for root in free_roots:
      shutil.rmtree(root, ignore_errors=True)
  return results


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--full", action="store_true", help="run each mutant's whole test files (developers)")
  parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
  parser.add_argument("--list", action="store_true", help="list the mutants and exit")
  parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="seconds per mutant (default 240 quick, 900 full)")
  parser.add_argument("--budget", type=float, default=None,
                      help="seconds for the whole check; mutants not started by then are 'not run' "
                           "(default 900 quick, unlimited full)")
  parser.add_argument("--baseline", action="store_true", help="first run the selection unmutated (on in --full)")
  parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
  parser.add_argument("-v", "--verbose", action="store_true", help="print the tail of pytest's output for every mutant")
  args = parser.parse_args(argv)

  names = [m.name for m in MUTANTS]
  duplicates = {n for n in names if names.count(n) > 1}
  if duplicates:
    raise SystemExit(f"duplicate mutant names: {sorted(duplicates)}")
  mutants = list(MUTANTS)
  if args.only:
    unknown = sorted(set(args.only) - set(names))
    if unknown:
      raise SystemExit(f"unknown mutants {unknown}; see --list")
    mutants = [m for m in MUTANTS if m.name in args.only]
  if args.list:
    for m in mutants:
      mark = "  [equivalent]" if m.equivalent else ""
      print(f"{m.name:42s} {m.area:20s} {m.path}{mark}\n    {m.why}\n    tests: {' '.join(m.tests)}")
    print(f"{len(mutants)} mutants")
    return 0

  timeout = args.timeout or (900.0 if args.full else 240.0)
  budget = args.budget or (float("inf") if args.full else 900.0)
  start = time.monotonic()
  print(f"mutation check: {len(mutants)} mutants, {'full' if args.full else 'quick'} mode, {args.jobs} in parallel, "
        f"timeout {timeout:.0f} s each, budget {budget:.0f} s", flush=True)
  results = run(mutants, full=args.full, jobs=args.jobs, timeout=timeout, budget=budget,
                baseline=args.baseline or args.full, verbose=args.verbose)
  order = {m.name: i for i, m in enumerate(MUTANTS)}
  results.sort(key=lambda r: order[r["name"]])
  counts: dict[str, int] = {}
  for r in results:
    counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
  bad = [r for r in results if r["outcome"] not in ("caught", "survived (equivalent)", "absent")]
  equivalent_caught = [r for r in results if r["outcome"] == "caught" and
                       next(m for m in MUTANTS if m.name == r["name"]).equivalent]
  print(f"\n{len(results)} mutants in {time.monotonic() - start:.0f} s: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
  for r in bad:
    print(f"  {r['outcome']}: {r['name']} ({r['area']}): {r['detail'].splitlines()[-1] if r['detail'] else ''}")
  for r in equivalent_caught:
    print(f"  marked equivalent but caught: {r['name']} (a test observes it: remove `equivalent`)")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(mode="full" if args.full else "quick", results=results),
                                                  indent=1))
  return 1 if bad or equivalent_caught else 0


if __name__ == "__main__":
  sys.exit(main())
