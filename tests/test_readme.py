"""Every command in README.md's fenced bash blocks runs as written, or is listed here with why it cannot run.

The commands run in README order in one scratch directory (so the demo's `--eval_only` finds the demo's
checkpoint), with `python` / `.venv/bin/python` as this interpreter, `/data` as a generated dataset tree and
the checkpoint files they name generated from seeded numpy. The demo trains in full (about 45 s): the numbers
it prints must be the ones configs/demo.py's docstring states. `pip install` and `python3 -m venv` are checked
by parsing: the extras they name must exist in pyproject.toml.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# Commands that need what a test machine does not have; the first pattern found in a command wins.
SKIPPED = {
    r"pytest -q$": "the test suite itself (.ci/run runs this command)",
    r"pytest -m parity": "needs the `parity` extra (torch, several GB); .ci/run runs this command",
    r"pytest -m integration": "the integration tests, this one among them (.ci/run runs this command)",
    r"tests/mutation_check\.py$": "runs parts of the test suite ~50 times (minutes); .ci/run runs this command",
    r"benchmarks/run_all\.py --quick$": "every benchmark at tiny sizes (minutes); .ci/run runs this command",
    r"--model vit_base_patch16_224\.augreg_in21k --out": "downloads the weights through timm (network)",
    r"--model vit_small_patch16_224\.augreg_in21k --out weights/vit_s16$": "downloads the weights through timm "
                                                                          "(network); the AugReg .npz line of "
                                                                          "'Weights' writes the same directory",
    r"--checkpoint (resnet50\.pth|bn_inception-52deb4733\.pth)": "reads a downloaded torch checkpoint (needs torch "
                                                                 "and the file)",
    r"configs/(cars_vitb|proxy_anchor_cub_resnet50)\.py --workdir runs/(cars_vitb|pa_cub) (?!.*--eval_only)":
        "trains on the real dataset from converted ImageNet weights (hours); tests/test_vptsp_train.py runs "
        "cars_vitb.py on a generated tree with a shrunk ViT",
    r"--coordinator_address=host0:1234 --num_processes=2 --process_id=[01]": "two hosts; tests/test_multihost.py "
                                                                              "runs these two commands on localhost",
    r"^srun ": "needs a SLURM cluster (the same program as the two-host commands, its flags from SLURM's environment)",
}
# Appended to `train.py --config configs/demo.py`: no progress bars in the captured output.
DEMO_FLAGS = ["--config.log.progress=False"]
# Appended to `train.py --config configs/folder_vits.py`: the README's recipe (ViT-S/16 from the converted weights,
# Proxy-Anchor, warm-up, plots) on the generated photos, shrunk to 32 px and two short epochs.
FOLDER_FLAGS = ["--config.log.progress=False", "--config.num_epochs=2", "--config.data.batch_size=4",
                "--config.data.eval_batch_size=4", "--config.dataset.image_size=32", "--config.dataset.resize_size=32",
                "--config.data.num_threads=2"]
DOC_TOLERANCE = 0.5  # points; the demo is deterministic on one machine, other CPUs may round differently
FIRST_LINE_WITHIN_S = 10.0  # the trainer says what it loads before importing jax (about 1 s here)


def readme_commands(text: str) -> list[str]:
  """The lines of every ```bash block (README commands are one line each)."""
  blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
  return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def _extras(part: str) -> list[str]:
  match = re.search(r"pip install -e '\.\[([a-z,]+)\]'$", part)
  assert match, f"unrecognised install command {part!r}: expected pip install -e '.[extras]'"
  return match.group(1).split(",")


def _prepare_inputs(cwd: pathlib.Path, command: str) -> None:
  """Generates what a command reads: the dataset tree behind /data, your own photos in ~ (cwd/home), checkpoint
  and embedding files."""
  home = cwd / "home"
  if "~/photos" in command and not (home / "photos").exists():
    from dml_jax.data import synthetic

    synthetic.picture_folder(str(home / "photos"), ["cat", "dog", "fox", "owl", "bee", "elk"], 4, size=(48, 40))
  if "~/new/cat.jpg" in command and not (home / "new").exists():
    from dml_jax.data import synthetic

    (home / "new").mkdir(parents=True)
    synthetic.picture(0, seed=99, size=(48, 40)).save(home / "new" / "cat.jpg")
    synthetic.picture_folder(str(home / "more_queries"), ["dog"], 2, size=(48, 40), seed=7)
  if "run.npz" in command:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(8), 4)
    np.savez(cwd / "run.npz", embeddings=(rng.standard_normal((8, 8))[labels]
                                          + 0.5 * rng.standard_normal((32, 8))).astype(np.float32), labels=labels)
  if "/data" in command and not (cwd / "data").exists():
    from dml_jax.data import synthetic

    synthetic.cub_folders(str(cwd / "data"), "cub200", num_classes=6, size=(36, 30))
  if "S_16-i21k.npz" in command:  # an AugReg ViT-S/16 file: the naming of Google's vit_jax release
    from seeded import timm_vit_state_dict
    from test_convert_cli import _write_vit_jax_npz

    sd = timm_vit_state_dict(0, img_size=224, patch_size=16, depth=12, embed_dim=384, num_heads=6,
                             num_classes=1000, scale=0.02)
    _write_vit_jax_npz(sd, cwd / "S_16-i21k.npz", num_heads=6)
  if "E.npy" in command:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    np.save(cwd / "E.npy", (rng.standard_normal((10, 8))[labels] + 0.5 * rng.standard_normal((50, 8))).astype(
        np.float32))
    np.save(cwd / "L.npy", labels)


def _run(cwd: pathlib.Path, part: str) -> tuple[str, float]:
  """Runs one command as bash would, with this interpreter; returns its output and when its first line came."""
  words = shlex.split(part, comments=True)
  if words[0] in ("python", ".venv/bin/python"):
    words[0] = sys.executable
  words = [w.replace("/data", str(cwd / "data")) if w.startswith("/data") else w for w in words]
  # bash expands a leading ~ (HOME is cwd/home here); `--flag=~/x` reaches the program as written.
  words = [str(cwd / "home") + w[1:] if w.startswith("~/") else w for w in words]
  if "configs/demo.py" in words:
    words += DEMO_FLAGS
  if "configs/folder_vits.py" in words:
    words += FOLDER_FLAGS
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
         "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "HOME": str(cwd / "home")}
  start, first = time.perf_counter(), None
  proc = subprocess.Popen(words, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    first = time.perf_counter() - start if first is None else first
    lines.append(line)
  proc.wait(timeout=600)
  output = "".join(lines)
  assert proc.returncode == 0, f"README command failed ({proc.returncode}): {part}\n{output[-4000:]}"
  return output, first if first is not None else float("inf")


def _table_rows(text: str, first_words: tuple[str, ...]) -> dict[str, list[float]]:
  """{'before': [R@1, R@2, R@4, R@8, MAP@R], ...} from table lines starting with the given words."""
  rows = {}
  for line in text.splitlines():
    words = line.split()
    for first in first_words:
      n = len(first.split())
      if words[:n] == first.split() and len(words) >= n + 5:
        numbers = [w for w in words[n:] if re.fullmatch(r"\d+\.\d", w)]
        if len(numbers) == 5:
          rows[first] = [float(w) for w in numbers]
  return rows


def _check_demo_docstring(output: str) -> None:
  """The before / last-epoch rows of the demo's summary table are those configs/demo.py's docstring states."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  last = module.get_config().num_epochs - 1
  stated = _table_rows(module.__doc__, ("before", f"epoch {last}"))
  printed = _table_rows(output.split("\nsummary\n")[-1], ("before", str(last)))
  assert stated.keys() == {"before", f"epoch {last}"}, f"configs/demo.py's docstring lacks the table: {stated}"
  assert printed.keys() == {"before", str(last)}, output[-2000:]
  for doc_row, run_row in (("before", "before"), (f"epoch {last}", str(last))):
    assert np.allclose(printed[run_row], stated[doc_row], atol=DOC_TOLERANCE), (
        f"configs/demo.py states {doc_row} {stated[doc_row]}, the demo printed {printed[run_row]}")


@pytest.mark.integration
def test_readme_commands_run_as_written(tmp_path):
  pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
  extras = set(pyproject["project"]["optional-dependencies"])
  for name in ("train.py", "convert_timm_weights.py", "configs"):  # the commands name repository paths
    (tmp_path / name).symlink_to(REPO / name)
  commands = readme_commands((REPO / "README.md").read_text())
  assert len(commands) >= 10 and any("configs/demo.py" in c for c in commands)
  ran, skipped = [], []
  for command in commands:
    reason = next((why for pattern, why in SKIPPED.items() if re.search(pattern, command)), None)
    if reason:
      skipped.append(command)
      continue
    for part in command.split(" && "):
      if part == "python3 -m venv .venv":
        continue
      if re.match(r"(\.venv/bin/)?pip install", part):
        assert set(_extras(part)) <= extras, f"{part}: unknown extras; pyproject has {sorted(extras)}"
        continue
      _prepare_inputs(tmp_path, part)
      output, first_line_s = _run(tmp_path, part)
      if "train.py" in part:
        assert output.splitlines()[0].startswith(("training in", "evaluating in")), output[:500]
        assert first_line_s < FIRST_LINE_WITHIN_S, f"first line after {first_line_s:.1f} s: {part}"
        assert "recall@1" in output, output[-2000:]
      if "configs/demo.py" in part and "--eval_only" not in part:
        _check_demo_docstring(output)
      ran.append(part)
  # Exactly the listed commands were skipped, each pattern once: a new README command either runs or is listed.
  # Two downloaded checkpoints, two real-data trainings, two hosts: patterns that match two commands each.
  assert len(skipped) == len(SKIPPED) + 3, skipped
  for expected in ("python -m dml_jax.evaluate", "python -m dml_jax.data verify", "python -m dml_jax.data prepare",
                   "python convert_timm_weights.py", "--eval_only"):
    assert any(expected in part for part in ran), (expected, ran)
  assert (tmp_path / "runs" / "demo" / "metrics.jsonl").is_file()
  assert (tmp_path / "weights" / "vit_s16").is_dir()
  # Your own images: a trained model, its pictures, a saved index, an answer as JSON and as a grid.
  mine = tmp_path / "runs" / "mine"
  assert (mine / "split.json").is_file() and (mine / "index").is_dir()
  assert sorted(p.name for p in (mine / "plots").glob("*.png")) == ["curves.png", "embedding_map.png",
                                                                    "recall_at_k.png", "retrieval.png"]
  answer = json.loads((tmp_path / "answer.json").read_text())
  assert answer and (tmp_path / "answer.png").stat().st_size > 10_000, answer
  assert (tmp_path / "out.json").is_file() and (tmp_path / "data" / "prepared" / "cub200").is_dir()


@pytest.mark.parametrize("marker,expected", [("test-command", "pytest -q"), ("parity-command", "pytest -m parity -q")])
def test_ci_runs_the_marked_readme_commands(marker, expected):
  """.ci/run takes the block after each marker verbatim; the blocks must exist and run pytest."""
  text = (REPO / "README.md").read_text()
  block = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)\n```", text, flags=re.S)
  assert block and block.group(1).endswith(expected), marker
  assert marker in (REPO / ".ci" / "run").read_text()


def test_gitignore_lists_no_tracked_file():
  """A tracked file that .gitignore matches would vanish from `git status` once changed or deleted."""
  if not (REPO / ".git").exists():
    pytest.skip("not a git checkout")
  out = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  assert out == "", f"tracked files matched by .gitignore:\n{out}"
