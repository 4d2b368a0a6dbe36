"""The new-items search: only the live products no interaction of the bundle had, kept in step
with upserts and deletes, after a restart too, on both backends."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from recsys.core.bundle import CF_DIR, CF_ITEMS, Bundle
from recsys.core.domain import Item, SearchQuery
from retrieval_service.backends import CatalogOpener
from retrieval_service.retriever import Retriever
from tests.retrieval.conftest import write_retrieval_version

NEVER_BOUGHT = "item-017"  # pruning shears: in the catalog, in no interaction
SHEARS_2 = Item("new-1", "Hedge shears", "Long blades for trimming hedges.", "Garden")
TELESCOPE = Item("new-2", "Telescope for stargazing", "Refractor, 70 mm aperture.", "Outdoors")
HOSE = "item-016"  # the garden hose: bought


@pytest.fixture(scope="module")
def bought(catalog: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A bundle whose CF knew every catalog item but NEVER_BOUGHT."""
    bundle = write_retrieval_version(tmp_path_factory.mktemp("bundle"), catalog, "v1")
    (bundle.path / CF_DIR).mkdir()
    known = [i for i in catalog["item_id"] if i != NEVER_BOUGHT]
    (bundle.path / CF_DIR / CF_ITEMS).write_text(json.dumps(known))
    return bundle


def new_ids(retriever: Retriever, last: str, **filters: frozenset[str]) -> list[str]:
    query = SearchQuery(top_k=10, history_item_ids=(last,), new_items_only=True, **filters)
    hits, _ = retriever.search(query)
    assert all(h.found_by == ("new",) and h.dense_score == h.score for h in hits)
    return [h.item_id for h in hits]


def test_only_products_without_interactions_are_searched_and_changes_keep_in_step(
    bought: Bundle, backend: CatalogOpener, tmp_path: Path
) -> None:
    retriever = Retriever.load(bought, tmp_path / "state", device="cpu", backend=backend)
    try:
        assert new_ids(retriever, HOSE) == [NEVER_BOUGHT]
        retriever.upsert([SHEARS_2, TELESCOPE])
        assert new_ids(retriever, HOSE) == [SHEARS_2.item_id, NEVER_BOUGHT, TELESCOPE.item_id]
        # Filters apply as to any search.
        assert new_ids(retriever, HOSE, categories=frozenset({"Outdoors"})) == [TELESCOPE.item_id]
        assert new_ids(retriever, HOSE, exclude_item_ids=frozenset({SHEARS_2.item_id})) == [
            NEVER_BOUGHT,
            TELESCOPE.item_id,
        ]
        # A product with interactions stays out, also when its text is replaced online.
        retriever.upsert([Item(HOSE, "Garden hose", "30 m now.", "Garden")])
        retriever.delete([TELESCOPE.item_id])
        assert new_ids(retriever, HOSE) == [SHEARS_2.item_id, NEVER_BOUGHT]
    finally:
        retriever.close()
    again = Retriever.load(bought, tmp_path / "state", device="cpu", backend=backend)
    try:
        assert new_ids(again, HOSE) == [SHEARS_2.item_id, NEVER_BOUGHT]
    finally:
        again.close()


def test_without_interactions_every_product_is_new(catalog: pd.DataFrame, tmp_path: Path) -> None:
    bundle = write_retrieval_version(tmp_path / "bundle", catalog, "v1")
    retriever = Retriever.load(bundle, None, device="cpu")
    try:
        plain, _ = retriever.search(SearchQuery(top_k=5, history_item_ids=(HOSE,)))
        assert new_ids(retriever, HOSE)[:5] == [h.item_id for h in plain]
    finally:
        retriever.close()
