"""The artifact bundle: one immutable directory per version and a CURRENT pointer switched atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys.core.errors import InvalidInput

FORMAT = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"

# Relative paths inside a version directory; every reader and writer goes through these names.
CATALOG = "catalog.parquet"
EMBEDDINGS = "embeddings.npy"
INDEX = "index.faiss"
ENCODER_DIR = "encoder"
CF_DIR = "cf"
CROSS_ENCODER_DIR = "cross_encoder"
# Cheaper copies of the cross-encoder for CPU serving (the build validates which may serve).
CROSS_ENCODER_INT8_DIR = "cross_encoder_int8"
CROSS_ENCODER_STUDENT_DIR = "cross_encoder_student"
CROSS_ENCODER_STUDENT_INT8_DIR = "cross_encoder_student_int8"
FUSION = "fusion.json"


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
        if p.is_file() and p.name != MANIFEST
    }


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file + fsync + rename so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    """Points ROOT/CURRENT at a complete version, atomically."""
    if not (root / version / MANIFEST).is_file():
        raise InvalidInput(f"{root / version}: not a complete bundle version (no {MANIFEST})")
    _write_atomic(root / CURRENT, version + "\n")


def current_version(root: Path) -> str:
    """The version ROOT/CURRENT names; one-line InvalidInput when there is none."""
    pointer = Path(root) / CURRENT
    try:
        version = pointer.read_text().strip()
    except OSError:
        raise InvalidInput(
            f"{root}: not a bundle root (no {CURRENT} file); run `recsys build`"
        ) from None
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
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{manifest_path}: not valid JSON ({exc})") from None
        return cls(root=root, version=version, manifest=manifest)

    def verify(self) -> list[str]:
        """Names of files whose checksum differs from the manifest (or that are missing)."""
        expected: dict[str, str] = self.manifest.get("files", {})
        bad = []
        for rel, digest in expected.items():
            path = self.path / rel
            if not path.is_file() or sha256_file(path) != digest:
                bad.append(rel)
        return bad


def versions(root: Path) -> list[str]:
    """Complete versions under a root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())
