"""``benchmarks/replant.py`` (planted faults, run by ``make replant`` and CI) stays runnable: every
plant edits a line that exists exactly once, runs tests that exist, and names a real mutant;
the mutation report reads its results back."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


replant = _load("replant")


@pytest.mark.parametrize("plant", replant.PLANTS, ids=[p.name for p in replant.PLANTS])
def test_plant_is_well_formed(plant):
    assert plant.why and plant.tests
    for t in plant.tests:
        path = ROOT / t.split("::")[0]
        assert path.is_file(), t
        if "::" in t:
            assert f"def {t.split('::')[1]}(" in path.read_text(), t
    if plant.path is not None:
        text = (ROOT / plant.path).read_text()
        assert text.count(plant.old) == 1, f"{plant.name}: the planted line moved"
        assert plant.new != plant.old
    else:
        assert plant.env or plant.remove or plant.plain_from, plant.name
    if plant.mutant:
        # mutmut's name: module, then x_function or xǁClassǁmethod, then __mutmut_N.
        assert re.fullmatch(r"rnb_kernels(\.\w+)+\.x[ǁ_][\wǁ]*__mutmut_\d+", plant.mutant)
        module = plant.mutant.split(".x")[0].replace(".", "/") + ".py"
        assert module == plant.path, (plant.mutant, plant.path)


def test_names_are_unique():
    names = [p.name for p in replant.PLANTS]
    assert len(names) == len(set(names))


def test_mutation_report_reads_caught_plants(tmp_path):
    report = _load("mutation_report")
    md = tmp_path / "replant.md"
    md.write_text(
        "| plant | what it plants | mutmut mutant | tests run | result | s |\n"
        "|---|---|---|---|---|---:|\n"
        "| a | x | `rnb_kernels.balancer.xǁBalancerǁupdate__mutmut_8` | `t` | caught by t::f | 9 |\n"
        "| b | y | `rnb_kernels.balancer.xǁBalancerǁupdate__mutmut_9` | `t` | NOT CAUGHT (exit 0) "
        "| 9 |\n"
        "| c | z |  | `t` | caught by t::g | 3 |\n"
    )
    assert report.killed_by_replant(md) == {
        "rnb_kernels.balancer.xǁBalancerǁupdate__mutmut_8": "a (caught by t::f)"
    }
    assert report.killed_by_replant(tmp_path / "missing.md") == {}
