"""The suite's own machinery: its schedule (tests/conftest.py, scripts/test.sh): the heavy tests first, the longest
first."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import HANG_GUARD_S, REPO, heavy_first


class Item:
    def __init__(self, name: str, seconds: float | None = None):
        self.name, self.seconds = name, seconds

    def get_closest_marker(self, name: str):
        return pytest.mark.heavy(self.seconds).mark if name == "heavy" and self.seconds is not None else None


def test_heavy_tests_come_first_longest_first_and_the_rest_keep_their_order():
    items = [Item("a"), Item("b", 20), Item("c"), Item("d", 90), Item("e", 20), Item("f", 5)]
    heavy_first(items)
    assert [i.name for i in items] == ["d", "b", "e", "f", "a", "c"]


def test_the_suite_is_collected_heavy_first_and_the_workers_get_one_test_at_a_time():
    """pytest's own collection of two files puts test_compile's three compiled runs (heavy) before the rest."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_units.py",
                        "tests/test_compile.py"], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S,
                       check=True)  # fmt: skip
    ids = [ln for ln in r.stdout.splitlines() if "::" in ln]
    assert len(ids) > 20 and all("test_compile.py::test_compiled_" in i for i in ids[:3]), ids[:4]
    assert not any("test_compile.py::test_compiled_" in i for i in ids[3:])
    assert "--maxschedchunk 1" in (REPO / "scripts" / "test.sh").read_text()


def test_the_libraries_objects_are_out_of_the_collectors_reach():
    """conftest.pytest_collection_finish froze what the imports made (diffusers' and transformers' model classes
    included): a full collection scans only what tests make."""
    import gc
    import sys

    assert gc.get_freeze_count() > 100_000
    assert "diffusers.models.unets.unet_2d_condition" in sys.modules
