"""The offline half of retrieval: catalog → embeddings, ANN index and a self-contained encoder copy."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.core import bundle as bundle_files
from recsys.core.bundle import sha256_file
from recsys.core.domain import item_text
from recsys.core.encoder import ENCODER_INFO, Pooling, TextEncoder
from recsys.core.errors import InvalidInput
from retrieval_service import lexical as lexical_module
from retrieval_service.index import VectorIndex, check_factory
from retrieval_service.lexical import LexicalIndex

log = logging.getLogger(__name__)

# Top-level files of a model directory that the encoder needs at load time.
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".tiktoken")
# Metadata that ships with hub repositories but is never read when loading.
_SKIPPED_FILES = {"data_config.json", "README.md", ".gitattributes"}


@dataclass(frozen=True)
class RetrievalBuild:
    """What the build wrote (as manifest sections) and the loaded parts, for reuse by later steps."""

    manifest: dict[str, Any]
    encoder: TextEncoder
    index: VectorIndex


def build_retrieval(
    catalog: pd.DataFrame,
    out_dir: Path,
    encoder_dir: Path,
    pooling: Pooling = "mean",
    factory: str = "Flat",
    device: str = "auto",
    batch_size: int = 64,
    known: Mapping[str, np.ndarray] | None = None,
) -> RetrievalBuild:
    """Encodes every catalog item and writes embeddings.npy, index.faiss and encoder/ into out_dir.

    `known` maps item texts to vectors this same encoder made (a previous version's): those
    items are not encoded again."""
    texts = catalog_texts(catalog)
    encoder = TextEncoder.load(encoder_dir, pooling=pooling, device=device)
    # Reject a bad factory before the (long) encoding pass, not after it.
    check_factory(factory, encoder.dimension, len(texts))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    vectors, reused = _encode_new(encoder, texts, known or {}, batch_size)
    encode_seconds = time.perf_counter() - t0
    np.save(out_dir / bundle_files.EMBEDDINGS, vectors)

    log.info("building FAISS index %r over %d vectors", factory, len(vectors))
    t0 = time.perf_counter()
    index = VectorIndex.build(vectors, factory=factory, device=device)
    index_seconds = time.perf_counter() - t0
    index.save(out_dir / bundle_files.INDEX)

    t0 = time.perf_counter()
    lexical = LexicalIndex.build(texts)
    lexical.save(out_dir / bundle_files.LEXICAL)
    lexical_seconds = time.perf_counter() - t0

    copy_encoder(Path(encoder_dir), out_dir / bundle_files.ENCODER_DIR, encoder.name)
    manifest = {
        "encoder": {
            "name": encoder.name,
            "source": str(Path(encoder_dir).resolve()),
            "pooling": encoder.pooling,
            "dimension": encoder.dimension,
            "max_length": encoder.max_length,
        },
        "index": index.describe(),
        "lexical": {
            "scoring": f"bm25 k1={lexical_module.K1} b={lexical_module.B}",
            "tokenizer": lexical_module.TOKENIZER,
            "terms": lexical.vocabulary,
        },
        "embeddings": {"items": len(texts), "reused": reused, "encoded": len(texts) - reused},
        "timings": {
            "encode_seconds": round(encode_seconds, 3),
            "items_per_second": (
                round((len(texts) - reused) / encode_seconds, 1) if encode_seconds else None
            ),
            "index_seconds": round(index_seconds, 3),
            "lexical_seconds": round(lexical_seconds, 3),
        },
    }
    return RetrievalBuild(manifest=manifest, encoder=encoder, index=index)


def _encode_new(
    encoder: TextEncoder, texts: list[str], known: Mapping[str, np.ndarray], batch_size: int
) -> tuple[np.ndarray, int]:
    """(a vector per text, how many came from `known`): only the other texts are encoded."""
    reused = sum(t in known for t in texts)
    if known:
        log.info("reused %d of %d item embeddings", reused, len(texts))
    fresh = [t for t in dict.fromkeys(texts) if t not in known]
    log.info("encoding %d items with %s on %s", len(fresh), encoder.name, encoder.device)
    by_text = dict(known)
    by_text.update(
        zip(fresh, encoder.encode(fresh, batch_size=batch_size, progress=True), strict=True)
    )
    return np.stack([by_text[t] for t in texts]).astype(np.float32, copy=False), reused


def encoder_checksums(source: Path) -> dict[str, str]:
    """sha256 of each model file `copy_encoder` copies from `source` (not the name it records),
    by path relative to it: equal checksums mean the same model makes the same vectors."""
    return {
        str(p.relative_to(source)): sha256_file(p)
        for p in _model_files(Path(source))
        if p.name != ENCODER_INFO
    }


def catalog_texts(catalog: pd.DataFrame) -> list[str]:
    """The encoder's input for each catalog row, in row order (missing fields count as blank)."""
    missing = {"item_id", "title"} - set(catalog.columns)
    if missing:
        raise InvalidInput(f"catalog: missing column(s) {', '.join(sorted(missing))}")

    def column(name: str) -> list[str]:
        if name not in catalog.columns:
            return [""] * len(catalog)
        return catalog[name].fillna("").astype(str).tolist()

    return [
        item_text(title, category, description)
        for title, category, description in zip(
            column("title"), column("category"), column("description"), strict=True
        )
    ]


def copy_encoder(source: Path, target: Path, name: str) -> None:
    """Copies only what loading needs (configs, tokenizer, weights, module configs) and records the
    model's name, so a bundle works without the original directory."""
    target.mkdir(parents=True, exist_ok=True)
    for path in _model_files(source):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
    (target / ENCODER_INFO).write_text(json.dumps({"name": name}, indent=2) + "\n")
    log.info("copied encoder %s into %s", source, target)


def _model_files(source: Path) -> list[Path]:
    """Top-level model files plus the sentence-transformers module folders named in modules.json."""
    files = [
        p
        for p in sorted(source.iterdir())
        if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES and p.name not in _SKIPPED_FILES
    ]
    # Legacy .bin weights only when there are no safetensors, so weights are never copied twice.
    if not any(p.suffix == ".safetensors" for p in files):
        files += sorted(source.glob("pytorch_model*.bin"))
    for folder in _module_folders(source):
        files += sorted(
            p for p in folder.rglob("*") if p.is_file() and p.name not in _SKIPPED_FILES
        )
    return files


def _module_folders(source: Path) -> list[Path]:
    """Folders such as 1_Pooling/ that sentence-transformers' modules.json points at."""
    modules = source / "modules.json"
    if not modules.is_file():
        return []
    try:
        entries = json.loads(modules.read_text())
    except ValueError:
        return []
    folders = [source / str(e.get("path", "")) for e in entries if isinstance(e, dict)]
    return [f for f in folders if f != source and f.is_dir()]
