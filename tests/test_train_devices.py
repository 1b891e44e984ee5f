"""The same training on 1 and on 8 (fake CPU) devices agrees; training never imports torch.

Each run is a subprocess, because the device count is fixed when jax starts (XLA_FLAGS must be set
before jax is imported) and because `sys.modules` must be free of the test suite's own torch import.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# A tiny ViT (as configs/demo.py) and a tiny ResNet with BatchNorm statistics in training mode (their
# mean/variance must be taken over the GLOBAL batch), each for 2 epochs x 3 steps of 16 images.
_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    import jax
    from dml_jax import pytree as tree_lib
    from dml_jax.train import loop
    import orbax.checkpoint as ocp

    spec = importlib.util.spec_from_file_location("demo", "configs/demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = sys.argv[1]
    result = {"devices": jax.device_count()}
    for name in ("vit", "resnet"):
      c = demo.get_config()
      c.num_epochs, c.data.batch_size, c.data.steps_per_epoch, c.data.num_threads = 2, 16, 3, 2
      c.eval.every_epochs, c.eval.before_training, c.log.every_steps, c.log.progress = 0, False, 1, False
      if name == "resnet":
        c.model.backbone = "resnet50"
        c.model.backbone_overrides = dict(layers=(1, 1), channels=(8, 16), stem_width=8)
        c.method.head = "gap_gmp_linear"
        c.method.bn_freeze = False
      workdir = f"{out}/{name}"
      loop.fit(c, workdir)
      records = [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")]
      result[name + "_losses"] = [r["loss"] for r in records if r["kind"] == "train"]
      import pathlib
      state = ocp.StandardCheckpointer().restore(pathlib.Path(workdir).absolute() / "checkpoints/steps/6/state")
      flat = {**tree_lib.flatten(state["params"]), **{"state/" + k: v for k, v in
                                                      tree_lib.flatten(state["method_state"]).items()}}
      np.savez(f"{out}/{name}_params.npz", **{k.replace("/", "|"): np.asarray(v) for k, v in flat.items()})
    result["torch_loaded"] = "torch" in sys.modules
    print("RESULT " + json.dumps(result))
""")


def _start(num_devices: int, out: pathlib.Path) -> subprocess.Popen:
  out.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
         "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
  return subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
  stdout, stderr = proc.communicate(timeout=900)
  assert proc.returncode == 0, stderr[-4000:]
  line = [line for line in stdout.splitlines() if line.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("devices")
  procs = {n: _start(n, root / str(n)) for n in (1, 8)}  # concurrently: most of each run is serial work
  return {n: (_result(p), root / str(n)) for n, p in procs.items()}


@pytest.mark.integration
def test_one_and_eight_devices_agree(runs):
  (one, dir1), (eight, dir8) = runs[1], runs[8]
  assert one["devices"] == 1 and eight["devices"] == 8
  for name in ("vit", "resnet"):
    np.testing.assert_allclose(eight[name + "_losses"], one[name + "_losses"], rtol=0, atol=1e-5, err_msg=name)
    p1, p8 = np.load(dir1 / f"{name}_params.npz"), np.load(dir8 / f"{name}_params.npz")
    assert sorted(p1.files) == sorted(p8.files)
    for key in p1.files:
      a, b = p1[key], p8[key]
      if key.endswith("attn|qkv|bias"):
        # The key bias shifts every logit of a query's softmax row equally, so its true gradient is 0 and
        # what reaches it is rounding noise, which Adam scales to +-lr steps (on any device count, torch
        # too). Compare the query and value biases only.
        dim = a.shape[0] // 3
        a, b = np.concatenate([a[:dim], a[2 * dim:]]), np.concatenate([b[:dim], b[2 * dim:]])
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=f"{name} {key}")


def test_training_imports_no_torch(runs):
  assert runs[1][0]["torch_loaded"] is False
  assert runs[8][0]["torch_loaded"] is False
