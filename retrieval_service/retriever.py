"""Search over the live catalog: query text/vector and user history → nearest items, with filters."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle
from recsys.core.domain import Hit, Item, SearchQuery
from recsys.core.errors import InvalidInput
from recsys.core.settings import default
from retrieval_service.backends import CatalogBackend, FaissCatalog, MilvusTarget, open_backend
from retrieval_service.catalog import ItemStore
from retrieval_service.changelog import ChangeLog, start_position
from retrieval_service.encoder import TextEncoder
from retrieval_service.state import (
    Latest,
    OnlineState,
    Upsert,
    delete_record,
    encoder_identity,
    fold_record,
    legacy_journal,
    read_changes,
    upsert_record,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistoryWeights:
    """How a user's recent items become one query vector."""

    half_life: float = default("history_half_life")  # weight halves every N items back in time
    weight: float = default("history_weight")  # of the history vector next to a text/vector query


@dataclass(frozen=True)
class Replay:
    """What start-up applied from the state dir, for the log and for tests."""

    upserts: int = 0  # items whose online version replaced or extended the bundle's catalog
    deletes: int = 0  # item ids deleted online (present in this bundle or not)
    stored_vectors: int = 0  # upserts served with their journaled vectors
    encoded: int = 0  # upserts re-encoded: no vector, or one from another encoder
    journal_records: int = 0  # records read after the snapshot (or from the change log)

    def __add__(self, other: Replay) -> Replay:
        return Replay(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True)
class _Change:
    """A change applied while a successor loads, replayed on it before the switch."""

    items: Sequence[Item] = ()  # an upsert's items, with their vectors
    vectors: np.ndarray | None = None
    encoder: str = ""
    deleted: Sequence[str] = ()  # a delete's ids


# Catch-up passes outside the write lock before the last one under it: each pass replays what
# was written during the one before, so the pass under the lock is short.
CATCH_UP_PASSES = 3


class Retriever:
    """Owns encoder, index and item store; safe to call from several threads."""

    def __init__(
        self,
        encoder: TextEncoder,
        catalog: CatalogBackend,
        state: OnlineState | None,
        version: str,
        history: HistoryWeights = HistoryWeights(),
        encoder_id: str = "",
    ) -> None:
        self.encoder = encoder
        self.catalog = catalog
        self.state = state
        self.version = version
        self.history = history
        # Identity of the vectors this version's encoder makes (a state dir records its own).
        self.encoder_id = encoder_id or (state.encoder if state is not None else "")
        self.replayed = Replay()
        # The shared change log this version follows instead of a state dir, and the position of
        # the last record applied; `_following` keeps catch-ups in log order.
        self.log: ChangeLog | None = None
        self.position = 0
        self._following = threading.Lock()
        # Keeps a change's journal record and its application in one order, and the hot swap's
        # hand-over atomic; searches do not take it (the catalog guards itself).
        self._lock = threading.Lock()
        # The Milvus collections a successor version opens (None: embedded FAISS).
        self.milvus: MilvusTarget | None = None
        # Hot swap (see `successor`): changes recorded while a successor loads; the successor
        # that writes go to once it holds the state dir; the predecessor kept for pinned
        # searches, which gets a copy of each change in memory.
        self._tap: list[_Change] | None = None
        self._successor: Retriever | None = None
        self._predecessor: Retriever | None = None

    @classmethod
    def load(
        cls,
        bundle: Bundle,
        state_dir: Path | None,
        device: str = "auto",
        history: HistoryWeights = HistoryWeights(),
        compact_records: int = default("journal_compact_records"),
        change_log: ChangeLog | None = None,
        milvus: MilvusTarget | None = None,
    ) -> Retriever:
        """Loads a bundle version (into FAISS, or its Milvus collection) and applies the online
        changes of the shared change log (from the position the version was built at) or else
        those kept in state_dir (when set), whichever bundle version they were made under."""
        retriever = cls.open(bundle, device, history, milvus)
        if change_log is not None:
            try:
                retriever.follow(change_log, start_position(bundle, change_log))
            except BaseException:
                retriever.close()
                raise
            return retriever
        if state_dir is not None:
            retriever.state = OnlineState(
                state_dir,
                retriever.encoder_id,
                compact_records,
                legacy=legacy_journal(state_dir, bundle.version),
            )
        try:
            retriever._replay()
        except BaseException:
            retriever.close()
            raise
        return retriever

    @classmethod
    def open(
        cls,
        bundle: Bundle,
        device: str = "auto",
        history: HistoryWeights = HistoryWeights(),
        milvus: MilvusTarget | None = None,
    ) -> Retriever:
        """A bundle version's encoder and catalog, without online changes."""
        manifest = bundle.manifest
        encoder = TextEncoder.load(
            bundle.file(bundle_files.ENCODER_DIR),
            pooling=manifest["encoder"]["pooling"],
            device=device,
            max_length=manifest["encoder"].get("max_length", 256),
        )
        catalog = open_backend(bundle, device, milvus)
        retriever = cls(encoder, catalog, None, bundle.version, history, encoder_identity(manifest))
        retriever.milvus = milvus
        return retriever

    @property
    def store(self) -> ItemStore:
        """The in-memory items and vectors (the embedded FAISS backend only: offline callers)."""
        if not isinstance(self.catalog, FaissCatalog):
            raise TypeError(f"bundle {self.version} is served from {self.catalog.info()}")
        return self.catalog.store

    def _replay(self) -> None:
        """Applies the state dir's changes at start (see `_apply`), then folds what was
        re-encoded or migrated into a snapshot, so the next start reuses it."""
        if self.state is None:
            return
        changes = self.state.load()
        self.replayed = replace(
            self._apply(changes.latest), journal_records=changes.journal_records
        )
        self._log_replay("the state dir")
        if self.replayed.encoded or self.state.migration_pending or self.state.due:
            self._compact_logged()

    def follow(self, log: ChangeLog, position: int) -> None:
        """Applies the change log's records after `position` (this version's start) and keeps
        following it: writes are committed there, and `catch_up` applies what is new."""
        self.log, self.position = log, position
        self.replayed = self.catch_up()
        self._log_replay(f"change log {log.name} after position {position}")

    def catch_up(self) -> Replay:
        """Applies the change log's records after this version's position, in order, a page at
        a time (each page in one step); raises NotReady when the log cannot be read."""
        assert self.log is not None
        total = Replay()
        with self._following:
            while records := self.log.read_after(self.position):
                latest: Latest = {}
                for record in records:
                    where = f"change log {self.log.name} position {record.position}"
                    fold_record(record.record, latest, where)
                total += replace(self._apply(latest), journal_records=len(records))
                self.position = records[-1].position
        return total

    def _log_replay(self, source: str) -> None:
        replayed = self.replayed
        if replayed.upserts or replayed.deletes:
            log.info(
                "applied online changes from %s over bundle %s: %d upserts (%d with stored "
                "vectors, %d re-encoded), %d deletes, %d records",
                source,
                self.version,
                replayed.upserts,
                replayed.stored_vectors,
                replayed.encoded,
                replayed.deletes,
                replayed.journal_records,
            )

    def _apply(self, latest: Latest) -> Replay:
        """Applies the latest change per item in one step: journaled vectors where this
        version's encoder made them, one batched encoding pass for the rest."""
        upserts = [u for u in latest.values() if u is not None]
        deleted = [item_id for item_id, u in latest.items() if u is None]
        reusable = [self._reusable(u, self.encoder_id) for u in upserts]
        stored = [u for u, ok in zip(upserts, reusable, strict=True) if ok]
        stale = [u for u, ok in zip(upserts, reusable, strict=True) if not ok]
        parts = [np.stack([u.vector for u in stored if u.vector is not None])] if stored else []
        if stale:
            parts.append(self.encoder.encode([u.item.text() for u in stale]))
        with self._lock:
            if parts:
                self.catalog.upsert([u.item for u in stored + stale], np.concatenate(parts))
            if deleted:
                self.catalog.delete(deleted)
        return Replay(
            upserts=len(upserts),
            deletes=len(deleted),
            stored_vectors=len(stored),
            encoded=len(stale),
        )

    def _reusable(self, upsert: Upsert, encoder: str) -> bool:
        """Whether the journaled vector is what the serving encoder would compute."""
        return (
            upsert.vector is not None
            and upsert.encoder == encoder
            and upsert.vector.shape == (self.catalog.dimension,)
        )

    # -- queries -------------------------------------------------------------------------------

    def query_vector(self, query: SearchQuery) -> tuple[np.ndarray, list[str]]:
        """The normalised query vector and the history ids the catalog does not know."""
        parts: list[np.ndarray] = []
        if query.vector is not None:
            if query.vector.shape != (self.catalog.dimension,):
                raise InvalidInput(
                    f"query_vector: expected {self.catalog.dimension} floats, got {query.vector.size}"
                )
            parts.append(_normalise(query.vector.astype(np.float32)))
        elif query.text:
            parts.append(self.encoder.encode([query.text])[0])
        history, unknown = self.history_vector(query.history_item_ids)
        if history is not None:
            parts.append(history * (self.history.weight if parts else 1.0))
        if not parts:
            raise InvalidInput(
                "query: give query_text, query_vector or history_item_ids"
                + (" (none of the history ids is in the catalog)" if unknown else "")
            )
        return _normalise(np.sum(parts, axis=0)), unknown

    def history_vector(self, item_ids: Sequence[str]) -> tuple[np.ndarray | None, list[str]]:
        """Recency-weighted mean of the known items' vectors (ids most recent first)."""
        found, unknown = self.catalog.get(item_ids)
        vector_of = {item.item_id: vector for item, vector in found}
        vectors, weights = [], []
        for position, item_id in enumerate(item_ids):
            if item_id in vector_of:
                vectors.append(vector_of[item_id])
                weights.append(0.5 ** (position / self.history.half_life))
        if not vectors:
            return None, unknown
        mean = np.average(np.stack(vectors), axis=0, weights=np.asarray(weights))
        return _normalise(mean), unknown

    def search(self, query: SearchQuery) -> tuple[list[Hit], list[str]]:
        """Top-k live items for the query after filters; also returns unknown history ids."""
        vector, unknown = self.query_vector(query)
        found = self.catalog.search(
            vector,
            query.top_k,
            exclude=query.exclude_item_ids,
            categories=query.categories,
            with_vectors=query.include_vectors,
        )
        hits = [
            Hit(item.item_id, score, item if query.include_text else None, found_vector)
            for item, score, found_vector in found
        ]
        return hits, unknown

    def get_items(self, item_ids: Sequence[str]) -> tuple[list[tuple[Item, np.ndarray]], list[str]]:
        """Known items with their vectors, in request order, and the ids not found."""
        return self.catalog.get(item_ids)

    # -- online changes ------------------------------------------------------------------------

    def upsert(self, items: Sequence[Item]) -> int:
        """Encodes, journals (durably, with the vectors) and applies the items; visible to the next
        search. A version that was switched away from passes the call on to its successor."""
        texts = [item.text() for item in items]
        vectors = self.encoder.encode(texts)
        if self.log is not None:
            # Applied here through the log, so this replica answers with every earlier change.
            self.log.append(upsert_record(items, vectors, self.encoder_id))
            self.catch_up()
            return len(self.catalog)
        mirror = self._predecessor
        mirror_vectors = vectors
        if mirror is not None and mirror.encoder_id != self.encoder_id:
            mirror_vectors = mirror.encoder.encode(texts)
        with self._lock:
            successor = self._successor
            if successor is None:
                if self.state is not None:
                    self.state.append_upsert(items, vectors)
                self.catalog.upsert(items, vectors)
                if self._tap is not None:
                    self._tap.append(_Change(items, vectors, self.encoder_id))
                if self._predecessor is not None and self._predecessor is mirror:
                    mirror._mirror(_Change(items, mirror_vectors, mirror.encoder_id))
        if successor is not None:
            return successor.upsert(items)
        self._compact_when_due()
        return len(self.catalog)

    def delete(self, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Journals and tombstones the items; returns (deleted, missing). A version that was
        switched away from passes the call on to its successor."""
        if self.log is not None:
            self.catch_up()  # "missing" is judged on every change committed so far
            present = self._present(item_ids)
            if present:
                self.log.append(delete_record(present))
                self.catch_up()
            deleted = set(present)
            return present, [i for i in item_ids if i not in deleted]
        with self._lock:
            successor = self._successor
            if successor is None:
                present = self._present(item_ids)
                if present and self.state is not None:
                    self.state.append_delete(present)
                result = self.catalog.delete(item_ids)
                if present and self._tap is not None:
                    self._tap.append(_Change(deleted=present))
                if present and self._predecessor is not None:
                    self._predecessor._mirror(_Change(deleted=present))
        if successor is not None:
            return successor.delete(item_ids)
        self._compact_when_due()
        return result

    def _present(self, item_ids: Sequence[str]) -> list[str]:
        """The ids the catalog holds, in request order (each once)."""
        _, missing = self.catalog.get(list(dict.fromkeys(item_ids)))
        absent = set(missing)
        return [i for i in dict.fromkeys(item_ids) if i not in absent]

    # -- hot swap --------------------------------------------------------------------------------

    def successor(self, bundle: Bundle, device: str = "auto") -> Retriever:
        """Loads `bundle` with every online change applied and hands the state dir over to it;
        blocking, and meant for a worker thread while this version keeps serving.

        Changes applied from now on are recorded; the state dir is read (read-only) and applied
        to the new version, then the recorded changes, in passes outside the write lock and a
        last short one under it, after which writes go to the new version. Nothing acknowledged
        is lost or applied twice in a different order, and searches are never blocked for long.
        The caller then makes the new version live; this one keeps answering pinned searches
        (with a copy of later changes) until it is closed.
        """
        if self.log is not None:
            # Every change is in the log: the new version catches up on its own, and this one
            # keeps following it while it answers pinned searches.
            return Retriever.load(
                bundle, None, device, self.history, change_log=self.log, milvus=self.milvus
            )
        new = Retriever.open(bundle, device, self.history, self.milvus)
        state = self.state
        try:
            with self._lock:
                self._tap = []
            if state is not None:
                changes = read_changes(state.directory)  # every change acknowledged so far
                new.replayed = replace(
                    new._apply(changes.latest), journal_records=changes.journal_records
                )
                new._log_replay("the state dir")
            for _ in range(CATCH_UP_PASSES):
                with self._lock:
                    pending, self._tap = self._tap, []
                if not pending:
                    break
                new._replay_changes(pending)
            # A compaction guards itself with the owner's lock: none may run across the switch.
            paused = state.compaction_paused() if state else contextlib.nullcontext()
            with paused, self._lock:
                new._replay_changes(self._tap or [])
                self._tap = None
                if state is not None:
                    state.encoder = new.encoder_id
                new.state, self.state = state, None
                self._successor = new
                new._predecessor = self
                self._predecessor = None  # the version before this one is being closed
        except BaseException:
            self._tap = None
            new.close()
            raise
        if state is not None and new.encoder_id != self.encoder_id:
            new._compact_logged()  # another encoder: snapshot its vectors, so starts reuse them
        return new

    def _replay_changes(self, changes: Sequence[_Change]) -> None:
        """Applies changes recorded on the predecessor, in order; vectors of another encoder are
        computed again."""
        for change in changes:
            if change.items and change.encoder != self.encoder_id:
                vectors = self.encoder.encode([item.text() for item in change.items])
                change = _Change(change.items, vectors, self.encoder_id)
            self._mirror(change)

    def _mirror(self, change: _Change) -> None:
        """Applies a change in memory only (the journal has it already)."""
        with self._lock:
            if change.items and change.vectors is not None:
                self.catalog.upsert(change.items, change.vectors)
            if change.deleted:
                self.catalog.delete(change.deleted)

    def compact(self) -> bool:
        """Folds the online changes into a snapshot and drops the journal it holds; False when
        there is no state dir or a compaction is already running."""
        if self.state is None:
            return False
        return self.state.compact(self._lock, self._capture)

    def close(self) -> None:
        """Releases the state dir (another process may then load it); a version switched away
        from stops getting copies of its successor's changes."""
        if self.state is not None:
            self.state.close()
        self.catalog.close()
        successor = self._successor
        if successor is not None:
            with successor._lock:
                if successor._predecessor is self:
                    successor._predecessor = None

    def _compact_when_due(self) -> None:
        if self.state is not None and self.state.due:
            self._compact_logged()

    def _compact_logged(self) -> None:
        """Compacts; a failure is logged, not raised: every change is still in the journal."""
        try:
            self.compact()
        except OSError as exc:
            log.error(
                "compacting online changes in %s failed (%s); the journal still holds them",
                self.state.directory if self.state else None,
                exc,
            )

    def _capture(self, item_ids: list[str]) -> tuple[list[Item], np.ndarray]:
        """The live items and vectors of the ids (called under the lock)."""
        found, _ = self.catalog.get(item_ids)
        vectors = [vector for _, vector in found]
        matrix = np.stack(vectors) if vectors else np.zeros((0, self.catalog.dimension), np.float32)
        return [item for item, _ in found], matrix

    def info(self) -> dict[str, Any]:
        backend = self.catalog.info()
        return {
            "size": len(self.catalog),
            "dimension": self.catalog.dimension,
            "bundle_version": self.version,
            "index_factory": backend["index_factory"],
            "device": backend["device"],
            "encoder": self.encoder.name,
            "pooling": self.encoder.pooling,
            "change_log": self.log.name if self.log is not None else "",
            "change_log_position": self.position,
        }


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)
