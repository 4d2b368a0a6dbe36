"""The artifact bundle: one immutable directory per version and a CURRENT pointer switched atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from recsys.core.errors import InvalidInput

FORMAT = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
# Written next to the manifest of a version `recsys retrain`'s gate refused: why, and the figures.
REJECTED = "rejected.json"

# Relative paths inside a version directory; every reader and writer goes through these names.
CATALOG = "catalog.parquet"
EMBEDDINGS = "embeddings.npy"
INDEX = "index.faiss"
# The lexical (BM25) index's postings over the same rows (retrieval_service.lexical).
LEXICAL = "lexical.npz"
ENCODER_DIR = "encoder"
CF_DIR = "cf"
# In CF_DIR: CF's item ids, in its factor rows' order (the items some interaction of the build had).
CF_ITEMS = "items.json"
CROSS_ENCODER_DIR = "cross_encoder"
# Cheaper copies of the cross-encoder for CPU serving (the build validates which may serve).
CROSS_ENCODER_INT8_DIR = "cross_encoder_int8"
CROSS_ENCODER_STUDENT_DIR = "cross_encoder_student"
CROSS_ENCODER_STUDENT_INT8_DIR = "cross_encoder_student_int8"
FUSION = "fusion.json"

# mkstemp creates 0600 files, but bundle files are read by the services' user (uid 10001 in the
# images), seldom the builder's: written atomically, they get the mode of any other bundle file.
FILE_MODE = 0o644


def new_version() -> str:
    """A sortable, unique version name such as 20261123T040501Z-3f9a1c."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(version_dir: Path) -> dict[str, str]:
    """sha256 of every file in a version directory except the manifest, by relative path."""
    return {
        str(p.relative_to(version_dir)): sha256_file(p)
        for p in sorted(version_dir.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, REJECTED)
    }


def atomic_temp(path: Path) -> tuple[int, str]:
    """An open temp file beside `path`, to rename over it once written, with FILE_MODE."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, FILE_MODE)
    return fd, tmp


def readable_by_all(directory: Path) -> None:
    """Lets every user read `directory`'s files and search its directories: some writers (temp
    files renamed into place, transformers' save_pretrained among them) leave files 0600."""
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(mode | (0o555 if path.is_dir() else 0o444))


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temp file beside `path`, fsync, rename: readers never see a partial
    file, and a failure leaves `path` as it was."""
    fd, tmp = atomic_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda fh: fh.write(text.encode()))


@contextlib.contextmanager
def staged_version(root: Path, version: str | None = None) -> Iterator[Path]:
    """Yields a staging directory; on success it becomes ROOT/<version>, on error it is removed.

    CURRENT is not touched here: call `publish` once the manifest is written.
    """
    root.mkdir(parents=True, exist_ok=True)
    version = version or new_version()
    staging = root / f".staging-{version}"
    staging.mkdir()
    try:
        yield staging
        readable_by_all(staging)
        os.replace(staging, root / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_manifest(version_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Adds format, creation time and file checksums, and writes manifest.json."""
    full = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **manifest,
        "files": checksums(version_dir),
    }
    _write_atomic(version_dir / MANIFEST, json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full


def publish(root: Path, version: str) -> None:
    """Points ROOT/CURRENT at a complete version, atomically; never at one the gate refused."""
    if not (root / version / MANIFEST).is_file():
        raise InvalidInput(f"{root / version}: not a complete bundle version (no {MANIFEST})")
    if (root / version / REJECTED).is_file():
        raise InvalidInput(f"{root / version}: refused by the retrain gate (see {REJECTED})")
    _write_atomic(root / CURRENT, version + "\n")


def reject(root: Path, version: str, record: dict[str, Any]) -> None:
    """Marks a complete version as refused (kept aside, never published) with the reason."""
    stamped = {"rejected_at": datetime.now(UTC).isoformat(timespec="seconds"), **record}
    _write_atomic(root / version / REJECTED, json.dumps(stamped, indent=2, sort_keys=True) + "\n")


def rejection(root: Path, version: str) -> dict[str, Any] | None:
    """The refusal record of a version, or None when it was never refused."""
    path = root / version / REJECTED
    if not path.is_file():
        return None
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path}: not valid JSON ({exc})") from None
    return record


def clear_rejection(root: Path, version: str) -> None:
    """Removes a refusal record (a later gate passed the version)."""
    (root / version / REJECTED).unlink(missing_ok=True)


def current_version(root: Path) -> str:
    """The version ROOT/CURRENT names; one-line InvalidInput when there is none."""
    pointer = Path(root) / CURRENT
    if not pointer.is_file():
        raise InvalidInput(f"{root}: not a bundle root (no {CURRENT} file); run `recsys build`")
    version = _read(pointer).strip()
    if not version:
        raise InvalidInput(f"{pointer}: empty; it should name a bundle version")
    return version


@dataclass(frozen=True)
class Bundle:
    """A resolved, complete bundle version on disk."""

    root: Path
    version: str
    manifest: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.root / self.version

    def file(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def open(cls, root: Path, version: str | None = None) -> Bundle:
        """Opens ROOT/<version>, or the version CURRENT names; one-line InvalidInput otherwise."""
        root = Path(root)
        if version is None:
            version = current_version(root)
        manifest_path = root / version / MANIFEST
        if not manifest_path.is_file():
            raise InvalidInput(
                f"{manifest_path}: missing; bundle version {version!r} is incomplete"
            )
        try:
            manifest = json.loads(_read(manifest_path))
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{manifest_path}: not valid JSON ({exc})") from None
        return cls(root=root, version=version, manifest=manifest)

    def interacted_item_ids(self) -> frozenset[str] | None:
        """The items some interaction of the build had (CF's); None for a bundle without CF."""
        path = self.file(CF_DIR) / CF_ITEMS
        return frozenset(json.loads(_read(path))) if path.is_file() else None

    def verify(self) -> list[str]:
        """Names of files whose checksum differs from the manifest (or that are missing)."""
        expected: dict[str, str] = self.manifest.get("files", {})
        bad = []
        for rel, digest in expected.items():
            path = self.path / rel
            if not path.is_file() or sha256_file(path) != digest:
                bad.append(rel)
        return bad


def _read(path: Path) -> str:
    """A bundle file's text, or one-line InvalidInput (a file this user may not read, say)."""
    try:
        return path.read_text()
    except OSError as exc:
        raise InvalidInput(
            f"{path}: cannot read ({exc.strerror or exc}) as uid {os.getuid()}"
        ) from None


def versions(root: Path) -> list[str]:
    """Complete versions under a root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())
