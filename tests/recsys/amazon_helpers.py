"""A slice of the real Amazon Scientific files: a few users' rows, every product."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from pathlib import Path

from recsys.app.amazon import PREFIX


def raw(path: Path) -> list[list[str]]:
    """A tab-separated file's lines split into cells, with the csv module (header kept)."""
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def write(path: Path, rows: list[list[str]]) -> None:
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


def amazon_slice(source: Path, out: Path, users: Sequence[int]) -> Path:
    """The files in `source` with only `users`' rows (user indexes renumbered 0.. in that
    order), every product kept; written to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("text", "item2index"):
        shutil.copy(source / f"{PREFIX}.{name}", out / f"{PREFIX}.{name}")
    new = {str(u): str(k) for k, u in enumerate(users)}
    names = raw(source / f"{PREFIX}.user2index")
    write(out / f"{PREFIX}.user2index", [[n, new[i]] for n, i in names if i in new])
    for part in ("train", "valid", "test"):
        header, *rows = raw(source / f"{PREFIX}.{part}.inter")
        kept = [[new[r[0]], *r[1:]] for r in rows if r[0] in new]
        write(out / f"{PREFIX}.{part}.inter", [header, *kept])
    return out
