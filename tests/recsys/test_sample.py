"""The embedded sample dataset: loads cleanly, has the promised shape, and regenerates exactly."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from recsys.app.ingest import load_catalog, load_interactions
from recsys.app.movielens import read_queries
from recsys.app.sample import (
    QUERIES_FILE,
    SAMPLE_DIR,
    generate,
    sample_paths,
    sample_queries_path,
)
from tests.recsys.sample_helpers import write_grown_log


@pytest.fixture(scope="module")
def sample() -> tuple[pd.DataFrame, pd.DataFrame]:
    catalog_path, interactions_path = sample_paths()
    catalog = load_catalog(catalog_path)
    interactions, report = load_interactions(
        interactions_path, known_item_ids=set(catalog["item_id"]), strict=True
    )
    assert report.dropped_unknown_items == 0
    assert report.kept == report.rows
    return catalog, interactions


def test_packaged_files_exist_and_are_small() -> None:
    paths = [*sample_paths(), sample_queries_path()]
    assert all(p.parent == SAMPLE_DIR and p.is_file() for p in paths)
    assert sum(p.stat().st_size for p in paths) < 1_000_000


def test_catalog_shape(sample: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    catalog, _ = sample
    assert 300 <= len(catalog) <= 400
    assert catalog["item_id"].str.fullmatch(r"P\d{4}").all()
    # Unique titles, so searching an item's own title can find it.
    assert catalog["title"].is_unique
    assert 10 <= catalog["category"].nunique() <= 12
    assert (catalog["description"].str.len() > 40).all()
    assert all(set(a) == {"brand", "price"} for a in catalog["attributes"])
    assert all(
        a["brand"] in t for a, t in zip(catalog["attributes"], catalog["title"], strict=True)
    )
    assert pd.to_numeric(catalog["attributes"].map(lambda a: a["price"])).gt(0).all()


def test_interactions_shape(sample: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    _, log = sample
    assert 4000 <= len(log) <= 6000
    assert log["user_id"].nunique() == 200
    assert set(log["weight"]) == {1.0, 3.0, 5.0}
    assert 0.2 <= (log["query"] != "").mean() <= 0.4
    # A log ordered by time, as a shop would export it.
    assert log["timestamp"].is_monotonic_increasing


def test_interactions_have_learnable_structure(sample: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    catalog, log = sample
    joined = log.merge(catalog[["item_id", "category"]], on="item_id")
    # Users stick to a few categories, popularity is skewed, and queries describe the item.
    assert joined.groupby("user_id")["category"].nunique().median() <= 3
    counts = log["item_id"].value_counts()
    assert counts.iloc[: len(counts) // 10].sum() > 0.3 * len(log)
    searched = joined[joined["query"] != ""].merge(catalog[["item_id", "title", "description"]])
    words_found = [
        bool(
            set(q.split()) & set(f"{t} {d} {c}".lower().replace(",", " ").replace(".", " ").split())
        )
        for q, t, d, c in zip(
            searched["query"],
            searched["title"],
            searched["description"],
            searched["category"],
            strict=True,
        )
    ]
    assert sum(words_found) > 0.8 * len(words_found)


def test_sample_queries_name_catalog_items(sample: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    catalog, _ = sample
    queries = read_queries(sample_queries_path())
    assert len(queries) > 50
    assert {q.split for q in queries} == {"train", "test"}
    ids = set(catalog["item_id"])
    assert all(q.item_ids and set(q.item_ids) <= ids for q in queries)


def test_generate_is_deterministic_and_matches_committed_files(tmp_path: Path) -> None:
    first = generate(tmp_path / "a")
    second = generate(tmp_path / "b")
    committed = (*sample_paths(), sample_queries_path())
    for produced_a, produced_b, packaged in zip(
        (*first, tmp_path / "a" / QUERIES_FILE),
        (*second, tmp_path / "b" / QUERIES_FILE),
        committed,
        strict=True,
    ):
        assert produced_a.read_bytes() == produced_b.read_bytes()
        assert produced_a.read_bytes() == packaged.read_bytes(), (
            f"{packaged} is stale: run `python -m recsys.app.sample`"
        )


def test_another_seed_gives_another_log(tmp_path: Path) -> None:
    _, interactions = generate(tmp_path, seed=8)
    assert interactions.read_bytes() != sample_paths()[1].read_bytes()


def test_a_grown_log_is_the_sample_then_later_sessions_of_its_users(
    sample: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    catalog, interactions = sample
    path = write_grown_log(tmp_path / "grown.csv", days=30)
    assert path.read_text().startswith(sample_paths()[1].read_text())
    grown, report = load_interactions(path, known_item_ids=set(catalog["item_id"]), strict=True)
    later = grown.iloc[len(interactions) :]
    assert report.kept == len(grown) and len(later) > 0
    assert later["timestamp"].min() > interactions["timestamp"].max()
    assert set(later["user_id"]) == set(interactions["user_id"])  # every user comes back
    # Same tastes: each user's later sessions mostly stay in the categories they shopped before.
    category = dict(zip(catalog["item_id"], catalog["category"], strict=True))
    before = interactions.groupby("user_id")["item_id"].agg(lambda s: {category[i] for i in s})
    familiar = [
        category[i] in before[u] for u, i in zip(later["user_id"], later["item_id"], strict=True)
    ]
    assert sum(familiar) / len(familiar) > 0.7
    assert write_grown_log(tmp_path / "again.csv", days=30).read_text() == path.read_text()
