"""Trimming the shared change log: which records every bundle version that may still load
already holds (`recsys catalog trim-log`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recsys.core.bundle import REJECTED, Bundle, versions
from recsys.core.errors import InvalidInput
from retrieval_service.changelog import ChangeLog, start_position


@dataclass(frozen=True)
class Trimmed:
    log: str  # the log's name (its URL without the password, and its table)
    deleted: int  # records deleted
    floor: int  # the last position deleted, which the log records
    versions: int  # how many versions the floor was taken over


def kept_versions(root: Path) -> list[str]:
    """The versions under ROOT a replica may still load: every complete one the retrain gate
    did not refuse (a refused one is never published)."""
    kept = [v for v in versions(root) if not (root / v / REJECTED).is_file()]
    if not kept:
        raise InvalidInput(f"--bundle {root}: holds no bundle version")
    return kept


def trim_floor(root: Path, kept: list[str], log: ChangeLog) -> int:
    """The newest position every kept version already holds: the oldest position any of them
    was built at, below which no replica replays. Each version's replay must still be possible
    (start_position's checks: the same log, not trimmed past it). A version built without the
    log replays it from position 0, so the log cannot be trimmed while one is kept."""
    bundles = [Bundle.open(root, v) for v in kept]
    floor = min(start_position(b, log) for b in bundles)
    unbuilt = [b.version for b in bundles if not b.manifest.get("change_log")]
    if unbuilt:
        raise InvalidInput(
            f"--bundle {root}: version {unbuilt[0]} was built without --change-log "
            "and replays the log from position 0; remove it, or publish a version built "
            "from the log first"
        )
    return floor


def trim_log(root: Path, url: str, table: str) -> Trimmed:
    """Deletes the change log's records through trim_floor; the log records the floor, so a
    version built before it refuses to load."""
    kept = kept_versions(root)  # before connecting: a mistaken root is named first
    log = ChangeLog(url, table)
    try:
        floor = trim_floor(root, kept, log)
        return Trimmed(log.name, log.trim(floor), floor, len(kept))
    finally:
        log.close()
