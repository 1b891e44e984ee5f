"""tests/reference.py: files round-trip, a missing file names its generator, a stale live result fails."""

from __future__ import annotations

import numpy as np
import pytest
import reference


@pytest.fixture
def scratch_root(tmp_path, monkeypatch):
  monkeypatch.setattr(reference, "ROOT", tmp_path / "tests" / "references")
  monkeypatch.delenv(reference.WRITE_ENV, raising=False)
  return reference.ROOT


def test_files_round_trip_every_dtype_and_shape(scratch_root):
  values = {"value": np.float64(1.5), "grad/x": np.arange(6, dtype=np.float32).reshape(2, 3),
            "index": np.array([3, 1], np.int64), "empty": np.zeros((2, 0)), "tag": np.asarray("bicubic"),
            "flag": np.asarray(True), "names": np.asarray(["a", "bc"])}
  reference.save("group/values", values)
  loaded = reference.load("group/values")
  assert list(loaded) == list(values)
  for key, value in values.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
    np.testing.assert_array_equal(loaded[key], value)


def test_file_mode_reads_and_never_computes(scratch_root):
  reference.save("r", {"y": np.ones(3)})
  ref = reference.References("file", test="tests/test_x.py")
  np.testing.assert_array_equal(ref("r", lambda: pytest.fail("computed in file mode"))["y"], np.ones(3))
  with pytest.raises(FileNotFoundError, match=r"python tests/make_references.py tests/test_x.py"):
    ref("missing", dict)


def test_live_mode_checks_the_file_and_returns_the_live_result(scratch_root, monkeypatch):
  reference.save("r", {"y": np.array([1.0, 2.0]), "n": np.array([4])})
  ref = reference.References("live", test="tests/test_x.py")
  live = ref("r", lambda: {"y": np.array([1.0, 2.0 + 1e-9]), "n": [4]})
  assert live["y"][1] == 2.0 + 1e-9
  with pytest.raises(AssertionError, match=r"'r' is stale(?s:.*)y: max difference"):
    ref("r", lambda: {"y": np.array([1.0, 2.1]), "n": [4]})
  with pytest.raises(AssertionError, match=r"n: values differ"):
    ref("r", lambda: {"y": np.array([1.0, 2.0]), "n": [5]})
  with pytest.raises(AssertionError, match=r"file only \['n'\]"):
    ref("r", lambda: {"y": np.array([1.0, 2.0])})
  monkeypatch.setenv(reference.WRITE_ENV, "1")  # tests/make_references.py: write instead of compare
  ref("r", lambda: {"y": np.array([7.0])})
  np.testing.assert_array_equal(reference.load("r")["y"], [7.0])


def test_names_stay_inside_the_references_folder(scratch_root):
  for bad in ("", "/abs", "a/../../b"):
    with pytest.raises(ValueError, match="relative name"):
      reference.path_of(bad)
