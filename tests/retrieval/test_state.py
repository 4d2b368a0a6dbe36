"""Online changes on real files over real bundle versions: stored vectors, compaction, crashes
between its steps, changes that outlive the bundle version they were made under, migration."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from prometheus_client import REGISTRY

from recsys.core.bundle import Bundle
from recsys.core.domain import Item, SearchQuery
from recsys.core.errors import DataLoss, InvalidInput
from recsys.rpc.status import status_code
from retrieval_service.backends import CatalogOpener, FaissCatalog
from retrieval_service.changes import encoder_identity
from retrieval_service.retriever import Retriever
from retrieval_service.state import (
    SNAPSHOT,
    OnlineState,
    legacy_journal,
    read_state,
    segments,
)
from tests.retrieval.conftest import write_retrieval_version

TELESCOPE = Item("new-1", "Telescope for stargazing", "Refractor, 70 mm aperture.", "Outdoors")
FLOOR_LAMP = Item("item-018", "Floor lamp", "Tall arc lamp.", "Home")  # replaces the desk lamp
KAYAK = Item("new-2", "Inflatable kayak", "Two-seat kayak with paddles and a pump.", "Outdoors")


@pytest.fixture(scope="module")
def versions(catalog: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    """Three versions of one bundle root: `v1`; `v2`, a later build of a changed catalog with the
    same encoder; `v3`, the first catalog embedded with another pooling (another encoder)."""
    root = tmp_path_factory.mktemp("bundle")
    later = catalog[catalog["item_id"] != "item-000"].copy()  # the new build dropped item-000
    later.loc[later["item_id"] == "item-005", "title"] = "Santoku knife"  # and renamed item-005
    return {
        "v1": write_retrieval_version(root, catalog, "v1"),
        "v2": write_retrieval_version(root, later, "v2"),
        "v3": write_retrieval_version(root, catalog, "v3", pooling="cls"),
    }


def load(
    bundle: Bundle,
    state_dir: Path,
    compact_records: int = 1000,
    backend: CatalogOpener = FaissCatalog.open,
) -> Retriever:
    return Retriever.load(
        bundle, state_dir, device="cpu", compact_records=compact_records, backend=backend
    )


def top(retriever: Retriever, text: str, k: int = 1) -> list[str]:
    hits, _ = retriever.search(SearchQuery(top_k=k, text=text))
    return [h.item_id for h in hits]


def state_of(retriever: Retriever, item_ids: list[str]) -> dict[str, Item | None]:
    found, _ = retriever.get_items(item_ids)
    by_id = {item.item_id: item for item, _ in found}
    return {item_id: by_id.get(item_id) for item_id in item_ids}


def test_replay_uses_the_journaled_vectors_when_the_encoder_is_the_same(
    versions: dict[str, Bundle], tmp_path: Path, backend: CatalogOpener
) -> None:
    retriever = load(versions["v1"], tmp_path, backend=backend)
    retriever.upsert([TELESCOPE])
    retriever.upsert([FLOOR_LAMP])
    retriever.upsert([KAYAK])
    retriever.delete(["new-2"])
    written = {
        item.item_id: vector for item, vector in retriever.get_items(["new-1", "item-018"])[0]
    }
    retriever.close()

    reloaded = load(versions["v1"], tmp_path, backend=backend)
    assert reloaded.replayed.encoded == 0  # not one text went through the encoder
    assert reloaded.replayed.stored_vectors == 2 and reloaded.replayed.deletes == 1
    assert reloaded.replayed.journal_records == 4
    for item, vector in reloaded.get_items(["new-1", "item-018"])[0]:
        np.testing.assert_array_equal(vector, written[item.item_id])
    assert top(reloaded, "Telescope for stargazing") == ["new-1"]
    assert state_of(reloaded, ["item-018", "new-2"]) == {"item-018": FLOOR_LAMP, "new-2": None}
    reloaded.close()


def test_another_encoder_re_encodes_the_changes_and_stores_its_own_vectors(
    versions: dict[str, Bundle], tmp_path: Path, backend: CatalogOpener
) -> None:
    assert encoder_identity(versions["v1"].manifest) == encoder_identity(versions["v2"].manifest)
    assert encoder_identity(versions["v1"].manifest) != encoder_identity(versions["v3"].manifest)
    retriever = load(versions["v1"], tmp_path, backend=backend)
    retriever.upsert([TELESCOPE, FLOOR_LAMP])
    retriever.close()

    other = load(versions["v3"], tmp_path, backend=backend)
    assert other.replayed.encoded == 2 and other.replayed.stored_vectors == 0
    expected = other.encoder.encode([TELESCOPE.text(), FLOOR_LAMP.text()])
    vectors = [vector for _, vector in other.get_items(["new-1", "item-018"])[0]]
    np.testing.assert_allclose(np.stack(vectors), expected, atol=1e-6)
    assert top(other, "Telescope for stargazing") == ["new-1"]
    other.close()
    # The re-encoded vectors went into a snapshot: the next start under v3 encodes nothing.
    again = load(versions["v3"], tmp_path, backend=backend)
    assert again.replayed.encoded == 0 and again.replayed.stored_vectors == 2
    again.close()


def test_a_newer_bundle_version_keeps_the_changes_made_under_the_older_one(
    versions: dict[str, Bundle], tmp_path: Path, backend: CatalogOpener
) -> None:
    old = load(versions["v1"], tmp_path, backend=backend)
    old.upsert([TELESCOPE, FLOOR_LAMP])
    assert old.delete(["item-019"]) == (["item-019"], [])
    old.close()

    new = load(
        versions["v2"], tmp_path, backend=backend
    )  # its catalog still holds item-019 and the desk lamp
    assert new.version == "v2" and new.replayed.encoded == 0
    assert top(new, "Telescope for stargazing") == ["new-1"]
    assert state_of(new, ["new-1", "item-018", "item-019"]) == {
        "new-1": TELESCOPE,
        "item-018": FLOOR_LAMP,
        "item-019": None,
    }
    assert "item-019" not in top(new, "Scented candle", k=24)
    # What the new build changed and nobody changed online is the new build's.
    renamed = state_of(new, ["item-000", "item-005"])
    assert renamed["item-000"] is None and renamed["item-005"] is not None
    assert renamed["item-005"].title == "Santoku knife"
    assert len(new.catalog) == 23 + 1 - 1  # v2's 23 items, + telescope, - item-019
    new.close()


def test_compaction_keeps_every_acknowledged_change_and_no_deleted_item_returns(
    versions: dict[str, Bundle], tmp_path: Path, backend: CatalogOpener
) -> None:
    retriever = load(versions["v1"], tmp_path, compact_records=3, backend=backend)
    expected: dict[str, Item | None] = {}
    for n in range(12):  # one-item changes; compaction after every third record
        item = Item(f"c-{n % 5}", f"Compaction probe {n} lantern", category="Outdoors")
        if n % 4 == 3:
            retriever.delete([item.item_id])
            expected[item.item_id] = None
        else:
            retriever.upsert([item])
            expected[item.item_id] = item
        assert state_of(retriever, list(expected)) == expected
    assert (tmp_path / SNAPSHOT).is_file()
    assert len(segments(tmp_path)) == 1  # compacted segments are gone
    retriever.close()

    reloaded = load(versions["v1"], tmp_path, compact_records=3, backend=backend)
    assert reloaded.replayed.journal_records < 3  # start-up read the snapshot, not the history
    assert reloaded.replayed.encoded == 0
    assert state_of(reloaded, list(expected)) == expected
    gone = [item_id for item_id, item in expected.items() if item is None]
    assert gone and not set(gone) & set(top(reloaded, "Compaction probe lantern", k=30))
    reloaded.close()


def test_a_crash_between_the_snapshot_and_the_journal_removal_loses_and_revives_nothing(
    versions: dict[str, Bundle], tmp_path: Path, backend: CatalogOpener
) -> None:
    state_dir = tmp_path / "state"
    retriever = load(versions["v1"], state_dir, backend=backend)
    retriever.upsert([TELESCOPE])
    retriever.upsert([KAYAK])
    retriever.delete(["new-1", "item-003"])
    journal = {path.name: path.read_bytes() for _, path in segments(state_dir)}
    assert retriever.compact()
    retriever.delete(["new-2"])  # after the snapshot: in the new segment only
    retriever.close()
    # The crash: the snapshot was renamed into place but the old segments were not removed yet.
    for name, data in journal.items():
        (state_dir / name).write_bytes(data)
    assert len(segments(state_dir)) == 2

    reloaded = load(versions["v1"], state_dir, backend=backend)
    assert reloaded.replayed.journal_records == 1  # the old segments were skipped
    assert state_of(reloaded, ["new-1", "new-2", "item-003"]) == dict.fromkeys(
        ["new-1", "new-2", "item-003"]
    )
    assert not {"new-1", "new-2"} & set(top(reloaded, "Telescope kayak", k=24))
    assert [path.name for _, path in segments(state_dir)] == ["journal.00000002.jsonl"]
    reloaded.close()


def test_a_crash_before_the_snapshot_rename_keeps_the_journal_in_force(
    versions: dict[str, Bundle], tmp_path: Path, backend: CatalogOpener
) -> None:
    state_dir = tmp_path / "state"
    retriever = load(versions["v1"], state_dir, backend=backend)
    retriever.upsert([TELESCOPE, KAYAK])
    retriever.delete(["new-2"])
    retriever.close()
    # The crash: new records went to the next segment (the last one torn mid-write, never
    # acknowledged) while the snapshot was half written under its temp name.
    with (state_dir / "journal.00000002.jsonl").open("w") as fh:
        fh.write('{"op": "upsert", "items": [{"item_id": "torn"')
    (state_dir / ".snapshot.abc123.tmp").write_bytes(b"PK\x03\x04 half a zip")

    reloaded = load(versions["v1"], state_dir, backend=backend)
    assert state_of(reloaded, ["new-1", "new-2", "torn"]) == {
        "new-1": TELESCOPE,
        "new-2": None,
        "torn": None,
    }
    assert not list(state_dir.glob(".snapshot.*"))
    reloaded.upsert([FLOOR_LAMP])  # appended after the torn record was cut
    reloaded.close()
    again = load(versions["v1"], state_dir, backend=backend)
    assert state_of(again, ["new-1", "item-018"]) == {"new-1": TELESCOPE, "item-018": FLOOR_LAMP}
    again.close()


def test_an_old_per_version_journal_is_migrated_into_the_shared_state(
    versions: dict[str, Bundle], tmp_path: Path, backend: CatalogOpener
) -> None:
    old = legacy_journal(tmp_path, "v1")
    records = [
        {"op": "upsert", "items": [asdict(TELESCOPE), asdict(KAYAK)]},
        {"op": "delete", "item_ids": ["new-2", "item-019"]},
        {"op": "upsert", "items": [asdict(FLOOR_LAMP)]},
    ]
    old.write_text("".join(json.dumps(r) + "\n" for r in records))
    other = legacy_journal(tmp_path, "v0")  # an older version's: lost before, left alone now
    other.write_text(json.dumps({"op": "delete", "item_ids": ["item-001"]}) + "\n")

    retriever = load(versions["v1"], tmp_path, backend=backend)
    assert retriever.replayed.encoded == 2  # the old format has no vectors
    expected = {"new-1": TELESCOPE, "new-2": None, "item-018": FLOOR_LAMP, "item-019": None}
    assert state_of(retriever, list(expected)) == expected
    assert state_of(retriever, ["item-001"])["item-001"] is not None
    assert not old.exists() and old.with_name(old.name + ".migrated").is_file()
    assert other.exists() and (tmp_path / SNAPSHOT).is_file()
    retriever.close()

    newer = load(versions["v2"], tmp_path, backend=backend)
    assert newer.replayed.encoded == 0
    assert state_of(newer, list(expected)) == expected
    newer.close()


def test_corrupt_state_is_data_loss_in_one_line_naming_the_file_and_line(tmp_path: Path) -> None:
    segment = tmp_path / "journal.00000001.jsonl"
    good = {"op": "delete", "item_ids": ["a"]}
    segment.write_text(json.dumps(good) + "\n" + "not json\n")
    with pytest.raises(DataLoss, match=r"journal\.00000001\.jsonl line 2: corrupt"):
        read_state(tmp_path)
    bad_vectors = {
        "op": "upsert",
        "items": [{"item_id": "a", "title": "A"}],
        **{"encoder": "e", "dimension": 4, "vectors": "AAAA"},  # 3 bytes, not 4 floats
    }
    segment.write_text(json.dumps(good) + "\n" + json.dumps(bad_vectors) + "\n")
    with pytest.raises(DataLoss, match=r"line 2: corrupt record \(3 vector bytes"):
        read_state(tmp_path)
    segment.write_text(json.dumps(good) + "\n" + json.dumps({"op": "upsert"}) + "\n")
    with pytest.raises(DataLoss, match=r"line 2: corrupt record \(missing 'items'\)$"):
        read_state(tmp_path)
    segment.unlink()
    (tmp_path / SNAPSHOT).write_bytes(b"not a zip")
    with pytest.raises(DataLoss, match=r"snapshot\.npz: corrupt snapshot"):
        read_state(tmp_path)


def corrupt_records() -> float:
    return REGISTRY.get_sample_value("recsys_retrieval_corrupt_records_total") or 0.0


def test_a_corrupt_journal_record_is_data_loss_and_changes_nothing(
    versions: dict[str, Bundle], tmp_path: Path
) -> None:
    """A record the state dir itself holds is not the caller's fault: DATA_LOSS, not
    INVALID_ARGUMENT. The load stops before it changes anything (no torn tail cut, no
    compaction, no migration), counts the record, and leaves the state dir free."""
    retriever = load(versions["v1"], tmp_path, compact_records=1)
    retriever.upsert([TELESCOPE])  # compacted into the snapshot
    retriever.delete(["item-019"])  # and into the next one, with an empty segment after it
    retriever.close()
    (segment,) = (path for _, path in segments(tmp_path))
    # Whole (not a torn tail), valid JSON, but a string where the ids' list belongs.
    segment.write_text(json.dumps({"op": "delete", "item_ids": "item-001"}) + "\n")
    # An old journal with a torn last record: a load that went on would cut it and migrate it.
    legacy_journal(tmp_path, "v1").write_text(json.dumps({"op": "delete", "item_ids": ["a"]}))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    counted = corrupt_records()

    with pytest.raises(
        DataLoss, match=rf"{segment.name} line 1: corrupt record \(item_ids"
    ) as info:
        load(versions["v1"], tmp_path, compact_records=1)
    assert status_code(info.value) == grpc.StatusCode.DATA_LOSS
    assert "\n" not in str(info.value)
    assert corrupt_records() == counted + 1
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    OnlineState(tmp_path, "e", 10).close()  # the failed load released the state dir


def test_the_catalog_with_a_state_dirs_changes_applied(
    versions: dict[str, Bundle], tmp_path: Path
) -> None:
    """What `recsys catalog export-state` writes: read-only, while retrieval holds the dir."""
    from recsys.core import bundle as bundle_files
    from retrieval_service.catalog import load_catalog_items
    from retrieval_service.durability import catalog_with_changes

    retriever = load(versions["v1"], tmp_path, compact_records=2)
    retriever.upsert([TELESCOPE])
    retriever.upsert([FLOOR_LAMP])  # the second record: compacted
    retriever.delete(["item-000", "new-1"])  # the tail
    items = load_catalog_items(versions["v1"].file(bundle_files.CATALOG))
    exported = catalog_with_changes(items, tmp_path, "v1")
    retriever.close()
    assert (exported.upserts, exported.deletes, exported.records) == (1, 2, 1)
    by_id = {item.item_id: item for item in items}
    by_id.update({"item-018": FLOOR_LAMP})
    del by_id["item-000"]
    assert exported.items == list(by_id.values())
    assert exported.position == exported.trimmed_through == 0


def test_one_state_dir_has_one_writer(tmp_path: Path) -> None:
    first = OnlineState(tmp_path, "e", 10)
    with pytest.raises(InvalidInput, match="in use by another retrieval process"):
        OnlineState(tmp_path, "e", 10)
    first.close()
    OnlineState(tmp_path, "e", 10).close()


def test_a_snapshot_and_its_tail_apply_over_a_newer_version(
    versions: dict[str, Bundle], tmp_path: Path, backend: CatalogOpener
) -> None:
    retriever = load(versions["v1"], tmp_path, compact_records=2, backend=backend)
    retriever.upsert([TELESCOPE])
    retriever.upsert([KAYAK])  # the second record: compacted
    retriever.delete(["item-019"])  # the tail
    retriever.close()
    newer = load(versions["v2"], tmp_path, backend=backend)
    assert newer.replayed.journal_records == 1 and newer.replayed.encoded == 0
    assert state_of(newer, ["new-1", "new-2", "item-019"]) == {
        "new-1": TELESCOPE,
        "new-2": KAYAK,
        "item-019": None,
    }
    newer.close()
