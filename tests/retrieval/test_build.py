"""build_retrieval end to end: real encoder, real FAISS, files on disk, reloadable bundle part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.core.encoder import TextEncoder, default_encoder_dir
from recsys.core.errors import InvalidInput
from retrieval_service.build import (
    RetrievalBuild,
    build_retrieval,
    catalog_texts,
    encoder_checksums,
)
from retrieval_service.index import VectorIndex


@pytest.fixture(scope="module")
def built(
    catalog: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, RetrievalBuild]:
    out = tmp_path_factory.mktemp("retrieval")
    return out, build_retrieval(catalog, out, default_encoder_dir(), factory="Flat", device="cpu")


def test_writes_embeddings_index_and_encoder(
    built: tuple[Path, RetrievalBuild], item_vectors: np.ndarray
) -> None:
    out, _ = built
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, item_vectors, atol=1e-5)  # row i = catalog row i
    assert (out / "index.faiss").is_file()
    copied = {p.relative_to(out / "encoder").as_posix() for p in (out / "encoder").rglob("*")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"} <= copied
    assert "README.md" not in copied and ".gitattributes" not in copied


def test_manifest_sections(built: tuple[Path, RetrievalBuild]) -> None:
    _, result = built
    manifest = result.manifest
    assert manifest["encoder"]["pooling"] == "mean"
    assert manifest["encoder"]["dimension"] == 384
    assert manifest["encoder"]["name"] == result.encoder.name
    assert manifest["index"] == {"factory": "Flat", "size": 24, "nprobe": 16, "device_built": "cpu"}
    assert manifest["timings"]["items_per_second"] > 0


def test_encoder_copy_loads_and_gives_identical_vectors(
    built: tuple[Path, RetrievalBuild], texts: list[str]
) -> None:
    out, result = built
    copy = TextEncoder.load(out / "encoder", device="cpu")
    assert copy.name == result.encoder.name  # the name survives the copy
    np.testing.assert_array_equal(copy.encode(texts), result.encoder.encode(texts))


def test_saved_index_serves_the_catalog(
    built: tuple[Path, RetrievalBuild], item_vectors: np.ndarray
) -> None:
    out, result = built
    index = VectorIndex.load(out / "index.faiss", factory="Flat", device="cpu")
    _, rows = index.search(item_vectors, 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(len(item_vectors)))
    assert result.index.ntotal == index.ntotal == len(item_vectors)


def test_bad_factory_fails_before_writing(catalog: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="IVF64,Flat"):
        build_retrieval(catalog, tmp_path / "out", default_encoder_dir(), factory="IVF64,Flat")
    assert not (tmp_path / "out").exists()


def test_catalog_without_title_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="title"):
        build_retrieval(pd.DataFrame({"item_id": ["a"]}), tmp_path, default_encoder_dir())


def test_known_vectors_are_reused_and_only_changed_texts_encoded(
    built: tuple[Path, RetrievalBuild],
    catalog: pd.DataFrame,
    item_vectors: np.ndarray,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out, result = built
    previous = np.load(out / "embeddings.npy")
    changed = catalog.copy()
    changed.loc[0, "title"] = "A completely different product"
    known = dict(zip(catalog_texts(catalog), previous, strict=True))
    with caplog.at_level("INFO", logger="retrieval_service.build"):
        again = build_retrieval(changed, tmp_path, default_encoder_dir(), device="cpu", known=known)
    n = len(catalog)
    assert f"reused {n - 1} of {n} item embeddings" in caplog.text
    assert again.manifest["embeddings"] == {"items": n, "reused": n - 1, "encoded": 1}
    vectors = np.load(tmp_path / "embeddings.npy")
    np.testing.assert_array_equal(vectors[1:], previous[1:])
    np.testing.assert_allclose(
        vectors[0], result.encoder.encode(catalog_texts(changed)[:1])[0], atol=1e-5
    )
    assert not np.allclose(vectors[0], item_vectors[0], atol=1e-3)


def test_encoder_checksums_match_the_copy_in_a_bundle(built: tuple[Path, RetrievalBuild]) -> None:
    out, _ = built
    source = encoder_checksums(default_encoder_dir())
    assert "model.safetensors" in source
    assert encoder_checksums(out / "encoder") == source
