"""Amazon Scientific conversion against a slice of the real UniSRec files (skipped with a message
when ../shared/data/amazon-scientific is absent)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recsys.app.amazon import (
    DATASET,
    MAX_HISTORY,
    PREFIX,
    AmazonScientific,
    convert_amazon_scientific,
    leave_one_out,
    read_amazon_scientific,
)
from recsys.app.cli import main
from recsys.app.ingest import load_catalog, load_interactions
from recsys.core.domain import item_text
from recsys.core.errors import InvalidInput
from tests.recsys.amazon_helpers import amazon_slice, raw

pytestmark = pytest.mark.amazon

# Users 247, 1412 and 1570 have longer sequences than the rows' 50-item histories hold.
SLICE_USERS = (*range(40), 247)


@pytest.fixture(scope="module")
def folder(amazon_scientific_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return amazon_slice(amazon_scientific_dir, tmp_path_factory.mktemp("amazon"), SLICE_USERS)


@pytest.fixture(scope="module")
def data(folder: Path) -> AmazonScientific:
    return read_amazon_scientific(folder)


def test_every_product_is_in_the_catalog_with_its_published_text(
    data: AmazonScientific, folder: Path
) -> None:
    texts = dict(raw(folder / f"{PREFIX}.text")[1:])
    catalog = data.catalog
    assert len(catalog) == len(texts) == 4385
    assert set(catalog["item_id"]) == set(texts)
    # title. category path. brand: item_text gives back the text the published models read
    # (an empty category path or brand, ". . " there, is skipped).
    for row in catalog.itertuples(index=False):
        parts = texts[row.item_id].strip().removesuffix(".").split(". ")
        published = ". ".join(p.strip() for p in parts if p.strip())
        assert item_text(row.title, row.category, row.description) == published
    first = catalog.set_index("item_id").loc["B0000223SI"]
    assert first["title"].startswith("PORTER-CABLE 740000801")
    assert first["category"].startswith("Industrial & Scientific Abrasive")
    assert first["description"] == "PORTER-CABLE"


def test_sequences_are_the_test_rows_in_order(data: AmazonScientific, folder: Path) -> None:
    items = {i: a for a, i in raw(folder / f"{PREFIX}.item2index")}
    users = {i: n for n, i in raw(folder / f"{PREFIX}.user2index")}
    frame = data.interactions
    assert (frame["weight"] == 1.0).all() and (frame["query"] == "").all()
    for user_index, history, target in raw(folder / f"{PREFIX}.test.inter")[1:]:
        rows = frame[frame["user_id"] == users[user_index]]
        # Timestamps are the order: 0, 1, 2, ...
        assert rows["timestamp"].tolist() == list(range(len(rows)))
        expected = [items[i] for i in [*history.split(), target]]
        assert rows["item_id"].tolist()[-len(expected) :] == expected
        if len(history.split()) < MAX_HISTORY:
            assert len(rows) == len(expected)


def test_a_sequence_longer_than_the_rows_history_is_rebuilt_whole(
    data: AmazonScientific, folder: Path
) -> None:
    """User 247's test row holds 50 of its items; its train rows give the earlier ones."""
    name = next(
        n for n, i in raw(folder / f"{PREFIX}.user2index") if i == str(len(SLICE_USERS) - 1)
    )
    train_rows = [
        r for r in raw(folder / f"{PREFIX}.train.inter")[1:] if r[0] == str(len(SLICE_USERS) - 1)
    ]
    sequence = data.interactions.loc[data.interactions["user_id"] == name, "item_id"]
    # One train row per target from the second item to the third-last.
    assert len(sequence) == len(train_rows) + 3 > MAX_HISTORY + 1


def test_splits_are_the_validation_and_test_targets(data: AmazonScientific, folder: Path) -> None:
    items = {i: a for a, i in raw(folder / f"{PREFIX}.item2index")}
    users = {i: n for n, i in raw(folder / f"{PREFIX}.user2index")}
    splits = data.splits.set_index("user_id")
    assert len(splits) == len(SLICE_USERS)
    for part, column in (("valid", "validation_item_id"), ("test", "test_item_id")):
        for user_index, _, target in raw(folder / f"{PREFIX}.{part}.inter")[1:]:
            assert splits.loc[users[user_index], column] == items[target]


def test_converted_dir_loads_as_the_leave_one_out_split(folder: Path, tmp_path: Path) -> None:
    files = convert_amazon_scientific(folder, tmp_path)
    marker = json.loads(files.marker.read_text())
    assert marker["dataset"] == DATASET and marker["users"] == len(SLICE_USERS)
    catalog = load_catalog(files.catalog)
    interactions, report = load_interactions(files.interactions, set(catalog["item_id"]))
    assert report.dropped_unknown_items == 0 and len(interactions) == files.interactions_count
    split = leave_one_out(interactions, files.splits)
    assert split.relevant_min_weight is None
    assert len(split.validation) == len(split.test) == len(SLICE_USERS)
    assert len(split.train) == len(interactions) - 2 * len(SLICE_USERS)


def test_cli_writes_the_files_and_a_summary(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["datasets", "amazon-scientific", str(folder), "--out", str(tmp_path)]) == 0
    assert "4,385 items" in capsys.readouterr().out
    for name in ("catalog.csv", "interactions.csv", "splits.csv", "dataset.json"):
        assert (tmp_path / name).is_file()


def _broken(folder: Path, tmp_path: Path, name: str, edit: str | None) -> Path:
    """A copy of the slice with one file replaced by `edit` (None: removed)."""
    out = tmp_path / "broken"
    shutil.copytree(folder, out)
    if edit is None:
        (out / name).unlink()
    else:
        (out / name).write_text(edit, encoding="utf-8")
    return out


@pytest.mark.parametrize(
    ("name", "edit", "says"),
    [
        (f"{PREFIX}.text", None, f"{PREFIX}.text: file not found"),
        (f"{PREFIX}.test.inter", "user\thistory\tnext\n", f"{PREFIX}.test.inter: header is"),
        (
            f"{PREFIX}.valid.inter",
            "user_id:token\titem_id_list:token_seq\titem_id:token\n0\t1 2\tx\n",
            f"{PREFIX}.valid.inter line 2: indexes must be integers",
        ),
        (
            f"{PREFIX}.valid.inter",
            "user_id:token\titem_id_list:token_seq\titem_id:token\n0\t1 2\t99999\n",
            f"{PREFIX}.valid.inter line 2: empty history or an item index outside",
        ),
        (f"{PREFIX}.user2index", "a\t0\nb\t0\n", f"{PREFIX}.user2index line 2: index '0'"),
    ],
)
def test_bad_files_are_refused_in_one_line_naming_them(
    folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    edit: str | None,
    says: str,
) -> None:
    broken = _broken(folder, tmp_path, name, edit)
    out = tmp_path / "out"
    assert main(["datasets", "amazon-scientific", str(broken), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recsys: error: ") and says in err and "\n" not in err
    assert not out.exists()  # nothing written


def test_a_history_that_disagrees_with_the_other_rows_is_refused(
    folder: Path, tmp_path: Path
) -> None:
    header, first, *rest = raw(folder / f"{PREFIX}.valid.inter")
    history = first[1].split()
    edited = [first[0], " ".join(history[1:] + history[:1]), first[2]]
    text = "".join("\t".join(r) + "\n" for r in [header, edited, *rest])
    broken = _broken(folder, tmp_path, f"{PREFIX}.valid.inter", text)
    with pytest.raises(InvalidInput, match=rf"{PREFIX}\.valid\.inter line 2: history of user"):
        read_amazon_scientific(broken)


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not a folder"):
        read_amazon_scientific(tmp_path / "nowhere")
