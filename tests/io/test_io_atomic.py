"""Files written through ``atomic_file`` are either the old complete one or the new one."""

from __future__ import annotations

import pytest

from cellvi.io import atomic_file


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "table.csv"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".csv" and tmp != target
        tmp.write_text("old,complete\n")
    assert target.read_text() == "old,complete\n"

    with pytest.raises(RuntimeError, match="disk full"), atomic_file(target) as tmp:
        tmp.write_text("new,half-wri")
        raise RuntimeError("disk full")
    assert target.read_text() == "old,complete\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]


def test_a_successful_write_replaces_the_file(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("{}")
    with atomic_file(target) as tmp:
        tmp.write_text('{"train": true}')
    assert target.read_text() == '{"train": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
