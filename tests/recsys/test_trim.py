"""The change log's trim floor (recsys.app.trim) on a real PostgreSQL: the oldest position any
version that may still load was built at; refused while a version replays from position 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.app.trim import kept_versions, trim_floor, trim_log
from recsys.core.bundle import reject, staged_version, write_manifest
from recsys.core.errors import InvalidInput
from retrieval_service.changelog import DEFAULT_TABLE, ChangeLog
from retrieval_service.changes import deletes


def version(root: Path, name: str, log: ChangeLog | None, position: int = 0) -> str:
    """A version whose manifest says what `recsys build` read of the log (None: built without
    it); trimming reads nothing else of a version."""
    built = {"log_id": log.log_id, "position": position, "name": log.name} if log else None
    with staged_version(root, name) as stage:
        write_manifest(stage, {"version": name, **({"change_log": built} if built else {})})
    return name


def test_the_floor_is_the_oldest_position_of_the_versions_that_may_load(
    change_log_url: str, tmp_path: Path
) -> None:
    log = ChangeLog(change_log_url)
    first, second, _ = (log.append(deletes([f"id-{n}"])) for n in range(3))
    version(tmp_path, "v1", log, first)
    version(tmp_path, "v2", log, second)
    version(tmp_path, "v3", None)
    reject(tmp_path, "v3", {"reason": "refused"})  # never published: it does not count
    assert kept_versions(tmp_path) == ["v1", "v2"]
    assert trim_floor(tmp_path, ["v1", "v2"], log) == first

    done = trim_log(tmp_path, change_log_url, DEFAULT_TABLE)
    assert (done.deleted, done.floor, done.versions) == (1, first, 2)
    assert done.log == log.name
    assert log.trimmed_through() == first and log.read_after(0)[0].position == second


def test_a_version_built_without_the_log_refuses_the_trim(
    change_log_url: str, tmp_path: Path
) -> None:
    log = ChangeLog(change_log_url)
    version(tmp_path, "v1", log, log.append(deletes(["x"])))
    version(tmp_path, "v2", None)
    with pytest.raises(InvalidInput, match="version v2 was built without --change-log"):
        trim_floor(tmp_path, kept_versions(tmp_path), log)
    assert len(log.read_after(0)) == 1


def test_versions_built_from_an_empty_log_trim_nothing(change_log_url: str, tmp_path: Path) -> None:
    log = ChangeLog(change_log_url)
    version(tmp_path, "v1", log, 0)
    done = trim_log(tmp_path, change_log_url, DEFAULT_TABLE)
    assert (done.deleted, done.floor, done.versions) == (0, 0, 1)


def test_a_root_without_versions_is_named_before_the_log_is_reached(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="holds no bundle version"):
        trim_log(tmp_path, "postgresql://nobody@127.0.0.1:1/none", DEFAULT_TABLE)
