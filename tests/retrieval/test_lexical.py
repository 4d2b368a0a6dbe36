"""The lexical (BM25) index, alone and inside the embedded catalog: scoring, online changes,
the bundle's postings file, and the hybrid search that merges it with the dense list."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle
from recsys.core.domain import Item, SearchQuery
from recsys.core.errors import DataLoss
from retrieval_service.backends import FaissCatalog
from retrieval_service.lexical import K1, B, LexicalIndex, tokenize
from retrieval_service.retriever import HybridSettings, Retriever
from tests.retrieval.conftest import write_retrieval_version

DOCS = [
    "Stainless steel pipette tips, 200 ul",
    "Pipette stand for six pipettes",
    "Lab coat, cotton",
    "Nitrile gloves, box of 100",
]


def bm25(term_docs: list[list[str]], query: list[str], doc: int) -> float:
    """BM25 written out from its definition, for one document."""
    n = len(term_docs)
    mean = sum(map(len, term_docs)) / n
    score = 0.0
    for term in query:
        df = sum(term in d for d in term_docs)
        tf = term_docs[doc].count(term)
        if not tf:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * len(term_docs[doc]) / mean))
    return score


def test_tokens_are_stemmed_words_without_stop_words_and_numbers_stay_distinct() -> None:
    assert tokenize("The Pipettes of a lab") == ["pipett", "lab"]
    assert tokenize("item number 123") != tokenize("item number 132")
    assert tokenize("") == [] and tokenize("the of and") == []


def test_scores_are_bm25_best_first_and_only_rows_sharing_a_term() -> None:
    index = LexicalIndex.build(DOCS)
    rows, scores = index.scores("pipette tips")
    terms = [tokenize(d) for d in DOCS]
    expected = {r: bm25(terms, tokenize("pipette tips"), r) for r in range(len(DOCS))}
    assert set(rows.tolist()) == {r for r, s in expected.items() if s > 0} == {0, 1}
    assert list(rows) == sorted(expected, key=lambda r: -expected[r])[:2]
    for row, score in zip(rows, scores, strict=True):
        assert score == pytest.approx(expected[int(row)], rel=1e-5)
    assert index.scores("microscope")[0].size == 0


def test_a_removed_row_no_longer_counts_in_n_df_or_lengths() -> None:
    index = LexicalIndex.build(DOCS)
    index.remove(1, DOCS[1])
    index.add(len(DOCS), ["Ceramic mortar and pestle"])
    rows, scores = index.scores("pipette")
    assert rows.tolist() == [0]
    # The same figure as an index that never held the removed row.
    alive = [DOCS[0], DOCS[2], DOCS[3], "Ceramic mortar and pestle"]
    assert scores[0] == pytest.approx(LexicalIndex.build(alive).scores("pipette")[1][0], rel=1e-5)
    assert len(index) == 4 and index.rows == 5
    with pytest.raises(ValueError, match="grow in order"):
        index.add(3, ["out of order"])


def test_postings_round_trip_through_the_bundle_file(tmp_path: Path) -> None:
    index = LexicalIndex.build(DOCS)
    index.remove(2, DOCS[2])
    index.save(tmp_path / "lexical.npz")
    loaded = LexicalIndex.load(tmp_path / "lexical.npz")
    for query in ("pipette tips", "lab coat", "gloves 100"):
        a, b = index.scores(query), loaded.scores(query)
        assert a[0].tolist() == b[0].tolist()
        np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    loaded.add(loaded.rows, ["Lab notebook"])  # a loaded index keeps taking rows
    assert loaded.scores("notebook")[0].tolist() == [4]


def test_an_unreadable_or_foreign_postings_file_is_a_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "lexical.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(DataLoss, match=r"lexical index .*not readable"):
        LexicalIndex.load(garbage)
    other = tmp_path / "other.npz"
    np.savez(other, tokenizer=np.array("whitespace-0"))
    with pytest.raises(DataLoss, match="tokenizer whitespace-0"):
        LexicalIndex.load(other)


@pytest.fixture(scope="module")
def v1(catalog: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return write_retrieval_version(tmp_path_factory.mktemp("bundle"), catalog, "v1")


def test_the_build_writes_postings_the_catalog_loads(v1: Bundle, catalog: pd.DataFrame) -> None:
    assert (v1.path / bundle_files.LEXICAL).is_file()
    assert v1.manifest["lexical"]["tokenizer"] == "words-en-snowball-1"
    opened = FaissCatalog.open(v1, "cpu")
    assert opened.lexical.rows == len(catalog)
    # The same as an index built from the items at load time (a bundle without the file).
    rebuilt = FaissCatalog(opened.store, opened.index)
    assert opened.lexical.scores("shoes")[0].tolist() == rebuilt.lexical.scores("shoes")[0].tolist()


def lexical_ids(catalog: FaissCatalog, text: str, **filters: frozenset[str]) -> list[str]:
    return [item.item_id for item, _, _ in catalog.lexical_search(text, 10, **filters)]


def test_lexical_hits_follow_upserts_deletes_and_filters(v1: Bundle) -> None:
    opened = FaissCatalog.open(v1, "cpu")
    dim = opened.dimension
    opened.upsert(
        [Item("sku-123", "Microscope slide box, item number 123", category="Lab")],
        np.ones((1, dim), np.float32) / math.sqrt(dim),
    )
    assert lexical_ids(opened, "microscope") == ["sku-123"]
    # Replaced: the old text no longer matches, the new one does.
    opened.upsert(
        [Item("sku-123", "Centrifuge tubes", category="Lab")],
        np.ones((1, dim), np.float32) / math.sqrt(dim),
    )
    assert lexical_ids(opened, "microscope") == []
    assert lexical_ids(opened, "centrifuge") == ["sku-123"]
    assert lexical_ids(opened, "centrifuge", categories=frozenset({"Books"})) == []
    assert lexical_ids(opened, "centrifuge", exclude=frozenset({"sku-123"})) == []
    assert opened.lexical_scores("centrifuge", ["sku-123", "item-000", "nope"])[1:] == [0.0, None]
    opened.delete(["sku-123"])
    assert lexical_ids(opened, "centrifuge") == []
    # One id twice in a batch: only its last text is indexed.
    opened.upsert(
        [Item("twice", "Beaker"), Item("twice", "Flask")],
        np.ones((2, dim), np.float32) / math.sqrt(dim),
    )
    assert lexical_ids(opened, "beaker") == [] and lexical_ids(opened, "flask") == ["twice"]


def test_hybrid_search_merges_both_lists_and_says_who_found_each_hit(
    v1: Bundle, tmp_path: Path
) -> None:
    retriever = Retriever.load(v1, tmp_path, device="cpu")
    # Near-identical titles a dense embedding cannot tell apart; the number decides.
    retriever.upsert(
        [Item(f"slide-{n}", f"Glass microscope slides, item number {n}") for n in range(120, 140)]
    )
    hits, _ = retriever.search(SearchQuery(top_k=5, text="Glass microscope slides item number 132"))
    assert hits[0].item_id == "slide-132"
    assert set(hits[0].found_by) == {"dense", "lexical"}
    assert all(h.dense_score is not None and h.lexical_score is not None for h in hits)
    assert retriever.info()["lexical"].startswith("bm25 (")  # what GetIndexInfo reports
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Dense only: a history query, and the setting turned off.
    history, _ = retriever.search(SearchQuery(top_k=3, history_item_ids=("slide-132",)))
    assert all(h.found_by == ("dense",) and h.lexical_score is None for h in history)
    retriever.close()
    dense_only = Retriever.load(v1, tmp_path, device="cpu", hybrid=HybridSettings(lexical=False))
    plain, _ = dense_only.search(
        SearchQuery(top_k=5, text="Glass microscope slides item number 132")
    )
    assert all(h.found_by == ("dense",) and h.lexical_score is None for h in plain)
    assert [h.score for h in plain] == [h.dense_score for h in plain]
    assert dense_only.info()["lexical"] == "none"
