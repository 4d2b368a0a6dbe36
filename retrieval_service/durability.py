"""Where a Retriever's online changes are kept, in which order they reach its catalog, and how
they reach a bundle version that replaces it (hot swap). One `Durability` per Retriever, chosen
when it is loaded:

- `LocalState`: the state dir of this process (state.py), or memory only. A write is journaled
  and applied under the Retriever's lock, so the journal's order is the order of application; a
  hot swap hands the state dir over to the successor, which then takes the writes.
- `SharedLog`: the PostgreSQL change log every replica follows (changelog.py). A write is
  committed there and then applied by catching up, so every replica applies every change in
  log order; a successor catches up on its own and this version keeps following.

`catalog_with_changes` is what either holds, applied to a catalog file's items: what a build
from the log and `recsys catalog export-state` write.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from recsys.core.bundle import Bundle
from recsys.core.domain import Item
from recsys.core.settings import default
from retrieval_service.changelog import ChangeLog, read_through, start_position
from retrieval_service.changes import Change, Latest, deletes, fold, upserts, with_changes
from retrieval_service.state import OnlineState, legacy_journal, read_state

if TYPE_CHECKING:
    from retrieval_service.retriever import Retriever

log = logging.getLogger(__name__)

# Catch-up passes outside the write lock before the last one under it: each pass replays what
# was written during the one before, so the pass under the lock is short.
CATCH_UP_PASSES = 3


@dataclass(frozen=True)
class Replay:
    """What applying stored changes did, for the log and for tests."""

    upserts: int = 0  # items whose online version replaced or extended the bundle's catalog
    deletes: int = 0  # item ids deleted online (present in this bundle or not)
    stored_vectors: int = 0  # upserts served with their journaled vectors
    encoded: int = 0  # upserts re-encoded: no vector, or one from another encoder
    journal_records: int = 0  # records read after the snapshot (or from the change log)

    def __add__(self, other: Replay) -> Replay:
        return Replay(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


class Durability(Protocol):
    """How a Retriever's online changes are kept and applied. Each method gets the Retriever
    (`owner`) it serves; `restore` runs once, when the owner is loaded."""

    @property
    def position(self) -> int:
        """The change log position the owner has applied through (0: no change log)."""
        ...

    def restore(self, owner: Retriever, bundle: Bundle) -> Replay:
        """Applies every stored change to `owner`, just opened from `bundle`."""
        ...

    def catch_up(self, owner: Retriever) -> Replay:
        """Applies what others stored since (a shared log); nothing for a state dir."""
        ...

    def upsert(self, owner: Retriever, items: Sequence[Item], vectors: np.ndarray) -> int:
        """Stores and applies the items with the owner's vectors; returns the catalog's size."""
        ...

    def delete(self, owner: Retriever, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Stores and applies the deletes of the ids present; returns (deleted, missing)."""
        ...

    def successor(self, owner: Retriever, bundle: Bundle, device: str) -> Retriever:
        """`bundle` loaded with every change applied, to replace `owner` (see
        Retriever.successor)."""
        ...

    def compact(self, owner: Retriever) -> bool:
        """Folds what is stored into a snapshot; False when there is nothing to do that with."""
        ...

    def info(self) -> dict[str, Any]:
        """`change_log` and `change_log_position`, as GetIndexInfo reports them."""
        ...

    def close(self, owner: Retriever) -> None:
        """Releases what this holds for `owner`."""
        ...


def log_replay(version: str, replayed: Replay, source: str) -> None:
    if replayed.upserts or replayed.deletes:
        log.info(
            "applied online changes from %s over bundle %s: %d upserts (%d with stored "
            "vectors, %d re-encoded), %d deletes, %d records",
            source,
            version,
            replayed.upserts,
            replayed.stored_vectors,
            replayed.encoded,
            replayed.deletes,
            replayed.journal_records,
        )


# -- the local state dir -----------------------------------------------------------------------


class LocalState:
    """Online changes in a state dir of this process (`directory`; None: in memory only, for
    offline use). The owner's lock keeps each change's journal record and its application in
    one order, and makes the hot swap's hand-over atomic.

    Hot swap: while a successor loads, the changes applied here are recorded (`_tap`) and
    replayed on it; at the switch the state dir moves to the successor's LocalState. Writes that
    still reach this version are passed on to the successor, which copies each change it applies
    into this version (`_predecessor`) for the searches pinned to it.
    """

    position = 0

    def __init__(
        self,
        directory: Path | None = None,
        compact_records: int = default("journal_compact_records"),
    ) -> None:
        self.directory = directory
        self.compact_records = compact_records
        self.state: OnlineState | None = None  # the state dir's one writer, while this holds it
        self._tap: list[Change] | None = None
        self._successor: Retriever | None = None
        self._predecessor: Retriever | None = None

    def restore(self, owner: Retriever, bundle: Bundle) -> Replay:
        """Takes the state dir (its lock) and applies its changes, whichever bundle version
        they were made under; then folds what was re-encoded or migrated into a snapshot, so
        the next start reuses it."""
        if self.directory is None:
            return Replay()
        self.state = OnlineState(
            self.directory,
            owner.encoder_id,
            self.compact_records,
            legacy=legacy_journal(self.directory, bundle.version),
        )
        changes = self.state.load()
        replayed = replace(owner.apply(changes.latest), journal_records=changes.journal_records)
        log_replay(owner.version, replayed, "the state dir")
        if replayed.encoded or self.state.migration_pending or self.state.due:
            self._compact_logged(owner)
        return replayed

    def catch_up(self, owner: Retriever) -> Replay:
        return Replay()

    def upsert(self, owner: Retriever, items: Sequence[Item], vectors: np.ndarray) -> int:
        """Journals (durably, with the vectors) and applies the items; a version that was
        switched away from passes the call on to its successor."""
        mirror = self._predecessor
        mirror_vectors = vectors
        if mirror is not None and mirror.encoder_id != owner.encoder_id:
            mirror_vectors = mirror.encoder.encode([item.text() for item in items])
        with owner.lock:
            successor = self._successor
            if successor is None:
                if self.state is not None:
                    self.state.append_upsert(items, vectors)
                owner.put(items, vectors)
                if self._tap is not None:
                    self._tap += upserts(items, vectors, owner.encoder_id)
                if mirror is not None and self._predecessor is mirror:
                    mirror.apply(fold(upserts(items, mirror_vectors, mirror.encoder_id)))
        if successor is not None:
            return successor.upsert(items)
        self._compact_when_due(owner)
        return len(owner.catalog)

    def delete(self, owner: Retriever, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Journals and tombstones the items; a version that was switched away from passes the
        call on to its successor."""
        with owner.lock:
            successor = self._successor
            if successor is None:
                present = owner.present(item_ids)
                if present and self.state is not None:
                    self.state.append_delete(present)
                result = owner.remove(item_ids)
                if present and self._tap is not None:
                    self._tap += deletes(present)
                if present and self._predecessor is not None:
                    self._predecessor.apply(fold(deletes(present)))
        if successor is not None:
            return successor.delete(item_ids)
        self._compact_when_due(owner)
        return result

    def successor(self, owner: Retriever, bundle: Bundle, device: str) -> Retriever:
        """Records the changes applied from now on; applies the state dir (read-only) to the
        new version, then the recorded changes, in passes outside the write lock and a last
        short one under it, after which the state dir and the writes are the new version's.
        Nothing acknowledged is lost or applied twice in a different order."""
        heir = LocalState(self.directory, self.compact_records)
        new = type(owner).open(bundle, device, owner.history, owner.backend, heir, owner.hybrid)
        state = self.state
        try:
            with owner.lock:
                self._tap = []
            if state is not None:
                changes = read_state(state.directory)  # every change acknowledged so far
                new.replayed = replace(
                    new.apply(changes.latest), journal_records=changes.journal_records
                )
                log_replay(new.version, new.replayed, "the state dir")
            for _ in range(CATCH_UP_PASSES):
                with owner.lock:
                    pending, self._tap = self._tap, []
                if not pending:
                    break
                new.apply(fold(pending))
            # A compaction guards itself with the owner's lock: none may run across the switch.
            paused = state.compaction_paused() if state else contextlib.nullcontext()
            with paused, owner.lock:
                new.apply(fold(self._tap or []))
                self._tap = None
                if state is not None:
                    state.encoder = new.encoder_id
                heir.state, self.state = state, None
                self._successor = new
                heir._predecessor = owner
                self._predecessor = None  # the version before this one is being closed
        except BaseException:
            self._tap = None
            new.close()
            raise
        if state is not None and new.encoder_id != owner.encoder_id:
            heir._compact_logged(new)  # another encoder: snapshot its vectors, so starts reuse them
        return new

    def compact(self, owner: Retriever) -> bool:
        """Folds the online changes into a snapshot and drops the journal it holds; False when
        there is no state dir or a compaction is already running."""
        if self.state is None:
            return False
        return self.state.compact(owner.lock, owner.capture)

    def info(self) -> dict[str, Any]:
        return {"change_log": "", "change_log_position": 0}

    def close(self, owner: Retriever) -> None:
        """Releases the state dir (another process may then load it); a version switched away
        from stops getting copies of its successor's changes."""
        if self.state is not None:
            self.state.close()
        successor = self._successor
        if successor is not None and isinstance(successor.durability, LocalState):
            with successor.lock:
                if successor.durability._predecessor is owner:
                    successor.durability._predecessor = None

    def _compact_when_due(self, owner: Retriever) -> None:
        if self.state is not None and self.state.due:
            self._compact_logged(owner)

    def _compact_logged(self, owner: Retriever) -> None:
        """Compacts; a failure is logged, not raised: every change is still in the journal."""
        try:
            self.compact(owner)
        except OSError as exc:
            log.error(
                "compacting online changes in %s failed (%s); the journal still holds them",
                self.state.directory if self.state else None,
                exc,
            )


# -- the shared change log ---------------------------------------------------------------------


class SharedLog:
    """Online changes in the shared change log, applied from the bundle version's position (see
    changelog.start_position) and then followed: `catch_up` applies what is new."""

    def __init__(self, log: ChangeLog) -> None:
        self.log = log
        self.position = 0  # of the last record applied
        # Keeps catch-ups in log order.
        self._following = threading.Lock()

    def restore(self, owner: Retriever, bundle: Bundle) -> Replay:
        start = self.position = start_position(bundle, self.log)
        replayed = self.catch_up(owner)
        log_replay(owner.version, replayed, f"change log {self.log.name} after position {start}")
        return replayed

    def catch_up(self, owner: Retriever) -> Replay:
        """Applies the log's records after this version's position, in order, a page at a time
        (each page in one step); raises NotReady when the log cannot be read and DataLoss
        (nothing of the page applied) when a record is corrupt."""
        total = Replay()
        with self._following:
            while records := self.log.read_after(self.position):
                latest = fold(change for record in records for change in record.changes)
                total += replace(owner.apply(latest), journal_records=len(records))
                self.position = records[-1].position
        return total

    def upsert(self, owner: Retriever, items: Sequence[Item], vectors: np.ndarray) -> int:
        """Commits the items with their vectors, then applies the log up to them, so this
        replica answers with every earlier change too."""
        self.log.append(upserts(items, vectors, owner.encoder_id))
        self.catch_up(owner)
        return len(owner.catalog)

    def delete(self, owner: Retriever, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Commits the deletes of the ids present, judged on every change committed so far."""
        self.catch_up(owner)
        present = owner.present(item_ids)
        if present:
            self.log.append(deletes(present))
            self.catch_up(owner)
        deleted = set(present)
        return present, [i for i in item_ids if i not in deleted]

    def successor(self, owner: Retriever, bundle: Bundle, device: str) -> Retriever:
        """Every change is in the log: the new version catches up on its own, and this one keeps
        following it while it answers pinned searches."""
        return type(owner).start(
            bundle, device, owner.history, owner.backend, SharedLog(self.log), owner.hybrid
        )

    def compact(self, owner: Retriever) -> bool:
        return False

    def info(self) -> dict[str, Any]:
        return {"change_log": self.log.name, "change_log_position": self.position}

    def close(self, owner: Retriever) -> None:
        """Nothing: the log is the service's, shared by every version."""


# -- the catalog with the online changes applied -------------------------------------------------


@dataclass(frozen=True)
class CatalogWithChanges:
    """A catalog's items with the online changes applied, and what was applied."""

    items: list[Item]
    upserts: int  # item ids whose latest change is an upsert
    deletes: int  # item ids whose latest change is a delete
    records: int  # records read (of a state dir: the journal's, after its snapshot)
    position: int = 0  # the change log's head they were read through (0: a state dir)
    trimmed_through: int = 0  # the log's floor: `items` must hold the changes up to it


def catalog_with_changes(
    items: Sequence[Item], source: Path | ChangeLog, version: str = ""
) -> CatalogWithChanges:
    """`items` with every online change applied (online changes win over the catalog file): a
    state dir's (read-only, so safe while retrieval serves from it; bundle `version`'s old
    per-version journal first), or a change log's up to its head."""
    if isinstance(source, ChangeLog):
        position, records = read_through(source)
        trimmed = source.trimmed_through()
        latest: Latest = fold(change for record in records for change in record.changes)
        count = len(records)
    else:
        position = trimmed = 0
        changes = read_state(source, legacy_journal(source, version) if version else None)
        latest, count = changes.latest, changes.journal_records
    upserted = sum(not change.deleted for change in latest.values())
    return CatalogWithChanges(
        with_changes(items, latest), upserted, len(latest) - upserted, count, position, trimmed
    )
