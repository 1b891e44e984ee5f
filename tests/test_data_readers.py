"""Readers on generated trees of every layout: exact split counts, labels, roles and error messages."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dml_jax.data import DatasetLayoutError, MissingFilesError, load_dataset, synthetic
from dml_jax.data.__main__ import main as cli_main


def _counts(splits):
  out = {"train": (len(splits.train), splits.train.num_classes), "eval": (len(splits.eval), splits.eval.num_classes)}
  if splits.name == "inshop":
    for role in ("query", "gallery"):
      mask = splits.eval.roles == role
      out[role] = (int(mask.sum()), len(np.unique(splits.eval.labels[mask])))
  for k, v in splits.extra.items():
    out[k] = (len(v), v.num_classes)
  return out


def _check_common(splits):
  for records in [splits.train, splits.eval, *splits.extra.values()]:
    # Labels are contiguous 0..C-1 within each split; every path is a file.
    assert np.array_equal(np.unique(records.labels), np.arange(records.num_classes))
    assert all(os.path.isfile(p) for p in records.paths)
  assert (splits.train.roles == "train").all()
  assert splits.num_train_classes == splits.train.num_classes


LAYOUTS = [
    ("cub200", lambda r: synthetic.cub_folders(r, "cub200")),
    ("cub200", lambda r: synthetic.cub_folders(r, "CUB_200_2011")),
    ("cub200", lambda r: synthetic.cub_folders(r, "cub-200-2011")),
    ("cars196", lambda r: synthetic.cars_folders(r, "cars196")),
    ("cars196", lambda r: synthetic.cars_annos(r, "cars196")),
    ("sop", lambda r: synthetic.sop(r, "sop", info_files=True)),
    ("sop", lambda r: synthetic.sop(r, "online_products", info_files=True)),
    ("sop", lambda r: synthetic.sop(r, "Stanford_Online_Products", info_files=False)),
    ("inshop", lambda r: synthetic.inshop(r, "inshop")),
    ("inshop", lambda r: synthetic.inshop(r, "Inshop_Clothes", official=True)),
    ("inaturalist", lambda r: synthetic.inaturalist(r, "inaturalist")),
    ("inaturalist", lambda r: synthetic.inaturalist(r, "inaturalist", lists_subdir="Inat_dataset_splits")),
    ("vehicleid", lambda r: synthetic.vehicleid(r, "VehicleID_V1.0")),
]


@pytest.mark.parametrize("name,write", LAYOUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LAYOUTS)])
def test_reader_counts_exact(tmp_path, name, write):
  expected = write(str(tmp_path))
  splits = load_dataset(name, str(tmp_path), source="raw")
  found = _counts(splits)
  for split, counts in expected.items():
    assert found[split] == counts, split
  _check_common(splits)


def test_cub_split_is_by_class_in_numeric_order(tmp_path):
  synthetic.cub_folders(str(tmp_path), "cub200")
  splits = load_dataset("cub200", str(tmp_path / "cub200"))  # the dataset folder itself works too
  assert list(splits.train.class_names[:3]) == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
  assert splits.train.class_names[-1] == "100.Bird_100" and splits.eval.class_names[0] == "101.Bird_101"
  # Label = class position; files sorted within the class.
  first = splits.train.paths[splits.train.labels == 2]
  assert [os.path.basename(p) for p in first] == ["img_002_0.jpg", "img_002_1.jpg", "img_002_2.jpg"]
  assert (splits.eval.roles == "test").all()


def test_cub_skips_appledouble_and_logs_other_files(tmp_path, caplog):
  synthetic.cub_folders(str(tmp_path), "cub200", num_classes=4)
  folder = tmp_path / "cub200" / "images" / "001.Bird_1"
  (folder / "._img_000_0.jpg").write_bytes(b"junk")
  (folder / "notes.txt").write_text("x")
  splits = load_dataset("cub200", str(tmp_path))
  assert len(splits.train) == 1 + 2  # classes 1 and 2 of 4
  assert "notes.txt" in caplog.text


def test_cars_folders_and_annos_agree(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  synthetic.cars_folders(str(a))
  synthetic.cars_annos(str(b))
  folders = load_dataset("cars196", str(a))
  annos = load_dataset("cars196", str(b))
  assert folders.layout != annos.layout
  assert folders.num_train_classes == annos.num_train_classes == 98
  # Annotation class ids 1..98 train (labels 0..97), 99..196 test.
  assert list(annos.train.class_names[:2]) == ["1", "2"] and annos.eval.class_names[0] == "99"
  assert annos.train.labels.max() == 97


def test_sop_labels_sorted_by_class_id(tmp_path):
  synthetic.sop(str(tmp_path), "sop")
  splits = load_dataset("sop", str(tmp_path))
  assert list(splits.train.class_names) == [str(c) for c in range(1, 8)]
  assert list(splits.eval.class_names) == [str(c) for c in range(8, 14)]
  assert all("/images/" in p for p in splits.train.paths)


def test_inshop_query_gallery_share_labels(tmp_path):
  synthetic.inshop(str(tmp_path), "inshop")
  splits = load_dataset("inshop", str(tmp_path))
  ev = splits.eval
  assert set(ev.roles.tolist()) == {"query", "gallery"}
  assert set(ev.labels[ev.roles == "query"].tolist()) == set(ev.labels[ev.roles == "gallery"].tolist())
  # Item ids are sparse (1, 4, 7, ...); each split numbers its own items 0..C-1 in id order.
  assert list(splits.train.class_names) == sorted(splits.train.class_names)


def test_inaturalist_labels_by_first_appearance(tmp_path):
  synthetic.inaturalist(str(tmp_path))
  splits = load_dataset("inaturalist", str(tmp_path))
  keys = ["/".join(p.split("/")[-3:-1]) for p in splits.train.paths]
  assert list(dict.fromkeys(keys)) == list(splits.train.class_names)
  assert splits.train.labels[0] == 0


@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_vehicleid_test_sizes(tmp_path, size):
  expected = synthetic.vehicleid(str(tmp_path))
  splits = load_dataset("vehicleid", str(tmp_path), vehicleid_test_size=size)
  assert (len(splits.eval), splits.eval.num_classes) == expected[f"test_{size}"]
  assert set(splits.extra) == {"test_small", "test_medium", "test_large"}


def test_missing_root_and_unknown_layout(tmp_path):
  with pytest.raises(DatasetLayoutError, match=r"'cub200'.*does not exist"):
    load_dataset("cub200", str(tmp_path / "nope"))
  (tmp_path / "cub200").mkdir()
  with pytest.raises(DatasetLayoutError) as err:
    load_dataset("sop", str(tmp_path))
  message = str(err.value)
  assert "'sop'" in message and str(tmp_path / "sop") in message and "Ebay_{train,test}.txt" in message


def test_missing_listed_file_stops_or_is_skipped(tmp_path, caplog):
  synthetic.sop(str(tmp_path), "sop")
  victim = load_dataset("sop", str(tmp_path)).train.paths[3]
  os.remove(victim)
  with pytest.raises(MissingFilesError, match=os.path.basename(victim)):
    load_dataset("sop", str(tmp_path))
  splits = load_dataset("sop", str(tmp_path), skip_corrupt=True)
  assert victim not in splits.train.paths.tolist() and "skipping 1 missing" in caplog.text


def test_malformed_split_file_names_line(tmp_path):
  synthetic.inshop(str(tmp_path), "inshop")
  path = tmp_path / "inshop" / "list_eval_partition.txt"
  lines = path.read_text().splitlines()
  lines[4] = lines[4].replace("train", "validation").replace("query", "validation").replace("gallery", "validation")
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(DatasetLayoutError, match="line 5"):
    load_dataset("inshop", str(tmp_path))


def test_verify_cli(tmp_path, capsys):
  synthetic.inshop(str(tmp_path), "inshop")
  assert cli_main(["verify", "--dataset", "inshop", "--data_root", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "query" in out and "gallery" in out and "25882" in out and "DIFFERS" in out
  assert cli_main(["verify", "--dataset", "inshop", "--data_root", str(tmp_path), "--strict"]) == 1
  assert cli_main(["verify", "--dataset", "cub200", "--data_root", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "expected one of these layouts" in err
  assert err.splitlines()[-1].startswith("error: dataset 'cub200': no recognised layout under")  # the last line


# ------------------------------------------------------------------ the split is by class id, never by position


@pytest.mark.parametrize("dataset, write, victim, named", [
    ("cub200", synthetic.cub_folders, "057.Bird_57", "class 57 (no folder images/057.*)"),
    ("cub200", synthetic.cub_folders, "200.Bird_200", "class 200 (no folder images/200.*)"),
    ("cars196", synthetic.cars_folders, "Chevrolet Malibu Sedan 2007",
     "class 73 (no folder images/Chevrolet Malibu Sedan 2007)"),
])
def test_a_missing_class_folder_is_an_error_naming_it(tmp_path, dataset, write, victim, named):
  write(str(tmp_path), dataset)
  folder = tmp_path / dataset / "images" / victim
  assert folder.is_dir()
  for f in folder.iterdir():
    f.unlink()
  folder.rmdir()
  with pytest.raises(DatasetLayoutError) as info:
    load_dataset(dataset, str(tmp_path))
  message = info.value.headline
  assert named in message and "never a shift" in message and "\n" not in message


def test_cars_folders_split_by_official_id(tmp_path):
  synthetic.cars_folders(str(tmp_path))
  splits = load_dataset("cars196", str(tmp_path))
  from dml_jax.data.readers import cars_classes

  assert sorted(cars_classes.IDS[cars_classes.class_key(n)] for n in splits.train.class_names) == list(range(1, 99))
  assert "Eagle Talon Hatchback 1998" in splits.train.class_names
  assert "FIAT 500 Abarth 2012" in splits.eval.class_names
  # A folder named with "-" for the "/" of the official name maps to its id (Ram C/V, class 174: test).
  assert "Ram C-V Cargo Van Minivan 2012" in splits.eval.class_names


def test_folders_that_are_no_class_are_named(tmp_path):
  synthetic.cub_folders(str(tmp_path), "cub200", num_classes=4)
  (tmp_path / "cub200" / "images" / "extra_birds").mkdir()
  (tmp_path / "cub200" / "images" / "extra_birds" / "a.jpg").write_bytes(synthetic.image_bytes(0))
  with pytest.raises(DatasetLayoutError, match=r"1 folder\(s\) in .* are no cub200 class: \['extra_birds'\]"):
    load_dataset("cub200", str(tmp_path))


def test_partial_tree_needs_its_subset_file(tmp_path):
  synthetic.cub_folders(str(tmp_path), "cub200", num_classes=6)  # classes 1-3 and 101-103
  splits = load_dataset("cub200", str(tmp_path))
  assert list(splits.train.class_names) == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
  assert list(splits.eval.class_names) == ["101.Bird_101", "102.Bird_102", "103.Bird_103"]
  subset = tmp_path / "cub200" / "dml_jax_subset.txt"
  subset.unlink()
  with pytest.raises(DatasetLayoutError, match=r"194 classes missing in .*: class 4 \(no folder images/004\.\*\)"):
    load_dataset("cub200", str(tmp_path))
  subset.write_text("1\n2\n3\n101\n102\n103\n104\n")
  with pytest.raises(DatasetLayoutError, match=r"class listed in dml_jax_subset.txt missing in .*class 104"):
    load_dataset("cub200", str(tmp_path))


def test_cars_annotations_missing_class_is_named(tmp_path):
  import scipy.io

  synthetic.cars_annos(str(tmp_path), num_classes=8)  # ids 1-4 and 99-102, declared in the subset file
  splits = load_dataset("cars196", str(tmp_path))
  assert list(splits.train.class_names) == ["1", "2", "3", "4"] and list(splits.eval.class_names) == [
      "99", "100", "101", "102"]
  mat_path = tmp_path / "cars196" / "cars_annos.mat"
  mat = scipy.io.loadmat(mat_path)
  annos = mat["annotations"]
  keep = [i for i in range(annos.shape[1]) if int(annos[0, i]["class"].reshape(-1)[0]) != 3]
  scipy.io.savemat(mat_path, {"annotations": annos[:, keep]})
  with pytest.raises(DatasetLayoutError, match=r"class 3 'Acura TL Sedan 2012' \(no annotation\)"):
    load_dataset("cars196", str(tmp_path))


def test_lists_sharing_a_class_are_refused(tmp_path):
  synthetic.sop(str(tmp_path), "sop")
  test_list = tmp_path / "sop" / "Info_Files" / "Ebay_test.txt"
  lines = test_list.read_text().splitlines()
  parts = lines[1].split()
  lines[1] = " ".join([parts[0], "3", parts[2], parts[3]])  # a training class in the test list
  test_list.write_text("\n".join(lines) + "\n")
  with pytest.raises(DatasetLayoutError, match=r"1 class\(es\) are in both the training split .* e\.g\. \[3\]"):
    load_dataset("sop", str(tmp_path))


def test_data_cli_error_is_one_line(tmp_path, capsys):
  synthetic.cub_folders(str(tmp_path), "cub200", num_classes=4)
  (tmp_path / "cub200" / "dml_jax_subset.txt").write_text("1\n2\n101\n102\n103\n")
  assert cli_main(["verify", "--dataset", "cub200", "--data_root", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: dataset 'cub200': class listed in dml_jax_subset.txt")
  assert "-- restore the missing class folder(s)" in err[0]
