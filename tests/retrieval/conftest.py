"""Shared retrieval fixtures: the real MiniLM encoder loaded once, and a small real catalog."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.core.bundle import Bundle, publish, staged_version, write_manifest
from retrieval_service.backends import CatalogOpener, FaissCatalog
from retrieval_service.encoder import Pooling, TextEncoder, default_encoder_dir

TITLES = [
    ("Trail running shoes", "Shoes", "Lightweight shoes with a grippy sole for muddy trails."),
    ("Leather office shoes", "Shoes", "Black oxford shoes, hand-stitched."),
    ("Wool hiking socks", "Clothing", "Warm merino socks."),
    ("Rain jacket", "Clothing", "Waterproof breathable shell with a hood for hikes in the rain."),
    ("Espresso machine", "Kitchen", "15-bar pump, steam wand for milk."),
    ("Chef's knife", "Kitchen", "20 cm stainless steel blade."),
    ("Cast iron skillet", "Kitchen", ""),
    ("Noise-cancelling headphones", "Electronics", "Over-ear, 30 hours of battery."),
    ("USB-C charger", "Electronics", "65 W, charges a laptop and a phone at once."),
    ("Mechanical keyboard", "Electronics", "Tactile switches, backlit keys, aluminium frame."),
    ("Yoga mat", "Sports", "Non-slip, 6 mm thick."),
    ("Road bike helmet", "Sports", "Ventilated helmet for cycling on the road, with MIPS."),
    ("Tennis racket", "Sports", ""),
    ("Children's picture book", "Books", "A bedtime story about a sleepy bear."),
    ("Science fiction novel", "Books", "A crew wakes up on a generation ship far from Earth."),
    (
        "Cookbook: Italian classics",
        "Books",
        "Pasta, risotto and sauces from every region of Italy.",
    ),
    ("Garden hose", "Garden", "25 m, kink-free."),
    ("Pruning shears", "Garden", "Bypass blades for branches up to 2 cm."),
    ("Desk lamp", "Home", "LED lamp with adjustable colour temperature and a USB port."),
    ("Scented candle", "Home", "Vanilla, 40 hours."),
    ("Board game", "Toys", "Strategy game for two to four players, about an hour a game."),
    ("Building blocks", "Toys", "500 pieces."),
    ("Dog leash", "Pets", "Reflective nylon leash, 2 m."),
    ("Cat scratching post", "Pets", "Sisal rope post with a platform on top."),
]


@pytest.fixture(scope="session")
def encoder() -> TextEncoder:
    """all-MiniLM-L6-v2 with mean pooling on CPU, loaded once per test session."""
    return TextEncoder.load(default_encoder_dir(), pooling="mean", device="cpu")


@pytest.fixture(scope="session")
def catalog() -> pd.DataFrame:
    """A small catalog in the build's input shape."""
    return pd.DataFrame(
        {
            "item_id": [f"item-{i:03d}" for i in range(len(TITLES))],
            "title": [t for t, _, _ in TITLES],
            "category": [c for _, c, _ in TITLES],
            "description": [d for _, _, d in TITLES],
            "attributes": [{} for _ in TITLES],
        }
    )


@pytest.fixture(scope="session")
def texts(catalog: pd.DataFrame) -> list[str]:
    """Item texts of the small catalog, of clearly different token lengths."""
    from retrieval_service.build import catalog_texts

    return catalog_texts(catalog)


@pytest.fixture(scope="session")
def item_vectors(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    return encoder.encode(texts)


def write_retrieval_version(
    root: Path, catalog: pd.DataFrame, version: str, pooling: Pooling = "mean"
) -> Bundle:
    """A real retrieval-only bundle version (catalog, embeddings, Flat index, encoder copy and
    manifest) published as ROOT/CURRENT: what Retriever.load reads."""
    from recsys.core import bundle as bundle_files
    from retrieval_service.build import build_retrieval
    from retrieval_service.catalog import save_catalog

    with staged_version(root, version) as stage:
        save_catalog(catalog, stage / bundle_files.CATALOG)
        built = build_retrieval(
            catalog, stage, default_encoder_dir(), pooling=pooling, factory="Flat", device="cpu"
        )
        write_manifest(stage, {"version": version, **built.manifest})
    publish(root, version)
    return Bundle.open(root, version)


@pytest.fixture(scope="session")
def milvus_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Milvus Lite file for the session (one process opens it; collections keep tests apart)."""
    pytest.importorskip("milvus_lite", reason="Milvus Lite comes with the milvus-lite extra")
    return str(tmp_path_factory.mktemp("milvus") / "retrieval.db")


@pytest.fixture(params=["faiss", "milvus"])
def backend(request: pytest.FixtureRequest) -> CatalogOpener:
    """The catalog backend a test runs on: embedded FAISS, then Milvus Lite with a collection
    prefix of the test's own, as `retrieval_backend=milvus` would serve."""
    if request.param == "faiss":
        return FaissCatalog.open
    from retrieval_service.milvus import MilvusTarget

    prefix = f"t{uuid.uuid4().hex[:12]}"
    target = MilvusTarget(
        request.getfixturevalue("milvus_db"), collection_prefix=prefix, index_type="FLAT"
    )
    return target.open
