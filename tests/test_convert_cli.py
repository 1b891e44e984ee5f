"""convert_timm_weights.py end to end: every source kind, features against timm, strictness, torch-free loading.

Checkpoints hold seeded numpy weights (tests/seeded.py); timm's features come from tests/references (`ref`
fixture). Writing a torch .pth/.bin, or going through timm itself, needs torch: those tests are `parity` only.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time
import types

import jax.numpy as jnp
import live
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from seeded import timm_vit_state_dict

import convert_timm_weights as cli
from dml_jax.backbones import create, get_entry, list_models
from dml_jax.convert.errors import WeightsMismatchError
from dml_jax.convert.weights_dir import read_weights_dir, write_weights_dir
from dml_jax.preprocessing import PretrainedCfg

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
TINY_ARGS = ["--arch"] + [f"{k}={v}" for k, v in TINY.items()]
VIT_S = dict(img_size=224, patch_size=16, depth=12, embed_dim=384, num_heads=6)
DEIT_S = dict(VIT_S, distilled=True)
ATOL = 1e-4

_pooled = nnx.jit(lambda model, x: model(x))


def _tiny_sd(num_classes: int = 10) -> dict[str, np.ndarray]:
  return timm_vit_state_dict(0, **TINY, num_classes=num_classes)


def _images(size: int, b: int = 2) -> np.ndarray:
  return np.random.RandomState(0).randn(b, size, size, 3).astype(np.float32)


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _run_cli(capsys, *args) -> tuple[int, str, str]:
  rc = cli.main([str(a) for a in args])
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def _torch_save(obj, path) -> None:
  import torch

  torch.save(obj, path)


def _tiny_pooled(ref) -> np.ndarray:
  """timm's pooled features of the tiny ViT holding `_tiny_sd()` on `_images(32)`."""
  def compute():
    return {"pooled": live.timm_pooled(live.timm_vit(_tiny_sd(), num_classes=10, **TINY), _images(32))}

  return ref("convert_cli/tiny_vit_pooled", compute)["pooled"]


@pytest.fixture(scope="module")
def vit_s_checkpoint(tmp_path_factory):
  # timm's init (weights std 0.02) plus a perturbation of 0.02 gave the scale of the original test.
  sd = timm_vit_state_dict(1, **VIT_S, num_classes=1000, scale=0.025)
  path = tmp_path_factory.mktemp("vit_s") / "vit_s.safetensors"
  save_file(sd, str(path))
  return sd, path


@pytest.fixture(scope="module")
def vit_s_dir(vit_s_checkpoint, tmp_path_factory):
  _, path = vit_s_checkpoint
  out = tmp_path_factory.mktemp("vit_s_dir") / "w"
  assert cli.main(["--model", "vit_small_patch16_224.augreg_in21k", "--checkpoint", str(path), "--out", str(out)]) == 0
  return out


def test_vit_s16_at_224_matches_timm(ref, vit_s_checkpoint, vit_s_dir):
  sd, _ = vit_s_checkpoint
  x = _images(224)

  def compute():
    import timm

    tm = live.load(timm.create_model("vit_small_patch16_224", pretrained=False), sd)
    return {"pooled": live.timm_pooled(tm, x),
            "num_params": np.asarray(sum(p.numel() for n, p in tm.named_parameters() if not n.startswith("head.")))}

  expected = ref("convert_cli/vit_s16_224", compute)
  meta, flat = read_weights_dir(vit_s_dir)
  assert meta["model"] == "vit_small_patch16_224" and meta["family"] == "vit"
  assert sorted(meta["dropped_keys"]) == ["head.bias", "head.weight"]  # safetensors stores keys sorted
  assert meta["num_params"] == int(expected["num_params"])
  fm = create("vit_small_patch16_224.augreg_in21k", weights=str(vit_s_dir))
  assert fm.pretrained_cfg == PretrainedCfg(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=224, crop_pct=0.9,
                                            interpolation="bicubic")
  assert _max_diff(_pooled(fm, jnp.asarray(x)), expected["pooled"]) < ATOL


@pytest.mark.parity
@pytest.mark.slow
def test_deit_s_distilled_at_224_wrapped_checkpoint_matches_timm(tmp_path, capsys):
  import timm

  sd = timm_vit_state_dict(2, **VIT_S, num_classes=1000, distilled=True, scale=0.025)
  tm = live.load(timm.create_model("deit_small_distilled_patch16_224", pretrained=False), sd)
  path = tmp_path / "deit.pth"
  _torch_save({"model": tm.state_dict(), "epoch": 299}, path)  # the layout of the DeiT release files
  rc, out, err = _run_cli(capsys, "--model", "deit_small_distilled_patch16_224.fb_in1k", "--checkpoint", path,
                          "--out", tmp_path / "w")
  assert rc == 0, err
  assert "took the state dict under 'model'" in out and "head_dist.weight" in out
  fm = create("deit_small_distilled_patch16_224", weights=str(tmp_path / "w"))
  assert fm.pretrained_cfg.mean == (0.485, 0.456, 0.406)
  x = _images(224)
  assert _max_diff(_pooled(fm, jnp.asarray(x)), live.timm_pooled(tm, x)) < ATOL


@pytest.mark.parametrize("kind", [pytest.param(".bin", marks=pytest.mark.parity), ".safetensors"])
def test_tiny_bin_and_safetensors(ref, tmp_path, capsys, kind):
  sd = _tiny_sd()
  path = tmp_path / f"tiny{kind}"
  if kind == ".bin":
    _torch_save({"state_dict": live.tensors(sd)}, path)
  else:
    save_file(sd, str(path))
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224", "--checkpoint", path, "--out", tmp_path / "w",
                        *TINY_ARGS)
  assert rc == 0, err
  fm = create("vit_small_patch16_224", weights=str(tmp_path / "w"), **TINY)
  assert _max_diff(_pooled(fm, jnp.asarray(_images(32))), _tiny_pooled(ref)) < ATOL


def _write_vit_jax_npz(sd: dict[str, np.ndarray], path: pathlib.Path, num_heads: int) -> None:
  """The vit_jax / AugReg npz naming, written from a timm state dict (the inverse of timm's _load_weights)."""
  dim = sd["cls_token"].shape[-1]
  hd = dim // num_heads
  w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
       "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
       "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
       "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
       "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"],
       # Old in21k files carry a representation layer; timm ignores it and so must the conversion.
       "pre_logits/kernel": np.zeros((dim, dim), np.float32), "pre_logits/bias": np.zeros((dim,), np.float32)}
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  for i in range(depth):
    b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"] = sd[t + "norm1.weight"], sd[t + "norm1.bias"]
    w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"] = sd[t + "norm2.weight"], sd[t + "norm2.bias"]
    qkv_w, qkv_b = sd[t + "attn.qkv.weight"], sd[t + "attn.qkv.bias"]
    for j, name in enumerate(("query", "key", "value")):
      rows = slice(j * dim, (j + 1) * dim)
      w[b + f"MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[rows].T.reshape(dim, num_heads, hd)
      w[b + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[rows].reshape(num_heads, hd)
    w[b + "MultiHeadDotProductAttention_1/out/kernel"] = sd[t + "attn.proj.weight"].T.reshape(num_heads, hd, dim)
    w[b + "MultiHeadDotProductAttention_1/out/bias"] = sd[t + "attn.proj.bias"]
    for r in range(2):
      w[b + f"MlpBlock_3/Dense_{r}/kernel"] = sd[t + f"mlp.fc{r + 1}.weight"].T
      w[b + f"MlpBlock_3/Dense_{r}/bias"] = sd[t + f"mlp.fc{r + 1}.bias"]
  np.savez(path, **w)


def test_npz_and_safetensors_convert_and_load_without_torch(ref, tmp_path):
  sd = _tiny_sd()
  npz = tmp_path / "augreg.npz"
  _write_vit_jax_npz(sd, npz, num_heads=TINY["num_heads"])
  x = _images(32)

  def compute():
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer import _load_weights as timm_load_npz

    reloaded = VisionTransformer(**TINY, num_classes=10).eval()
    timm_load_npz(reloaded, str(npz))
    return {"reloaded_pooled": live.timm_pooled(reloaded, x)}

  # The test's npz naming is right: timm's own npz loader reproduces the model from it.
  ref_pooled = _tiny_pooled(ref)
  assert _max_diff(ref("convert_cli/tiny_vit_from_augreg_npz", compute)["reloaded_pooled"], ref_pooled) < 1e-5
  save_file(sd, str(tmp_path / "tiny.safetensors"))
  np.save(tmp_path / "x.npy", x)
  arch = " ".join(f"{k}={v}" for k, v in TINY.items())
  kwargs = ", ".join(f"{k}={v}" for k, v in TINY.items())
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      import convert_timm_weights as cli
      for src, out in (("augreg.npz", "w_npz"), ("tiny.safetensors", "w_st")):
        rc = cli.main(["--model", "vit_small_patch16_224.augreg_in21k", "--checkpoint", r"{tmp_path}/" + src,
                       "--out", r"{tmp_path}/" + out, "--arch"] + "{arch}".split())
        assert rc == 0, src
      assert "torch" not in sys.modules, "conversion imported torch"
      from dml_jax.backbones import create
      x = np.load(r"{tmp_path}/x.npy")
      for out in ("w_npz", "w_st"):
        model = create("vit_small_patch16_224", weights=r"{tmp_path}/" + out, {kwargs})
        np.save(r"{tmp_path}/" + out + ".npy", np.asarray(model(x)))
      assert "torch" not in sys.modules, "loading and the forward pass imported torch"
      """)
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "dropped on purpose (4): head/kernel, head/bias, pre_logits/kernel, pre_logits/bias" in proc.stdout
  for out in ("w_npz", "w_st"):
    assert _max_diff(np.load(tmp_path / f"{out}.npy"), ref_pooled) < ATOL, out


@pytest.mark.parity
def test_timm_name_source_takes_timms_state_dict_and_cfg(tmp_path, capsys, monkeypatch):
  import timm

  # Offline stand-in for the hub: timm's own pretrained loading, from a local file instead of a download.
  tm = live.timm_vit(_tiny_sd(num_classes=21843), num_classes=21843, **TINY)
  _torch_save(tm.state_dict(), tmp_path / "hub.pth")
  real_create = timm.create_model
  calls = []

  def create_from_file(name, pretrained=False, **kwargs):
    calls.append((name, pretrained, dict(kwargs)))
    return real_create(name, pretrained=pretrained, pretrained_cfg_overlay=dict(file=str(tmp_path / "hub.pth")),
                       **kwargs)

  monkeypatch.setattr(timm, "create_model", create_from_file)
  rc, out, err = _run_cli(capsys, "--model", "vit_small_patch16_224.augreg_in21k", "--out", tmp_path / "w",
                          *TINY_ARGS)
  assert rc == 0, err
  assert calls == [("vit_small_patch16_224.augreg_in21k", True, TINY)]
  meta, _ = read_weights_dir(tmp_path / "w")
  assert meta["source"] == "timm:vit_small_patch16_224.augreg_in21k"
  assert meta["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and meta["pretrained_cfg"]["crop_pct"] == 0.9
  fm = create("vit_small_patch16_224", weights=str(tmp_path / "w"), **TINY)
  x = _images(32)
  assert _max_diff(_pooled(fm, jnp.asarray(x)), live.timm_pooled(tm, x)) < ATOL


@pytest.mark.parity  # the timm-name route imports timm before it can tell that it is offline
def test_timm_name_offline_points_to_checkpoint(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224.augreg_in21k", "--out", tmp_path / "w", *TINY_ARGS)
  assert rc == 2
  assert "--checkpoint" in err and "vit_small_patch16_224.augreg_in21k" in err and "HF_HUB_OFFLINE is set" in err
  assert err.count("\n") == 1 and err.startswith("error: ")  # one line, no traceback
  assert not (tmp_path / "w").exists()


def test_timm_name_without_network_fails_fast(tmp_path, capsys, monkeypatch):
  # HF_HUB_OFFLINE unset and no network: the hub client would retry for about a minute; the converter
  # probes the hub once and reads only the cache.
  from dml_jax.convert import sources

  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
  monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
  # timm itself is faked (the default suite runs without torch/timm): its hub download fails as it does offline.
  def create_model(*args, **kwargs):
    raise RuntimeError("LocalEntryNotFoundError: offline and not in the cache")

  monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace())
  start = time.monotonic()
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224.augreg_in21k", "--out", tmp_path / "w", *TINY_ARGS)
  assert rc == 2 and time.monotonic() - start < 20
  assert "no network" in err and str(tmp_path / "empty_cache") in err and "--checkpoint FILE" in err


def test_timm_name_without_timm_names_the_extra(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224.augreg_in21k", "--out", tmp_path / "w", *TINY_ARGS)
  assert rc == 2 and "not installed" in err and ".[convert]" in err and "--checkpoint" in err
  assert not (tmp_path / "w").exists()


def test_bninception_needs_a_local_checkpoint(tmp_path, capsys):
  names = [n for n in list_models() if get_entry(n).family == "bninception"]
  assert names, "no backbone of family 'bninception' is registered"
  rc, _, err = _run_cli(capsys, "--model", names[0], "--out", tmp_path / "w")
  assert rc == 2 and "timm has no BN-Inception" in err and "--checkpoint" in err


def test_resnet_checkpoint_as_vit_lists_keys(tmp_path, capsys):
  # The first and last tensors of a torchvision / timm ResNet state dict.
  resnet = {"conv1.weight": (8, 3, 7, 7), "bn1.weight": (8,), "bn1.bias": (8,), "bn1.running_mean": (8,),
            "bn1.running_var": (8,), "layer1.0.conv1.weight": (8, 8, 1, 1), "fc.weight": (10, 8), "fc.bias": (10,)}
  save_file({k: np.ones(v, np.float32) for k, v in resnet.items()}, str(tmp_path / "resnet.safetensors"))
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224", "--checkpoint", tmp_path / "resnet.safetensors",
                        "--out", tmp_path / "w")
  assert rc == 2
  assert "missing keys" in err and "cls_token" in err and "blocks.0.attn.qkv.weight" in err
  assert "unexpected keys" in err and "fc.weight" in err
  assert not (tmp_path / "w").exists()


def test_vit_s_checkpoint_as_vit_b_lists_misshaped_keys(vit_s_checkpoint, tmp_path, capsys):
  _, path = vit_s_checkpoint
  rc, _, err = _run_cli(capsys, "--model", "vit_base_patch16_224", "--checkpoint", path, "--out", tmp_path / "w")
  assert rc == 2
  assert "mis-shaped keys (150)" in err  # every parameter: all have the width in their shape
  assert "blocks/0/attn/qkv/kernel: file (384, 1152) vs model (768, 2304)" in err


def test_weights_dirs_of_other_models_do_not_load_into_vit_b(vit_s_dir, tmp_path):
  listed = r"(?s)holds 'vit_small_patch16_224'.*mis-shaped keys \(150\): blocks/0/attn/proj/bias: file \(384,\)"
  with pytest.raises(WeightsMismatchError, match=listed):
    create("vit_base_patch16_224", weights=str(vit_s_dir))
  resnet_flat = {"conv1/kernel": np.zeros((7, 7, 3, 64), np.float32), "bn1/scale": np.ones(64, np.float32)}
  write_weights_dir(tmp_path / "r", model_name="resnet50", family="resnet", arch={}, flat=resnet_flat,
                    pretrained_cfg=PretrainedCfg(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
                    source="test", dropped_keys=[])
  with pytest.raises(WeightsMismatchError) as info:
    create("vit_base_patch16_224", weights=str(tmp_path / "r"))
  message = str(info.value)
  assert "holds 'resnet50' (resnet)" in message
  assert "missing keys (150): blocks/0/attn/proj/bias" in message
  assert "unexpected keys (2): bn1/scale, conv1/kernel" in message


def test_strictness_and_bad_files(tmp_path, capsys):
  sd = _tiny_sd()
  sd["blocks.5.norm1.weight"] = np.ones(64, np.float32)  # a block the model does not have
  del sd["blocks.1.mlp.fc2.bias"]
  save_file(sd, str(tmp_path / "bad.safetensors"))
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224", "--checkpoint", tmp_path / "bad.safetensors",
                        "--out", tmp_path / "w", *TINY_ARGS)
  assert rc == 2
  assert "missing keys (1): blocks.1.mlp.fc2.bias" in err and "unexpected keys (1): blocks.5.norm1.weight" in err
  (tmp_path / "w.ckpt").write_bytes(b"")
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224", "--checkpoint", tmp_path / "w.ckpt", "--out",
                        tmp_path / "w")
  assert rc == 2 and "unknown checkpoint type '.ckpt'" in err
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224", "--checkpoint", tmp_path / "none.pth", "--out",
                        tmp_path / "w")
  assert rc == 2 and "not found" in err
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224.no_such_tag", "--checkpoint",
                        tmp_path / "bad.safetensors", "--out", tmp_path / "w")
  assert rc == 2 and "unknown pretrained tag 'no_such_tag'" in err
  assert not (tmp_path / "w").exists()
  with open(tmp_path / "tiny.json", "w") as f:  # a file that is no archive of any kind
    json.dump({}, f)
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224", "--checkpoint", tmp_path / "tiny.json", "--out",
                        tmp_path / "w")
  assert rc == 2 and "unknown checkpoint type '.json'" in err


@pytest.mark.parity
def test_strictness_of_torch_checkpoints(tmp_path, capsys):
  sd = live.tensors(_tiny_sd())
  sd["blocks.5.norm1.weight"] = sd["norm.weight"].clone()  # a block the model does not have
  del sd["blocks.1.mlp.fc2.bias"]
  _torch_save(sd, tmp_path / "bad.pth")
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224", "--checkpoint", tmp_path / "bad.pth", "--out",
                        tmp_path / "w", *TINY_ARGS)
  assert rc == 2
  assert "missing keys (1): blocks.1.mlp.fc2.bias" in err and "unexpected keys (1): blocks.5.norm1.weight" in err
  _torch_save({"weights": sd, "note": "not a tensor"}, tmp_path / "odd.pth")
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224", "--checkpoint", tmp_path / "odd.pth", "--out",
                        tmp_path / "w", *TINY_ARGS)
  assert rc == 2 and "not tensors" in err and "weights (dict)" in err
  assert not (tmp_path / "w").exists()
def test_out_refuses_what_is_not_a_weights_directory(tmp_path, capsys, monkeypatch, vit_s_checkpoint):
  _, checkpoint = vit_s_checkpoint
  weights = tmp_path / "weights"
  (weights / "vit_b16").mkdir(parents=True)
  (weights / "vit_b16" / "params.npz").write_bytes(b"keep me")
  (weights / "notes.txt").write_text("keep me too")
  rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224", "--checkpoint", checkpoint, "--out", weights)
  assert rc == 2 and "holds other files (notes.txt, vit_b16)" in err
  monkeypatch.chdir(weights / "vit_b16")
  for out in (weights, ".", "..", weights / "notes.txt"):
    rc, _, err = _run_cli(capsys, "--model", "vit_small_patch16_224", "--checkpoint", checkpoint, "--out", out)
    assert rc == 2, out
    assert err.startswith("error: refusing --out") and err.count("\n") == 1, err
  assert (weights / "vit_b16" / "params.npz").read_bytes() == b"keep me"
  assert (weights / "notes.txt").read_text() == "keep me too"
  assert sorted(os.listdir(weights)) == ["notes.txt", "vit_b16"]  # no temporary folder left either


def test_out_replaces_an_empty_folder_or_a_weights_directory(tmp_path, vit_s_dir):
  from dml_jax.convert.weights_dir import check_out_dir, is_weights_dir

  empty = tmp_path / "empty"
  empty.mkdir()
  assert check_out_dir(empty) == empty
  assert is_weights_dir(vit_s_dir) and check_out_dir(vit_s_dir) == vit_s_dir
  flat = {"a": np.zeros(3, np.float32)}
  cfg = PretrainedCfg(mean=(0.5,) * 3, std=(0.5,) * 3)
  for out in (empty, tmp_path / "new"):
    write_weights_dir(out, model_name="m", family="vit", arch={}, flat=flat, pretrained_cfg=cfg, source="s",
                      dropped_keys=[])
    assert is_weights_dir(out)
  write_weights_dir(tmp_path / "new", model_name="m2", family="vit", arch={}, flat=flat, pretrained_cfg=cfg,
                    source="s2", dropped_keys=[])
  assert read_weights_dir(tmp_path / "new")[0]["model"] == "m2"
  assert sorted(os.listdir(tmp_path)) == ["empty", "new"]  # the old copy and the temporary folder are gone
