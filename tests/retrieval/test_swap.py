"""Hot swap of a live Retriever to another bundle version on real files: every acknowledged
change (made before the swap, while the new version loaded, or sent to the old one after it)
is in the new version, the state dir changes owner, and a failed load leaves the old one whole."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.core.bundle import Bundle
from recsys.core.domain import Item
from recsys.core.errors import InvalidInput
from retrieval_service import durability as durability_module
from retrieval_service.backends import CatalogOpener, FaissCatalog
from retrieval_service.durability import LocalState
from retrieval_service.retriever import Retriever
from retrieval_service.state import Changes, OnlineState, read_state
from tests.retrieval.conftest import write_retrieval_version
from tests.retrieval.test_state import TELESCOPE, load, state_of, top


@pytest.fixture(scope="module")
def versions(catalog: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    """`v1`; `v2`, a later build with the same encoder; `v3`, another pooling (encoder)."""
    root = tmp_path_factory.mktemp("bundle")
    return {
        "v1": write_retrieval_version(root, catalog, "v1"),
        "v2": write_retrieval_version(root, catalog, "v2"),
        "v3": write_retrieval_version(root, catalog, "v3", pooling="cls"),
    }


class Writer(threading.Thread):
    """Upserts w-0, w-1, ... and deletes every third one again, through whichever retriever
    `target` holds, until stopped; records what was acknowledged."""

    def __init__(self, target: list[Retriever]) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.stop = threading.Event()
        self.live: set[str] = set()
        self.deleted: set[str] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set() or n < 6:
                item = Item(f"w-{n}", f"Written item number {n}", "A gadget.", "Gadgets")
                self.target[0].upsert([item])
                self.live.add(item.item_id)
                if n % 3 == 2:
                    gone = f"w-{n - 1}"
                    assert self.target[0].delete([gone]) == ([gone], [])
                    self.live.discard(gone)
                    self.deleted.add(gone)
                n += 1
        except BaseException as exc:
            self.error = exc


def state_of_dir(retriever: Retriever) -> OnlineState | None:
    """The state dir's writer, when this version holds it."""
    assert isinstance(retriever.durability, LocalState)
    return retriever.durability.state


def swap_under_writes(old: Retriever, bundle: Bundle) -> tuple[Retriever, Writer]:
    """`old.successor(bundle)` while a writer writes to `old`, then more writes sent to `old`
    after the switch (a call that picked the old version before it)."""
    target = [old]
    writer = Writer(target)
    writer.start()
    new = old.successor(bundle, device="cpu")
    writer.stop.set()
    writer.join(timeout=120)
    assert writer.error is None and not writer.is_alive()
    old.upsert([Item("late-1", "Late lamp", "Sent to the old version.", "Home")])
    old.delete(["item-002"])
    return new, writer


@pytest.mark.parametrize("version", ["v2", "v3"], ids=["same encoder", "another encoder"])
def test_the_successor_holds_every_acknowledged_change_and_takes_over_the_state_dir(
    versions: dict[str, Bundle], tmp_path: Path, version: str, backend: CatalogOpener
) -> None:
    old = load(versions["v1"], tmp_path, backend=backend)
    old.upsert([TELESCOPE])
    old.delete(["item-019"])

    new, writer = swap_under_writes(old, versions[version])

    assert new.version == version and state_of_dir(old) is None
    assert isinstance(state_of_dir(new), OnlineState)
    live = writer.live | {"new-1", "late-1"}
    gone = writer.deleted | {"item-019", "item-002"}
    for retriever in (new, old):  # the old one keeps a copy for pinned searches
        found, missing = retriever.get_items(sorted(live | gone))
        assert {item.item_id for item, _ in found} == live
        assert set(missing) == gone
    assert top(new, "Telescope for stargazing") == ["new-1"]
    assert_lexical(new, live, gone)
    if version == "v3":  # re-encoded by the new encoder, not the old one's vectors
        (_, vector), *_ = new.get_items(["new-1"])[0]
        np.testing.assert_allclose(vector, new.encoder.encode([TELESCOPE.text()])[0], atol=1e-6)

    # Writes after the switch are journaled by the new owner; a restart replays everything.
    new.upsert([Item("after-1", "Garden gnome", "", "Garden")])
    old.close()
    new.close()
    again = load(versions[version], tmp_path, backend=backend)
    assert again.replayed.encoded == 0  # another encoder's vectors were snapshotted at the swap
    found, missing = again.get_items(sorted(live | gone | {"after-1"}))
    assert {item.item_id for item, _ in found} == live | {"after-1"}
    assert set(missing) == gone
    assert_lexical(again, live | {"after-1"}, gone)
    again.close()


def assert_lexical(retriever: Retriever, live: set[str], gone: set[str]) -> None:
    """The lexical index agrees with the catalog: each written item's number (a word only its
    title holds among the written items) finds it, and a deleted item's no longer does
    (embedded backend only: Milvus has no lexical index here)."""
    if not isinstance(retriever.catalog, FaissCatalog):
        return
    for item_id in sorted(i for i in live | gone if i.startswith("w-")):
        number = item_id.removeprefix("w-")
        found = {item.item_id for item, _, _ in retriever.catalog.lexical_search(number, 100)}
        assert (item_id in found) == (item_id in live), item_id


@pytest.mark.parametrize("version", ["v2", "v3"], ids=["same encoder", "another encoder"])
def test_changes_acknowledged_after_the_state_dir_was_read_are_carried_over(
    versions: dict[str, Bundle],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    version: str,
    backend: CatalogOpener,
) -> None:
    """The window the journal read cannot see: writes right after it reach the successor
    through the record of changes the old version keeps while it loads."""
    old = load(versions["v1"], tmp_path, backend=backend)
    late = Item("late-2", "Late telescope", "Arrived after the read.", "Outdoors")

    def read_then_write(directory: Path) -> Changes:
        changes = read_state(directory)
        old.upsert([late, TELESCOPE])
        old.delete(["item-019"])
        return changes

    monkeypatch.setattr(durability_module, "read_state", read_then_write)
    new = old.successor(versions[version], device="cpu")
    assert state_of(new, ["late-2", "new-1", "item-019"]) == {
        "late-2": late,
        "new-1": TELESCOPE,
        "item-019": None,
    }
    if version == "v3":
        (_, vector), *_ = new.get_items(["late-2"])[0]
        np.testing.assert_allclose(vector, new.encoder.encode([late.text()])[0], atol=1e-6)
    old.close()
    new.close()


def test_a_version_that_fails_to_load_leaves_the_live_one_writing(
    versions: dict[str, Bundle], tmp_path: Path, backend: CatalogOpener
) -> None:
    old = load(versions["v1"], tmp_path, backend=backend)
    broken = Bundle(versions["v1"].root, "v1", {"encoder": {"pooling": "mean"}})  # no index
    with pytest.raises((KeyError, InvalidInput, OSError, RuntimeError)):
        old.successor(broken, device="cpu")
    assert state_of_dir(old) is not None
    old.upsert([TELESCOPE])
    assert state_of(old, ["new-1"]) == {"new-1": TELESCOPE}
    old.close()
    # The state dir is free again and holds the change.
    again = load(versions["v1"], tmp_path, backend=backend)
    assert state_of(again, ["new-1"]) == {"new-1": TELESCOPE}
    again.close()
