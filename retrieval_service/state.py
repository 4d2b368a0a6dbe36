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

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.core import bundle as bundle_files
from recsys.core.domain import Item
from recsys.core.errors import InvalidInput

log = logging.getLogger(__name__)

SNAPSHOT = "snapshot.npz"
LOCK = "LOCK"
SNAPSHOT_FORMAT = 1
MIGRATED_SUFFIX = ".migrated"
_SEGMENT = re.compile(r"^journal\.(\d+)\.jsonl$")
_TEMP_PREFIX = ".snapshot."  # the temp files write_atomic leaves if it dies mid-write
# A read-only reader can race a compaction that removes segments it listed: it reads again.
_READ_ATTEMPTS = 5


@dataclass(frozen=True)
class Upsert:
    """An item's latest online version and, when stored, its vector and the encoder that made it."""

    item: Item
    vector: np.ndarray | None
    encoder: str


# The latest online change per item id: an upsert, or None for a delete.
Latest = dict[str, Upsert | None]


@dataclass
class Changes:
    """What a state dir holds, folded to the latest change per item id."""

    latest: Latest = field(default_factory=dict)
    through: int = 0  # the last journal segment the snapshot folds in
    journal_records: int = 0  # records read after the snapshot, legacy ones included
    legacy_records: int = 0  # records read from an old per-version journal


@dataclass(frozen=True)
class SnapshotData:
    """The latest state per item: live upserts with their vectors, and deleted ids."""

    items: list[Item]
    vectors: np.ndarray  # (len(items), dimension) float32
    deleted: list[str]
    encoder: str


def encoder_identity(manifest: Mapping[str, Any]) -> str:
    """A stable id of the encoder a bundle embeds with: pooling, dimension, max length and the
    checksums the manifest records for its encoder files (no file is read)."""
    encoder = manifest["encoder"]
    prefix = bundle_files.ENCODER_DIR + "/"
    files = {k: v for k, v in manifest.get("files", {}).items() if k.startswith(prefix)}
    described = {
        "pooling": encoder.get("pooling"),
        "dimension": encoder.get("dimension"),
        "max_length": encoder.get("max_length", 256),
        # Without recorded checksums the name and source are the best identity there is.
        "files": files or {"name": encoder.get("name"), "source": encoder.get("source")},
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest[:32]}"


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

    def append_upsert(self, items: Sequence[Item], vectors: np.ndarray, encoder: str) -> None:
        self._append(upsert_record(items, vectors, encoder))

    def append_delete(self, item_ids: Sequence[str]) -> None:
        self._append(delete_record(item_ids))

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, record) in order; a last line without its newline was never acknowledged."""
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.endswith(b"\n"):
                    return
                try:
                    record = json.loads(line.decode("utf-8"))  # str: json skips sniffing
                except (json.JSONDecodeError, UnicodeDecodeError):
                    record = None
                if not isinstance(record, dict):
                    raise InvalidInput(f"{self.path} line {number}: corrupt record")
                yield number, record

    def fold_into(self, latest: Latest) -> int:
        """Applies every record to `latest` (later changes win); returns the record count."""
        count = 0
        for number, record in self.records():
            fold_record(record, latest, f"{self.path} line {number}")
            count += 1
        return count


def upsert_record(items: Sequence[Item], vectors: np.ndarray, encoder: str) -> dict[str, Any]:
    """A change record of items with their vectors, so replay under the same encoder encodes
    nothing: the one format of the local journal and the shared change log."""
    matrix = np.ascontiguousarray(vectors, dtype="<f4")
    return {
        "op": "upsert",
        "items": [asdict(item) for item in items],
        "encoder": encoder,
        "dimension": int(matrix.shape[1]),
        "vectors": base64.b64encode(matrix.tobytes()).decode("ascii"),
    }


def delete_record(item_ids: Sequence[str]) -> dict[str, Any]:
    return {"op": "delete", "item_ids": list(item_ids)}


def fold_record(record: dict[str, Any], latest: Latest, where: str) -> None:
    """One upsert or delete record into the latest state per item id; InvalidInput names `where`
    the record came from when it is corrupt."""
    try:
        _fold_record(record, latest)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise InvalidInput(f"{where}: corrupt record ({_reason(exc)})") from None


def _fold_record(record: dict[str, Any], latest: Latest) -> None:
    if record["op"] == "delete":
        for item_id in record["item_ids"]:
            latest[str(item_id)] = None
        return
    if record["op"] != "upsert":
        raise ValueError(f"unknown op {record['op']!r}")
    items = [Item(**fields) for fields in record["items"]]
    if "vectors" not in record:  # written before vectors were journaled: replay re-encodes
        for item in items:
            latest[item.item_id] = Upsert(item, None, "")
        return
    dimension = int(record["dimension"])
    raw = binascii.a2b_base64(record["vectors"], strict_mode=True)  # b64decode's check is slower
    if dimension < 1 or len(raw) != 4 * dimension * len(items):
        raise ValueError(f"{len(raw)} vector bytes for {len(items)} items of dimension {dimension}")
    vectors = np.frombuffer(raw, dtype="<f4").reshape(len(items), dimension)
    for item, vector in zip(items, vectors, strict=True):
        latest[item.item_id] = Upsert(item, vector, str(record["encoder"]))


def _reason(exc: BaseException) -> str:
    """A short cause for a one-line error."""
    if isinstance(exc, KeyError):
        return f"missing {exc}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def apply_changes(items: Sequence[Item], latest: Mapping[str, Upsert | None]) -> list[Item]:
    """The catalog with the online changes folded in: an upsert replaces its item in place or
    is appended, a delete removes it."""
    out: list[Item] = []
    for item in items:
        if item.item_id not in latest:
            out.append(item)
        elif (change := latest[item.item_id]) is not None:
            out.append(change.item)
    known = {item.item_id for item in items}
    return out + [u.item for k, u in latest.items() if u is not None and k not in known]


# -- snapshot ----------------------------------------------------------------------------------


def read_snapshot(path: Path) -> tuple[int, Latest]:
    """(through, latest state per item) of a snapshot; (0, {}) when there is none."""
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
        encoder = str(meta["encoder"])
        latest: Latest = {
            item.item_id: Upsert(item, vector, encoder)
            for item, vector in zip(items, vectors, strict=True)
        }
        latest |= dict.fromkeys((str(i) for i in meta["deleted"]), None)
        return int(meta["through"]), latest
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"{path}: corrupt snapshot ({_reason(exc)})") from None


def write_snapshot(path: Path, data: SnapshotData, through: int) -> None:
    """Writes the snapshot atomically and durably: temp file, fsync, rename, fsync of the dir."""
    meta = {
        "format": SNAPSHOT_FORMAT,
        "encoder": data.encoder,
        "through": through,
        "items": [asdict(item) for item in data.items],
        "deleted": data.deleted,
    }
    meta_bytes = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8)
    vectors = np.asarray(data.vectors, dtype=np.float32)
    bundle_files.write_atomic(path, lambda fh: np.savez(fh, meta=meta_bytes, vectors=vectors))
    fsync_dir(path.parent)


def read_changes(directory: Path, legacy: Path | None = None) -> Changes:
    """Everything a state dir holds, read-only (safe while retrieval writes and compacts there):
    the old per-version journal first, then the snapshot, then the segments after it."""
    for _ in range(_READ_ATTEMPTS - 1):
        with contextlib.suppress(_Raced, FileNotFoundError):
            return _read_changes(Path(directory), legacy)
    return _read_changes(Path(directory), legacy)


class _Raced(Exception):
    """A compaction replaced the snapshot while it and the segments were being read."""


def _read_changes(directory: Path, legacy: Path | None) -> Changes:
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
        changes = read_changes(self.directory, self.legacy)
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
        self._latest = {k: v is not None for k, v in changes.latest.items()}
        self._legacy_pending = changes.legacy_records > 0
        if not existing:
            self._create_segment()
        return changes

    def append_upsert(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        Journal(self.path).append_upsert(items, vectors, self.encoder)
        self._tail_records += 1
        self._latest.update(dict.fromkeys((item.item_id for item in items), True))

    def append_delete(self, item_ids: Sequence[str]) -> None:
        Journal(self.path).append_delete(item_ids)
        self._tail_records += 1
        self._latest.update(dict.fromkeys(item_ids, False))

    def compact(
        self,
        guard: threading.Lock,
        capture: Callable[[list[str]], tuple[list[Item], np.ndarray]],
    ) -> bool:
        """Folds the state into a new snapshot and removes the segments it holds; False when
        another compaction is running.

        Under `guard` (the lock appends run under) new records move to a fresh segment and
        `capture(upserted ids)` copies those items and vectors; the snapshot is written outside
        it, so searches and writes go on meanwhile. A crash at any step leaves either the old
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
                items, vectors = capture(upserted)
                legacy_pending = self._legacy_pending
            snapshot = SnapshotData(items, vectors, deleted, self.encoder)
            write_snapshot(self.directory / SNAPSHOT, snapshot, through=sealed)
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
                len(items),
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
