"""Amazon "Industrial & Scientific" as UniSRec preprocessed it (../shared/data/amazon-scientific)
as a catalog, an interaction log in sequence order and its leave-one-out split.

Products are items: `Scientific.text` is "title. category path. brand." and becomes title,
category and description (the brand, the only other text there is), so `item_text` gives back
the very text the published models read. Users' sequences have no times: each becomes
interactions with timestamps 0, 1, 2, ... (order only), weight 1. The published protocol is
leave-one-out: per user the last item is test, the one before it validation, the rest train.

A sequence is rebuilt from every row of the .inter files, not from the test row alone: each
row's history keeps only its last MAX_HISTORY items, so for the three users with longer
sequences the test row lacks their first items (59,384 interactions instead of 59,427).
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from recsys.app.ingest import (
    catalog_from_frame,
    interactions_from_frame,
    read_table,
    write_catalog,
    write_table,
)
from recsys.core.errors import InvalidInput
from recsys.offline.splits import Split, temporal_split

DATASET = "amazon-scientific"
PREFIX = "Scientific"
MAX_HISTORY = 50  # the .inter files keep each row's last 50 history items
# Published on these files (the authors' repositories), NDCG@10 / Recall@10 on test: printed
# beside our figures, never measured here.
PUBLISHED = {
    "VQ-Rec (WWW 2023)": {"ndcg@10": 0.0643, "recall@10": 0.1211},
    "MISSRec (MM 2023), pre-trained": {"ndcg@10": 0.0753, "recall@10": 0.1360},
    "MISSRec (MM 2023), no pre-training": {"ndcg@10": 0.0711, "recall@10": 0.1282},
}
PROTOCOL = (
    "leave-one-out: per user the last item is test, the second-last validation, every earlier "
    "one train (sequence order = timestamp order)"
)
# "title. category path. brand." where the category path (empty for 134 products) always
# starts at the root "Industrial & Scientific"; titles and brands may hold ". " themselves.
_TEXT = re.compile(
    r"^(?P<title>.*)\. (?P<category>Industrial & Scientific(?: [^.]*)?|)\. (?P<brand>.*?)\.?$"
)


@dataclass(frozen=True)
class AmazonScientific:
    """The data set in the ingestion schema, and each user's validation and test item."""

    catalog: pd.DataFrame
    interactions: pd.DataFrame
    splits: pd.DataFrame  # user_id, validation_item_id, test_item_id


@dataclass(frozen=True)
class ConvertedFiles:
    """What convert_amazon_scientific wrote, with counts for the summary line."""

    catalog: Path
    interactions: Path
    splits: Path
    marker: Path
    items: int
    users: int
    interactions_count: int


@dataclass(frozen=True)
class _Row:
    """One row of an .inter file: a user's index, history (item indexes) and next item."""

    line: int
    user: int
    history: list[int]
    target: int


def read_amazon_scientific(folder: Path) -> AmazonScientific:
    """Reads the UniSRec files in `folder`, rebuilding and checking every user's sequence."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInput(f"{folder}: not a folder (expected the amazon-scientific files)")
    texts = _read_tsv(folder / f"{PREFIX}.text", ("item_id:token", "text:token_seq"))
    items = _read_index(folder / f"{PREFIX}.item2index")
    users = _read_index(folder / f"{PREFIX}.user2index")
    catalog = catalog_from_frame(
        _catalog(texts, folder / f"{PREFIX}.text"), str(folder / f"{PREFIX}.text")
    )
    described = set(catalog["item_id"])
    lacking = [asin for asin in items if asin not in described]
    if lacking:
        raise InvalidInput(
            f"{folder / f'{PREFIX}.item2index'}: item {lacking[0]} has no text in "
            f"{PREFIX}.text ({len(lacking)} items lack one)"
        )
    rows = {
        part: _read_inter(folder, part, len(items), len(users))
        for part in ("train", "valid", "test")
    }
    sequences = _sequences(folder, rows)
    missing = sorted(set(range(len(users))) - set(sequences))
    if missing:
        raise InvalidInput(
            f"{folder / f'{PREFIX}.test.inter'}: no row for user index {missing[0]} "
            f"({len(missing)} users of {PREFIX}.user2index have none)"
        )
    frame = _interactions(sequences, items, users)
    interactions, _ = interactions_from_frame(frame, str(folder))
    splits = pd.DataFrame(
        {
            "user_id": [users[u] for u in sorted(sequences)],
            "validation_item_id": [items[sequences[u][-2]] for u in sorted(sequences)],
            "test_item_id": [items[sequences[u][-1]] for u in sorted(sequences)],
        }
    )
    return AmazonScientific(catalog, interactions, splits)


def _read_tsv(path: Path, header: tuple[str, ...] | None) -> pd.DataFrame:
    """A tab-separated file as text cells: with `header`, its first line must name those
    columns; without, the file has none (the *2index files)."""
    if not path.is_file():
        raise InvalidInput(f"{path}: file not found")
    try:
        # QUOTE_NONE: product titles hold bare quotes (12" x 1/2").
        frame = pd.read_csv(
            path,
            sep="\t",
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_NONE,
            header=0 if header else None,
        )
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InvalidInput(f"{path}: not a readable tab-separated file ({_one_line(exc)})") from exc
    if header and tuple(frame.columns) != header:
        raise InvalidInput(
            f"{path}: header is {'/'.join(map(str, frame.columns))}, expected {'/'.join(header)}"
        )
    if not header and frame.shape[1] != 2:
        raise InvalidInput(f"{path}: expected 2 tab-separated columns, found {frame.shape[1]}")
    return frame


def _read_index(path: Path) -> list[str]:
    """`name \\t index` lines (0-based, every index once) as the names in index order."""
    frame = _read_tsv(path, None)
    names: list[str | None] = [None] * len(frame)
    for line, (name, index) in enumerate(frame.itertuples(index=False), start=1):
        if not index.isdigit() or int(index) >= len(frame) or names[int(index)] is not None:
            raise InvalidInput(
                f"{path} line {line}: index {index!r} is not a new one in 0..{len(frame) - 1}"
            )
        if not name.strip():
            raise InvalidInput(f"{path} line {line}: empty name")
        names[int(index)] = name.strip()
    return [n for n in names if n is not None]


def _catalog(texts: pd.DataFrame, path: Path) -> pd.DataFrame:
    """title, category and description (the brand) from each product's one text."""
    parts = []
    for line, (asin, text) in enumerate(texts.itertuples(index=False), start=2):
        if not text.strip():
            raise InvalidInput(f"{path} line {line}: empty text for item {asin!r}")
        found = _TEXT.match(text.strip())
        if found is None or not found["title"].strip():
            # Not in the "title. category. brand." shape: the whole text is the title.
            parts.append((asin, text.strip(), "", ""))
        else:
            parts.append((asin, found["title"], found["category"], found["brand"]))
    return pd.DataFrame(parts, columns=["item_id", "title", "category", "description"])


def _read_inter(folder: Path, part: str, n_items: int, n_users: int) -> list[_Row]:
    path = folder / f"{PREFIX}.{part}.inter"
    frame = _read_tsv(path, ("user_id:token", "item_id_list:token_seq", "item_id:token"))
    rows = []
    for line, (user, history, target) in enumerate(frame.itertuples(index=False), start=2):
        try:
            row = _Row(line, int(user), [int(i) for i in history.split()], int(target))
        except ValueError:
            raise InvalidInput(f"{path} line {line}: indexes must be integers") from None
        if not 0 <= row.user < n_users:
            raise InvalidInput(
                f"{path} line {line}: user index {row.user} outside 0..{n_users - 1}"
            )
        if not all(0 <= i < n_items for i in [*row.history, row.target]) or not row.history:
            raise InvalidInput(
                f"{path} line {line}: empty history or an item index outside 0..{n_items - 1}"
            )
        rows.append(row)
    return rows


def _sequences(folder: Path, rows: dict[str, list[_Row]]) -> dict[int, list[int]]:
    """Per user index, the whole sequence: the first train row's history, then the train rows'
    targets in time order (the file lists each user's rows newest first), then the validation
    and the test target. Every row's history must be the last MAX_HISTORY items before its
    target, so a file out of that shape is refused rather than misread."""
    by_user: dict[int, dict[str, list[_Row]]] = defaultdict(lambda: defaultdict(list))
    for part, part_rows in rows.items():
        for row in part_rows:
            by_user[row.user][part].append(row)
    sequences = {}
    for user, parts in by_user.items():
        for part in ("valid", "test"):
            if len(parts[part]) != 1:
                where = parts[part][1] if parts[part] else None
                raise InvalidInput(
                    f"{folder / f'{PREFIX}.{part}.inter'}"
                    + (f" line {where.line}" if where else "")
                    + f": user index {user} needs exactly one row, has {len(parts[part])}"
                )
        ordered = [*parts["train"][::-1], parts["valid"][0], parts["test"][0]]
        sequence = [*ordered[0].history, *(row.target for row in ordered)]
        _check_rows(folder, ordered, sequence, len(parts["train"]))
        sequences[user] = sequence
    return sequences


def _check_rows(folder: Path, ordered: list[_Row], sequence: list[int], n_train: int) -> None:
    """Row k (0-based, time order) predicts sequence[start + k] from what precedes it."""
    start = len(ordered[0].history)
    for k, row in enumerate(ordered):
        position = start + k
        before = sequence[:position]
        expected = before[-MAX_HISTORY:] if len(before) > MAX_HISTORY else before
        if row.history != expected:
            part = "train" if k < n_train else ("valid" if k == n_train else "test")
            raise InvalidInput(
                f"{folder / f'{PREFIX}.{part}.inter'} line {row.line}: history of user index "
                f"{row.user} disagrees with the sequence the other rows give"
            )


def _interactions(
    sequences: dict[int, list[int]], items: list[str], users: list[str]
) -> pd.DataFrame:
    """Rows in user index order, each sequence in order with timestamps 0, 1, 2, ..."""
    records = [
        (users[user], items[item], position)
        for user in sorted(sequences)
        for position, item in enumerate(sequences[user])
    ]
    frame = pd.DataFrame(records, columns=["user_id", "item_id", "timestamp"])
    frame["weight"] = 1.0
    return frame


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def marker(data: AmazonScientific, source: Path) -> dict[str, Any]:
    """dataset.json: which protocol `recsys evaluate --data DIR` runs, and what DIR holds."""
    return {
        "dataset": DATASET,
        "protocol": PROTOCOL,
        "source": str(source),
        "items": len(data.catalog),
        "users": len(data.splits),
        "interactions": len(data.interactions),
        "splits": "splits.csv",
        "published": PUBLISHED,
    }


def convert_amazon_scientific(folder: Path, out_dir: Path) -> ConvertedFiles:
    """Writes out_dir/catalog.csv, interactions.csv, splits.csv and dataset.json; reads and checks
    everything first, so bad files write nothing."""
    data = read_amazon_scientific(folder)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ConvertedFiles(
        catalog=out_dir / "catalog.csv",
        interactions=out_dir / "interactions.csv",
        splits=out_dir / "splits.csv",
        marker=out_dir / "dataset.json",
        items=len(data.catalog),
        users=len(data.splits),
        interactions_count=len(data.interactions),
    )
    write_catalog(data.catalog, files.catalog)
    write_table(data.interactions, files.interactions)
    write_table(data.splits, files.splits)
    # The marker last: a DIR with dataset.json holds every file.
    files.marker.write_text(json.dumps(marker(data, Path(folder)), indent=2) + "\n")
    return files


def leave_one_out(interactions: pd.DataFrame, splits_path: Path) -> Split:
    """The published split of a converted DIR: per user the last interaction (by timestamp) is
    test and the one before it validation, each relevant; checked against splits.csv, so a
    re-sorted or edited interactions.csv is refused rather than evaluated on other targets."""
    split = replace(temporal_split(interactions, 1, 1), relevant_min_weight=None)
    expected = read_table(splits_path)
    columns = ("user_id", "validation_item_id", "test_item_id")
    missing = [c for c in columns if c not in expected.columns]
    if missing:
        raise InvalidInput(f"{splits_path}: missing column {', '.join(missing)}")
    held = {
        part: dict(zip(frame["user_id"].astype(str), frame["item_id"].astype(str), strict=True))
        for part, frame in (("validation", split.validation), ("test", split.test))
    }
    for row, (user, validation, test) in enumerate(
        expected[list(columns)].astype(str).itertuples(index=False), start=1
    ):
        for part, item in (("validation", validation), ("test", test)):
            if held[part].get(user) != item:
                raise InvalidInput(
                    f"{splits_path} row {row}: user {user}'s {part} item is {item}, but "
                    f"interactions.csv gives {held[part].get(user, 'none')}"
                )
    if len(expected) != len(held["test"]):
        raise InvalidInput(
            f"{splits_path}: {len(expected)} users, interactions.csv has {len(held['test'])}"
        )
    return split
