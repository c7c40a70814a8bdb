"""make check's runner (tools/unit_shards.py): each unit test file in one shard, balanced."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("unit_shards", ROOT / "tools" / "unit_shards.py")
assert _spec is not None and _spec.loader is not None
unit_shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(unit_shards)


def test_every_file_lands_in_exactly_one_shard():
    files = sorted((ROOT / "tests" / "unit").glob("test_*.py"))
    groups = unit_shards.shards(files, 4, {})
    dealt = [f for g in groups for f in g]
    assert sorted(dealt) == files and len(groups) == 4


def test_measured_seconds_outweigh_size():
    files = sorted((ROOT / "tests" / "unit").glob("test_*.py"))[:5]
    heavy = f"tests/unit/{files[0].name}"
    groups = unit_shards.shards(files, 2, {heavy: 1e6})
    # The file measured heaviest is alone in its shard; the rest share the other.
    assert [files[0]] in groups


def test_a_bad_job_count_is_a_usage_error(capsys):
    assert unit_shards.main(["-j", "zero"]) == 2
    assert capsys.readouterr().err.strip() == "unit_shards: -j takes a positive number"
