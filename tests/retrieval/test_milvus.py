"""MilvusCatalog against a real Milvus Lite: an in-process engine on a .db file in tmp_path.

The vector index is FLAT (exact in Milvus Lite and in Milvus), so searches can be compared with
brute-force inner products."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from recsys.core.domain import Item
from recsys.core.errors import InvalidInput
from recsys.rpc.status import status_code

pytest.importorskip("milvus_lite", reason="Milvus Lite comes with the milvus-lite extra")

from milvus_lite.server_manager import server_manager_instance

from retrieval_service.milvus import (
    ID_MAX_BYTES,
    MilvusCatalog,
    MilvusUnavailable,
)

DIM = 32
N = 500
CATEGORIES = ["Books", "Shoes", "Kitchen", "Électronique", 'Toys "R" \\ Us']
# Ids a caller may send: quotes of both kinds, backslashes, escapes, unicode, an injection try.
AWKWARD_IDS = [
    'say "hi"',
    "it's",
    "back\\slash",
    "ends with \\",
    '\\"',
    "tab\there",
    "new\nline",
    "ünïcødé 商品 🛒",
    "a\x01b",
    '"] or item_id not in ["',
    "x' or item_id != '",
    # Through pymilvus's own delete(ids=[...]) this one deletes every row (it quotes, unescaped).
    "x'] or item_id not in ['",
]


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_items(ids: list[str]) -> list[Item]:
    return [
        Item(
            item_id=item_id,
            title=f"Title {i}",
            description="" if i % 3 else f"Beschreibung {i} — «quoted» \"and\" 'single'",
            category=CATEGORIES[i % len(CATEGORIES)],
            attributes={} if i % 4 == 0 else {"colour": "bleu", "größe": "42", 'k"ey': "v\\al"},
        )
        for i, item_id in enumerate(ids)
    ]


def top_k(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    scores = vectors @ query
    rows = np.argsort(-scores, kind="stable")[:k]
    return rows.tolist(), scores[rows]


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("milvus") / "catalog.db")


@pytest.fixture(scope="module")
def loaded(db: str) -> Iterator[tuple[MilvusCatalog, list[Item], np.ndarray]]:
    """500 random unit vectors in five categories, loaded once for the read-only tests."""
    items = make_items([f"item-{i:04d}" for i in range(N)])
    vectors = unit_vectors(N)
    catalog = MilvusCatalog.connect(db, "catalog", DIM, index_type="FLAT")
    catalog.load(items, vectors, batch=128)  # several batches, the last one partial
    yield catalog, items, vectors
    catalog.close()


@pytest.fixture
def fresh(db: str) -> Iterator[MilvusCatalog]:
    """An empty collection of its own, for a test that writes."""
    catalog = MilvusCatalog.connect(db, f"t_{uuid.uuid4().hex[:12]}", 4, index_type="FLAT")
    yield catalog
    catalog.drop()
    catalog.close()


def test_search_is_the_brute_force_top_k(
    loaded: tuple[MilvusCatalog, list[Item], np.ndarray],
) -> None:
    catalog, items, vectors = loaded
    assert len(catalog) == N and catalog.dimension == DIM
    for query in unit_vectors(20, seed=1):
        rows, scores = top_k(vectors, query, 10)
        hits = catalog.search(query, 10)
        assert [item.item_id for item, _, _ in hits] == [items[r].item_id for r in rows]
        np.testing.assert_allclose([score for _, score, _ in hits], scores, atol=1e-5)
        assert all(vector is None for _, _, vector in hits)


def test_search_returns_items_and_vectors(
    loaded: tuple[MilvusCatalog, list[Item], np.ndarray],
) -> None:
    catalog, items, vectors = loaded
    hits = catalog.search(vectors[7], 3, with_vectors=True)
    item, score, vector = hits[0]
    assert item == items[7]  # every field, attributes included, round-trips
    assert score == pytest.approx(1.0, abs=1e-5)
    assert vector is not None and vector.dtype == np.float32
    np.testing.assert_allclose(vector, vectors[7], atol=1e-6)


def test_category_filter_is_applied_before_top_k(
    loaded: tuple[MilvusCatalog, list[Item], np.ndarray],
) -> None:
    catalog, items, vectors = loaded
    wanted = frozenset({"Électronique", 'Toys "R" \\ Us'})
    rows = np.array([i for i, item in enumerate(items) if item.category in wanted])
    for query in unit_vectors(5, seed=2):
        best, _ = top_k(vectors[rows], query, 25)
        hits = catalog.search(query, 25, categories=wanted)
        assert [item.item_id for item, _, _ in hits] == [items[rows[b]].item_id for b in best]


def test_exclusions_and_categories_combine(
    loaded: tuple[MilvusCatalog, list[Item], np.ndarray],
) -> None:
    catalog, _, vectors = loaded
    query = vectors[0]
    first = [
        item.item_id for item, _, _ in catalog.search(query, 10, categories=frozenset({"Books"}))
    ]
    excluded = frozenset(first[:4])
    hits = catalog.search(query, 6, exclude=excluded, categories=frozenset({"Books"}))
    assert [item.item_id for item, _, _ in hits] == first[4:]
    assert catalog.search(query, 5, categories=frozenset({"no such category"})) == []


def test_awkward_ids_round_trip_and_filter_exactly(fresh: MilvusCatalog) -> None:
    vectors = unit_vectors(len(AWKWARD_IDS), dim=4, seed=3)
    items = make_items(AWKWARD_IDS)
    fresh.upsert(items, vectors)
    found, missing = fresh.get(AWKWARD_IDS)
    assert [item for item, _ in found] == items and missing == []
    query = np.ones(4, np.float32) / 2
    everything = {item.item_id for item, _, _ in fresh.search(query, 50)}
    assert everything == set(AWKWARD_IDS)
    excluded = frozenset(AWKWARD_IDS[::2])
    kept = {item.item_id for item, _, _ in fresh.search(query, 50, exclude=excluded)}
    assert kept == set(AWKWARD_IDS) - excluded
    # Injection attempts as ids delete those ids and nothing else.
    attempts = ['"] or item_id not in ["', "x'] or item_id not in ['"]
    assert fresh.delete(attempts) == (attempts, [])
    assert len(fresh) == len(AWKWARD_IDS) - 2


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(item_id=st.text(min_size=1, max_size=40))
def test_any_text_id_is_found_and_excluded(fresh: MilvusCatalog, item_id: str) -> None:
    assume(item_id != "other")
    fresh.upsert([Item(item_id, "t"), Item("other", "o")], np.eye(4, dtype=np.float32)[:2])
    [(found, _)], missing = fresh.get([item_id])
    assert found.item_id == item_id and missing == []
    query = np.eye(4, dtype=np.float32)[0]
    assert [i.item_id for i, _, _ in fresh.search(query, 5, exclude=frozenset({item_id}))] == [
        "other"
    ]
    assert fresh.delete([item_id]) == ([item_id], [])


def test_an_approximate_index_with_search_params(db: str) -> None:
    vectors = unit_vectors(300, seed=4)
    name = f"t_{uuid.uuid4().hex[:12]}"
    catalog = MilvusCatalog.connect(db, name, DIM, index_type="HNSW", search_params={"ef": 64})
    try:
        catalog.load(make_items([f"h{i}" for i in range(300)]), vectors)  # flushed: HNSW built
        assert catalog.info()["index_type"] == "HNSW"
        firsts = [catalog.search(v, 1)[0][0].item_id for v in vectors[:100]]
        assert np.mean([f == f"h{i}" for i, f in enumerate(firsts)]) >= 0.95
    finally:
        catalog.drop()
        catalog.close()


def test_get_keeps_request_order_and_reports_missing(
    loaded: tuple[MilvusCatalog, list[Item], np.ndarray],
) -> None:
    catalog, items, vectors = loaded
    ids = ["item-0042", "nope", "item-0001", "item-0042", 'also "missing"']
    found, missing = catalog.get(ids)
    assert [item for item, _ in found] == [items[42], items[1], items[42]]
    np.testing.assert_allclose(found[1][1], vectors[1], atol=1e-6)
    assert missing == ["nope", 'also "missing"']
    assert catalog.get([]) == ([], [])


def test_upsert_replaces_and_is_visible_to_the_next_search(fresh: MilvusCatalog) -> None:
    # Milvus Lite shows every write at once whatever the level: what can be checked here is that
    # the collection is made Strong (reads pass the level too, for a real cluster).
    described = fresh._client.describe_collection(fresh.collection)
    assert described["consistency_level_name"] == "Strong"
    eye = np.eye(4, dtype=np.float32)
    fresh.load([Item("a", "A"), Item("b", "B"), Item("c", "C")], eye[:3])
    # Right after the call returns, with no wait: the write was acknowledged.
    fresh.upsert([Item("a", "A, edited", category="New")], eye[3:4])
    hits = fresh.search(eye[3], 10)
    assert [item.item_id for item, _, _ in hits].count("a") == 1
    assert hits[0][0] == Item("a", "A, edited", category="New")
    assert hits[0][1] == pytest.approx(1.0)
    assert len(fresh) == 3
    fresh.upsert([Item("d", "D")], eye[2:3])
    assert fresh.search(eye[2], 1)[0][0].item_id in {"c", "d"}
    assert {item.item_id for item, _, _ in fresh.search(eye[2], 2)} == {"c", "d"}


def test_a_repeated_id_in_one_upsert_keeps_the_last(fresh: MilvusCatalog) -> None:
    eye = np.eye(4, dtype=np.float32)
    fresh.upsert([Item("a", "first"), Item("a", "last")], eye[:2])
    (item, vector), *_ = fresh.get(["a"])[0]
    assert item.title == "last" and len(fresh) == 1
    np.testing.assert_array_equal(vector, eye[1])


def test_delete_returns_deleted_and_missing(fresh: MilvusCatalog) -> None:
    eye = np.eye(4, dtype=np.float32)
    fresh.load([Item("a", "A"), Item("b", "B")], eye[:2])
    assert fresh.delete(["a", "zzz", "a"]) == (["a"], ["zzz", "a"])
    assert len(fresh) == 1
    assert [item.item_id for item, _, _ in fresh.search(eye[0], 5)] == ["b"]
    assert fresh.get(["a"]) == ([], ["a"])
    assert fresh.delete(["a"]) == ([], ["a"])
    # A deleted id can come back.
    fresh.upsert([Item("a", "again")], eye[:1])
    assert fresh.search(eye[0], 1)[0][0] == Item("a", "again")


def test_refuses_bad_input_before_writing(fresh: MilvusCatalog) -> None:
    one = np.ones((1, 4), np.float32) / 2
    with pytest.raises(InvalidInput, match="item_id"):
        fresh.upsert([Item("é" * (ID_MAX_BYTES // 2 + 1), "t")], one)  # fits in chars, not bytes
    with pytest.raises(InvalidInput, match="item_id: empty"):
        fresh.upsert([Item("", "t")], one)
    with pytest.raises(InvalidInput, match="expected rows of 4 floats"):
        fresh.upsert([Item("a", "t")], np.ones((1, 5), np.float32))
    with pytest.raises(InvalidInput, match="NaN"):
        fresh.upsert([Item("a", "t")], np.full((1, 4), np.nan, np.float32))
    with pytest.raises(InvalidInput, match="1 items but 2 vectors"):
        fresh.upsert([Item("a", "t")], np.ones((2, 4), np.float32))
    with pytest.raises(InvalidInput, match="top_k"):
        fresh.search(one[0], 0)
    with pytest.raises(InvalidInput, match="expected rows of 4 floats"):
        fresh.search(np.ones(3, np.float32), 1)
    assert len(fresh) == 0


def test_existing_collection_with_another_schema_is_refused(db: str) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    MilvusCatalog.connect(db, name, 8, index_type="FLAT").close()
    with pytest.raises(InvalidInput) as dimension:
        MilvusCatalog.connect(db, name, 16, index_type="FLAT")
    message = str(dimension.value)
    assert "\n" not in message and repr(name) in message and "dim 8, expected 16" in message
    with pytest.raises(InvalidInput, match="vector index is FLAT") as index:
        MilvusCatalog.connect(db, name, 8, index_type="HNSW")
    assert "\n" not in str(index.value)
    reopened = MilvusCatalog.connect(db, name, 8, index_type="flat")
    assert reopened.info()["index_type"] == "FLAT"
    reopened.drop()
    reopened.close()


def test_data_survives_a_restart_of_the_engine(tmp_path: Path) -> None:
    path = str(tmp_path / "restart.db")
    items, vectors = make_items(["a", "ü", 'q"uote']), unit_vectors(3, dim=4)
    catalog = MilvusCatalog.connect(path, "catalog", 4, index_type="FLAT")
    catalog.load(items, vectors)
    catalog.delete(["a"])
    catalog.close()
    server_manager_instance.release_server(path)  # stops the in-process engine, closes the file
    again = MilvusCatalog.connect(path, "catalog", 4, index_type="FLAT")
    try:
        assert len(again) == 2
        found, missing = again.get(["a", "ü", 'q"uote'])
        assert [item for item, _ in found] == items[1:] and missing == ["a"]
        np.testing.assert_allclose(np.stack([v for _, v in found]), vectors[1:], atol=1e-6)
    finally:
        again.close()
        server_manager_instance.release_server(path)


WRITER = """
import sys
import numpy as np
from recsys.core.domain import Item
from retrieval_service.milvus import MilvusCatalog
catalog = MilvusCatalog.connect(sys.argv[1], "catalog", 4, index_type="FLAT")
catalog.upsert([Item("survivor", "Acknowledged, then killed")], np.eye(4, dtype=np.float32)[:1])
print("acknowledged", flush=True)
sys.stdin.read()  # held open until the test kills this process
"""

SECOND_OPENER = """
import sys
from retrieval_service.milvus import MilvusCatalog, MilvusUnavailable
try:
    MilvusCatalog.connect(sys.argv[1], "catalog", 4, index_type="FLAT")
except MilvusUnavailable as exc:
    print("refused:", exc)
else:
    print("opened")
"""


def test_one_process_per_lite_file_and_acknowledged_writes_survive_a_kill(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "shared.db")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=os.environ,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "acknowledged"
        # While the writer holds the file, another process cannot open it.
        second = subprocess.run(
            [sys.executable, "-c", SECOND_OPENER, path],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ,
        )
        assert second.stdout.startswith("refused:"), second.stdout + second.stderr
        assert "one process at a time" in second.stdout
    finally:
        writer.kill()  # SIGKILL: no close, no flush, no atexit
        writer.wait(timeout=60)
    # The lock dies with the process, and the acknowledged write is there (WAL replay).
    catalog = MilvusCatalog.connect(path, "catalog", 4, index_type="FLAT")
    try:
        assert [item.title for item, _ in catalog.get(["survivor"])[0]] == [
            "Acknowledged, then killed"
        ]
    finally:
        catalog.close()
        server_manager_instance.release_server(path)


def test_engine_failures_are_unavailable(db: str) -> None:
    with pytest.raises(MilvusUnavailable) as unreachable:
        MilvusCatalog.connect("http://127.0.0.1:1", "catalog", 4, timeout=2)
    assert status_code(unreachable.value) == grpc.StatusCode.UNAVAILABLE
    assert "\n" not in str(unreachable.value)
    catalog = MilvusCatalog.connect(db, f"t_{uuid.uuid4().hex[:12]}", 4, index_type="FLAT")
    catalog.drop()  # gone underneath a live catalog, as when an operator drops it
    with pytest.raises(MilvusUnavailable, match="search on collection"):
        catalog.search(np.ones(4, np.float32), 1)
    catalog.close()


def test_info_names_the_collection_without_credentials(
    loaded: tuple[MilvusCatalog, list[Item], np.ndarray], db: str
) -> None:
    catalog, _, _ = loaded
    assert catalog.info() == {
        "index_factory": f"milvus FLAT catalog at {db}",
        "device": "milvus",
        "backend": "milvus",
        "uri": db,
        "collection": "catalog",
        "index_type": "FLAT",
        "metric": "IP",
        "dimension": DIM,
        "size": N,
        "lexical": "none",
    }
