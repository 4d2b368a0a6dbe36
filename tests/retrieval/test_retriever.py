"""Retriever over a real encoder and FAISS index: filters, history vectors, durable upserts/deletes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.core.bundle import Bundle
from recsys.core.domain import Item, SearchQuery
from recsys.core.encoder import TextEncoder
from recsys.core.errors import InvalidInput
from recsys.core.settings import Settings
from retrieval_service.backends import CatalogOpener, FaissCatalog, backend_opener
from retrieval_service.changes import deletes
from retrieval_service.retriever import HistoryWeights, Retriever
from retrieval_service.state import Journal
from tests.retrieval.conftest import write_retrieval_version


@pytest.fixture(scope="module")
def v1(catalog: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return write_retrieval_version(tmp_path_factory.mktemp("bundle"), catalog, "v1")


def make_retriever(
    bundle: Bundle, backend: CatalogOpener, state_dir: Path | None = None
) -> Retriever:
    return Retriever.load(bundle, state_dir, device="cpu", compact_records=100, backend=backend)


def ids(retriever: Retriever, **query: object) -> list[str]:
    hits, _ = retriever.search(SearchQuery(**query))  # type: ignore[arg-type]
    return [h.item_id for h in hits]


def test_the_backend_is_chosen_by_name_from_the_settings(tmp_path: Path) -> None:
    from retrieval_service.milvus import MilvusTarget

    assert backend_opener(Settings.built_in()) == FaissCatalog.open
    token = tmp_path / "token"
    milvus = backend_opener(
        Settings.built_in(
            retrieval_backend="milvus",
            milvus_uri="http://milvus:19530",
            milvus_token_file=token,
            milvus_collection_prefix="shop",
            milvus_index_type="HNSW",
        )
    )
    target = MilvusTarget("http://milvus:19530", token, "shop", "HNSW")
    # The opener opens each version in collection shop_<version> with an HNSW index.
    assert getattr(milvus, "__self__", None) == target and milvus.__name__ == "open"
    assert target.collection("2026-01-02.1") == "shop_2026_01_02_1"


def test_text_search_finds_the_item_and_filters_apply(
    v1: Bundle, catalog: pd.DataFrame, backend: CatalogOpener
) -> None:
    retriever = make_retriever(v1, backend)
    assert ids(retriever, top_k=3, text="Espresso machine")[0] == "item-004"
    kitchen = ids(retriever, top_k=3, text="Espresso machine", categories=frozenset({"Books"}))
    assert all(catalog.set_index("item_id").loc[i, "category"] == "Books" for i in kitchen)
    excluded = ids(
        retriever, top_k=3, text="Espresso machine", exclude_item_ids=frozenset({"item-004"})
    )
    assert "item-004" not in excluded and len(excluded) == 3


def test_history_vector_is_recency_weighted_and_unknown_ids_are_reported(
    v1: Bundle, catalog: pd.DataFrame, backend: CatalogOpener
) -> None:
    retriever = make_retriever(v1, backend)
    retriever.history = HistoryWeights(half_life=1.0)
    history = ("item-005", "item-006", "item-013", "item-014")  # knife, skillet, two books
    categories = catalog.set_index("item_id")["category"]

    def top_category(order: tuple[str, ...]) -> str:
        hits, unknown = retriever.search(
            SearchQuery(
                top_k=1, history_item_ids=(*order, "nope"), exclude_item_ids=frozenset(order)
            )
        )
        assert unknown == ["nope"]
        return str(categories[hits[0].item_id])

    # Most recent first: whichever pair is most recent decides.
    assert top_category(history) == "Kitchen"
    assert top_category(tuple(reversed(history))) == "Books"


def test_query_needs_something_and_vectors_need_the_right_dimension(
    v1: Bundle, encoder: TextEncoder, backend: CatalogOpener
) -> None:
    retriever = make_retriever(v1, backend)
    with pytest.raises(InvalidInput, match="query"):
        retriever.search(SearchQuery(top_k=3, history_item_ids=("unknown",)))
    with pytest.raises(InvalidInput, match="query_vector"):
        retriever.search(SearchQuery(top_k=3, vector=np.ones(3, np.float32)))
    vector = encoder.encode(["Desk lamp"])[0]
    assert ids(retriever, top_k=1, vector=vector) == ["item-018"]


def test_upserts_and_deletes_survive_a_reload_through_the_journal(
    v1: Bundle, catalog: pd.DataFrame, tmp_path: Path, backend: CatalogOpener
) -> None:
    retriever = make_retriever(v1, backend, tmp_path)
    new = Item("new-1", "Telescope for stargazing", "Refractor, 70 mm aperture.", "Outdoors")
    replaced = Item("item-018", "Floor lamp", "Tall arc lamp.", "Home")
    size = retriever.upsert([new, replaced])
    assert size == len(catalog) + 1
    retriever.delete(["item-019"])
    assert ids(retriever, top_k=1, text="Telescope for stargazing") == ["new-1"]
    retriever.close()

    reloaded = make_retriever(v1, backend, tmp_path)
    assert len(reloaded.catalog) == len(catalog)  # +1 new, -1 deleted, replaced in place
    assert ids(reloaded, top_k=1, text="Telescope for stargazing") == ["new-1"]
    assert reloaded.get_items(["item-018"])[0][0][0] == replaced
    assert "item-019" not in ids(reloaded, top_k=len(catalog), text="Scented candle")
    found, missing = reloaded.get_items(["item-018", "item-019"])
    assert [i.item_id for i, _ in found] == ["item-018"] and missing == ["item-019"]
    assert reloaded.replayed.encoded == 0 and reloaded.replayed.stored_vectors == 2


def test_a_torn_journal_tail_is_dropped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    journal.append(deletes(["a"]))
    with path.open("a") as fh:
        fh.write('{"op": "delete", "item_')  # crash mid-write: never acknowledged
    assert [changes for _, changes in Journal(path).read()] == [deletes(["a"])]
    Journal(path).drop_torn_tail()
    assert path.read_text() == '{"op": "delete", "item_ids": ["a"]}\n'
