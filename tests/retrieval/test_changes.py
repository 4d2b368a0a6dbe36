"""The change record's stored forms are the ones earlier releases wrote, byte for byte: journal
lines (and change log rows, the same JSON) and snapshots written before `Change` existed load,
and writing the same changes again gives the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.core.domain import Item
from retrieval_service.changes import Change, deletes, from_record, to_record, upserts
from retrieval_service.state import read_snapshot, write_snapshot

LAMP = Item("a-1", "Lamp", "Brass, 40 cm.", "Home", {"colour": "gold"})
ECLAIR = Item("b-2", "Éclair", "", "Food")
VECTORS = np.array([[0.6, 0.8, 0.0], [1.0, 0.0, -0.0]], np.float32)
# Lines the release before `Change` journaled (state.upsert_record / delete_record).
UPSERT_LINE = (
    '{"op": "upsert", "items": [{"item_id": "a-1", "title": "Lamp", "description": "Brass, 40 '
    'cm.", "category": "Home", "attributes": {"colour": "gold"}}, {"item_id": "b-2", "title": '
    '"Éclair", "description": "", "category": "Food", "attributes": {}}], "encoder": '
    '"sha256:abc", "dimension": 3, "vectors": "mpkZP83MTD8AAAAAAACAPwAAAAAAAACA"}'
)
DELETE_LINE = '{"op": "delete", "item_ids": ["a-1", "z"]}'
# The meta of a snapshot that release wrote (state.write_snapshot) of the same changes.
SNAPSHOT_META = (
    '{"format": 1, "encoder": "sha256:abc", "through": 7, "items": [{"item_id": "a-1", "title": '
    '"Lamp", "description": "Brass, 40 cm.", "category": "Home", "attributes": {"colour": '
    '"gold"}}, {"item_id": "b-2", "title": "Éclair", "description": "", "category": "Food", '
    '"attributes": {}}], "deleted": ["gone"]}'
)


def dumped(changes: list[Change]) -> str:
    """A journal line without its newline (state.Journal.append)."""
    return json.dumps(to_record(changes), ensure_ascii=False)


def test_journal_lines_of_the_earlier_format_load_and_are_written_the_same() -> None:
    changes = from_record(json.loads(UPSERT_LINE), "test")
    assert [(c.item_id, c.item, c.encoder) for c in changes] == [
        ("a-1", LAMP, "sha256:abc"),
        ("b-2", ECLAIR, "sha256:abc"),
    ]
    np.testing.assert_array_equal(np.stack([c.vector for c in changes]), VECTORS)  # type: ignore[misc]
    assert dumped(upserts([LAMP, ECLAIR], VECTORS, "sha256:abc")) == UPSERT_LINE
    assert from_record(json.loads(DELETE_LINE), "test") == deletes(["a-1", "z"])
    assert dumped(deletes(["a-1", "z"])) == DELETE_LINE


def test_an_upsert_journaled_before_vectors_were_is_re_encoded() -> None:
    record = {"op": "upsert", "items": [{"item_id": "a-1", "title": "Lamp"}]}
    assert from_record(record, "test") == [Change("a-1", Item("a-1", "Lamp"))]


@pytest.mark.parametrize(
    "changes",
    [
        [],
        [*upserts([LAMP], VECTORS[:1], "e"), *deletes(["z"])],
        [Change("a-1", LAMP)],  # an upsert without its vector
        upserts([LAMP], VECTORS[:1], "e") + upserts([ECLAIR], VECTORS[1:], "f"),
    ],
    ids=["nothing", "upsert and delete", "no vector", "two encoders"],
)
def test_a_record_holds_deletes_or_upserts_with_vectors_of_one_encoder(
    changes: list[Change],
) -> None:
    with pytest.raises(ValueError, match="a record holds"):
        to_record(changes)


def test_a_snapshot_of_the_earlier_format_loads_and_is_written_the_same(tmp_path: Path) -> None:
    earlier = tmp_path / "earlier.npz"
    meta = np.frombuffer(SNAPSHOT_META.encode(), dtype=np.uint8)
    with earlier.open("wb") as fh:
        np.savez(fh, meta=meta, vectors=VECTORS)
    through, latest = read_snapshot(earlier)
    assert through == 7
    assert [(c.item_id, c.item, c.encoder) for c in latest.values()] == [
        ("a-1", LAMP, "sha256:abc"),
        ("b-2", ECLAIR, "sha256:abc"),
        ("gone", None, ""),
    ]
    again = tmp_path / "again.npz"
    write_snapshot(again, list(latest.values()), "sha256:abc", through)
    with np.load(again) as written:
        assert written["meta"].tobytes().decode() == SNAPSHOT_META
        np.testing.assert_array_equal(written["vectors"], VECTORS)
