"""Shared retrieval fixtures: bundle versions with the small real catalog (tests/conftest.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd
import pytest

from recsys.core.bundle import Bundle, publish, staged_version, write_manifest
from recsys.core.encoder import Pooling, default_encoder_dir
from retrieval_service.backends import CatalogOpener, FaissCatalog


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
