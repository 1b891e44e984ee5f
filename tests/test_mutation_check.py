"""tests/mutation_check.py stays runnable: every mutant still applies to the source, names tests that exist, every
method has one, and every mutant expected to survive is explained in docs/testing.md. (Running the mutants is the
CI's mutation step, `python tests/mutation_check.py`.)"""

from __future__ import annotations

import pathlib
import re

import mutation_check as mc

from dml_jax import methods

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_every_mutant_applies_exactly_once_and_names_existing_tests():
  names = [m.name for m in mc.MUTANTS]
  assert len(names) == len(set(names)) and len(names) >= 25
  present = [m for m in mc.MUTANTS if (REPO / m.path).is_file()]
  stale = {m.name: mc.check_applies(m) for m in present if mc.check_applies(m)}
  assert not stale, f"mutants whose source moved on (update their text in tests/mutation_check.py): {stale}"
  for m in present:
    for selection in m.tests:
      file, _, test = selection.partition("::")
      source = (REPO / file).read_text()
      assert not test or re.search(rf"^def {re.escape(test.split('[')[0])}\(", source, re.M), f"{m.name}: {selection}"


def test_every_method_and_area_has_mutants():
  areas = {m.area for m in mc.MUTANTS}
  for area in ("backbone", "loss", "metric", "kmeans", "optimizer", "schedule", "transform", "engine"):
    assert area in areas, area
  missing = [name for name in methods.list_methods() if f"method:{name}" not in areas]
  assert not missing, f"methods without a mutant in tests/mutation_check.py: {missing}"


def test_equivalent_mutants_are_explained_in_the_testing_docs():
  doc = (REPO / "docs" / "testing.md").read_text()
  for m in mc.MUTANTS:
    if m.equivalent:
      assert f"`{m.name}`" in doc, f"{m.name} is marked equivalent but docs/testing.md does not explain it"
