"""On the real MovieLens catalog, an item's own title finds it first (Flat and IVF)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from recsys.app.ingest import catalog_items
from recsys.app.movielens import read_movielens
from recsys.core.domain import SearchQuery
from recsys.core.encoder import TextEncoder
from retrieval_service.backends import FaissCatalog
from retrieval_service.catalog import ItemStore
from retrieval_service.index import VectorIndex
from retrieval_service.retriever import Retriever

SAMPLE = 500


@pytest.fixture(scope="module")
def movielens_items(movielens_zip: Path, encoder: TextEncoder) -> tuple[list, np.ndarray]:
    items = catalog_items(read_movielens(movielens_zip).catalog)
    return items, encoder.encode([i.text() for i in items], batch_size=128)


@pytest.mark.movielens
@pytest.mark.parametrize(("factory", "target"), [("Flat", 0.95), ("IVF128,Flat", 0.90)])
def test_own_title_is_the_first_hit(
    movielens_items: tuple[list, np.ndarray], encoder: TextEncoder, factory: str, target: float
) -> None:
    items, vectors = movielens_items
    index = VectorIndex.build(vectors, factory, device="cpu")
    retriever = Retriever(encoder, FaissCatalog(ItemStore(items, vectors), index), "test")
    picked = random.Random(0).sample(items, SAMPLE)
    hits = sum(
        retriever.search(SearchQuery(top_k=1, text=item.title))[0][0].item_id == item.item_id
        for item in picked
    )
    assert hits / SAMPLE >= target, f"{factory}: {hits}/{SAMPLE} titles found their item first"
