"""Online changes to the catalog, durable and independent of bundle versions: a snapshot of the
latest state per item plus a journal tail, in one state dir that every bundle version replays.

Files in STATE_DIR:
- `snapshot.npz`: per item id its latest upsert (fields + vector) or a tombstone, the encoder
  identity of the vectors, and `through`, the last journal segment it folds in;
- `journal.<seq>.jsonl`: segments of JSON-lines records, each fsynced before its change is
  acknowledged; segments with `seq <= through` are already in the snapshot (left over when a
  crash came between the snapshot's rename and their removal) and are skipped;
- `<version>.journal.jsonl`: the old per-version journal, read for the version it names and
  renamed `*.migrated` once a snapshot holds its changes;
- `LOCK`: held by the one retrieval process that writes the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from recsys.core import bundle as bundle_files
from recsys.core.domain import Item
from recsys.core.errors import InvalidInput
from retrieval_service.changes import (
    Change,
    Latest,
    corrupt,
    deletes,
    fold,
    from_record,
    to_record,
    upserts,
)

log = logging.getLogger(__name__)

SNAPSHOT = "snapshot.npz"
LOCK = "LOCK"
SNAPSHOT_FORMAT = 1
MIGRATED_SUFFIX = ".migrated"
_SEGMENT = re.compile(r"^journal\.(\d+)\.jsonl$")
_TEMP_PREFIX = ".snapshot."  # the temp files write_atomic leaves if it dies mid-write
# A read-only reader can race a compaction that removes segments it listed: it reads again.
_READ_ATTEMPTS = 5


@dataclass
class Changes:
    """What a state dir holds, folded to the latest change per item id."""

    latest: Latest = field(default_factory=dict)
    through: int = 0  # the last journal segment the snapshot folds in
    journal_records: int = 0  # records read after the snapshot, legacy ones included
    legacy_records: int = 0  # records read from an old per-version journal


def legacy_journal(directory: Path, version: str) -> Path:
    """Where the code before shared state journaled one bundle version's changes."""
    return directory / f"{version}.journal.jsonl"


def segment_path(directory: Path, seq: int) -> Path:
    return directory / f"journal.{seq:08d}.jsonl"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """Journal segments in the directory, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _SEGMENT.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def fsync_dir(directory: Path) -> None:
    """Makes renames, creations and removals in the directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- journal -----------------------------------------------------------------------------------


class Journal:
    """One append-only JSON-lines file of upserts and deletes, fsynced before a change is acknowledged."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def drop_torn_tail(self) -> None:
        """A crash mid-write leaves a partial last line that was never acknowledged: cut it."""
        if not self.path.exists():
            return
        with self.path.open("r+b") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
                fh.flush()
                os.fsync(fh.fileno())

    def append(self, changes: Sequence[Change]) -> None:
        """Appends one write's changes as one record and fsyncs it."""
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(to_record(changes), ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> Iterator[tuple[int, list[Change]]]:
        """(line number, the record's changes) in order; a last line without its newline was
        never acknowledged. DataLoss names the file and line of a corrupt record."""
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.endswith(b"\n"):
                    return
                where = f"{self.path} line {number}"
                try:
                    record = json.loads(line.decode("utf-8"))  # str: json skips sniffing
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise corrupt(f"{where}: corrupt record", exc) from None
                yield number, from_record(record, where)

    def fold_into(self, latest: Latest) -> int:
        """Applies every record to `latest` (later changes win); returns the record count."""
        count = 0
        for _, changes in self.read():
            latest |= fold(changes)
            count += 1
        return count


# -- snapshot ----------------------------------------------------------------------------------


def read_snapshot(path: Path) -> tuple[int, Latest]:
    """(through, latest change per item) of a snapshot; (0, {}) when there is none."""
    if not path.exists():
        return 0, {}
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            vectors = np.asarray(data["vectors"], dtype=np.float32)
        items = [Item(**fields) for fields in meta["items"]]
        if meta.get("format") != SNAPSHOT_FORMAT or len(items) != len(vectors):
            raise ValueError(
                f"format {meta.get('format')}, {len(items)} items, {len(vectors)} vectors"
            )
        latest = fold(upserts(items, vectors, str(meta["encoder"])) + deletes(meta["deleted"]))
        return int(meta["through"]), latest
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise corrupt(f"{path}: corrupt snapshot", exc) from None


def write_snapshot(path: Path, changes: Sequence[Change], encoder: str, through: int) -> None:
    """Writes the latest change per item (upserts with vectors of `encoder`, and deletes)
    atomically and durably: temp file, fsync, rename, fsync of the dir."""
    items = [c.item for c in changes if c.item is not None]
    vectors = [c.vector for c in changes if c.item is not None and c.vector is not None]
    if len(vectors) != len(items) or any(c.encoder != encoder for c in changes if not c.deleted):
        raise ValueError(f"a snapshot holds upserts with vectors of encoder {encoder}")
    meta = {
        "format": SNAPSHOT_FORMAT,
        "encoder": encoder,
        "through": through,
        "items": [asdict(item) for item in items],
        "deleted": [c.item_id for c in changes if c.deleted],
    }
    meta_bytes = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8)
    matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, 0), np.float32)
    bundle_files.write_atomic(path, lambda fh: np.savez(fh, meta=meta_bytes, vectors=matrix))
    fsync_dir(path.parent)


def read_state(directory: Path, legacy: Path | None = None) -> Changes:
    """Everything a state dir holds, read-only (safe while retrieval writes and compacts there):
    the old per-version journal first, then the snapshot, then the segments after it."""
    for _ in range(_READ_ATTEMPTS - 1):
        with contextlib.suppress(_Raced, FileNotFoundError):
            return _read_state(Path(directory), legacy)
    return _read_state(Path(directory), legacy)


class _Raced(Exception):
    """A compaction replaced the snapshot while it and the segments were being read."""


def _read_state(directory: Path, legacy: Path | None) -> Changes:
    changes = Changes()
    if legacy is not None and legacy.exists():
        changes.legacy_records = Journal(legacy).fold_into(changes.latest)
        changes.journal_records = changes.legacy_records
    stamp = _stamp(directory / SNAPSHOT)
    changes.through, snapshot = read_snapshot(directory / SNAPSHOT)
    changes.latest |= snapshot
    for seq, path in segments(directory):
        if seq > changes.through:
            changes.journal_records += Journal(path).fold_into(changes.latest)
    # A compaction in between may have removed segments that the older snapshot lacks.
    if _stamp(directory / SNAPSHOT) != stamp:
        raise _Raced(directory)
    return changes


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which file is at `path` now (a rename puts a new inode there)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


# -- the state dir -----------------------------------------------------------------------------


class OnlineState:
    """The one writer of a state dir: loads the folded changes, journals new ones, compacts.

    The caller serialises appends (retrieval's lock) and passes that lock to `compact`, so the
    journal's order is the order in which changes were applied.
    """

    def __init__(
        self, directory: Path, encoder: str, compact_records: int, legacy: Path | None = None
    ) -> None:
        if compact_records < 1:
            raise InvalidInput(f"journal_compact_records {compact_records}: must be at least 1")
        self.directory = Path(directory)
        self.encoder = encoder  # the serving encoder's identity, stamped on journaled vectors
        self.compact_records = compact_records
        self.legacy = legacy
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock_directory(self.directory)
        self._seq = 0  # the segment new records go to
        self._tail_records = 0  # records in segments after the snapshot
        self._latest: dict[str, bool] = {}  # item id → upserted (True) or deleted (False)
        self._legacy_pending = False
        self._compacting = threading.Lock()

    @property
    def path(self) -> Path:
        """The segment new changes are appended to."""
        return segment_path(self.directory, self._seq)

    @property
    def due(self) -> bool:
        """Whether the journal tail has grown to the compaction threshold."""
        return self._tail_records >= self.compact_records

    @property
    def migration_pending(self) -> bool:
        """Whether an old per-version journal was read and no snapshot holds it yet."""
        return self._legacy_pending

    def load(self) -> Changes:
        """Reads everything, then cleans up after a crash: temp snapshots, segments the snapshot
        already holds, and a torn last record (cut before anything is appended after it)."""
        changes = read_state(self.directory, self.legacy)
        for stale in self.directory.glob(_TEMP_PREFIX + "*"):
            stale.unlink()
        for seq, path in segments(self.directory):
            if seq <= changes.through:
                path.unlink()  # a crash came between the snapshot's rename and their removal
            else:
                Journal(path).drop_torn_tail()
        if self.legacy is not None:
            Journal(self.legacy).drop_torn_tail()
        existing = [seq for seq, _ in segments(self.directory)]
        self._seq = existing[-1] if existing else changes.through + 1
        self._tail_records = changes.journal_records - changes.legacy_records
        self._latest = {k: not c.deleted for k, c in changes.latest.items()}
        self._legacy_pending = changes.legacy_records > 0
        if not existing:
            self._create_segment()
        return changes

    def append_upsert(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        Journal(self.path).append(upserts(items, vectors, self.encoder))
        self._tail_records += 1
        self._latest.update(dict.fromkeys((item.item_id for item in items), True))

    def append_delete(self, item_ids: Sequence[str]) -> None:
        Journal(self.path).append(deletes(item_ids))
        self._tail_records += 1
        self._latest.update(dict.fromkeys(item_ids, False))

    def compact(
        self,
        guard: threading.Lock,
        capture: Callable[[list[str]], list[Change]],
    ) -> bool:
        """Folds the state into a new snapshot and removes the segments it holds; False when
        another compaction is running.

        Under `guard` (the lock appends run under) new records move to a fresh segment and
        `capture(upserted ids)` copies those items with their vectors; the snapshot is written
        outside it, so searches and writes go on meanwhile. A crash at any step leaves either the old
        snapshot and every segment, or the new snapshot (the segments it holds are skipped).
        """
        if not self._compacting.acquire(blocking=False):
            return False
        try:
            with guard:
                sealed = self._seq
                self._seq += 1
                self._create_segment()
                self._tail_records = 0
                upserted = [k for k, present in self._latest.items() if present]
                deleted = [k for k, present in self._latest.items() if not present]
                captured = capture(upserted)
                legacy_pending = self._legacy_pending
            write_snapshot(
                self.directory / SNAPSHOT, captured + deletes(deleted), self.encoder, sealed
            )
            if legacy_pending and self.legacy is not None:
                # Only now does a durable snapshot hold the old journal's changes.
                os.replace(self.legacy, self.legacy.with_name(self.legacy.name + MIGRATED_SUFFIX))
                self._legacy_pending = False
            for seq, path in segments(self.directory):
                if seq <= sealed:
                    path.unlink()
            fsync_dir(self.directory)
            log.info(
                "compacted online changes into %s: %d items, %d deletes (journal through %d)",
                self.directory / SNAPSHOT,
                len(captured),
                len(deleted),
                sealed,
            )
            return True
        finally:
            self._compacting.release()

    @contextlib.contextmanager
    def compaction_paused(self) -> Iterator[None]:
        """Waits for a running compaction and keeps others from starting until the block ends
        (they return False): a hot swap hands the state over to another owner's lock."""
        with self._compacting:
            yield

    def close(self) -> None:
        """Releases the directory for another process."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _create_segment(self) -> None:
        """An empty segment whose directory entry is durable before any record goes into it."""
        self.path.touch()
        fsync_dir(self.directory)


def _lock_directory(directory: Path) -> int:
    """An exclusive lock on STATE_DIR/LOCK for this process's life: two writers would interleave
    records and remove each other's segments."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InvalidInput(
            f"state dir {directory}: in use by another retrieval process; "
            "each retrieval process needs its own RECSYS_STATE_DIR"
        ) from None
    return fd
