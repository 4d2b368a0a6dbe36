"""SciFact: the converter on a real slice of the files, its errors, and the search bundle a
plain `recsys build` makes from a query log alone (no user interactions)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from gateway.candidates import PoolPolicy
from ranking_service.ranker import Ranker
from recsys.app.build import BuildOptions, build_bundle, load_inputs
from recsys.app.cli import main
from recsys.app.scifact import convert_scifact
from recsys.core.bundle import Bundle
from recsys.core.errors import InvalidInput
from recsys.core.settings import Settings
from recsys.offline.local import gather_pools, pool_request
from retrieval_service.retriever import Retriever

TRAIN_CLAIMS, TEST_CLAIMS, DISTRACTORS = 40, 12, 120


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def scifact_slice(scifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first claims of each split, the abstracts they cite and some others, in the
    original files' format."""
    out = tmp_path_factory.mktemp("scifact")
    train = read_jsonl(scifact_dir / "train.jsonl")[:TRAIN_CLAIMS]
    test = read_jsonl(scifact_dir / "test.jsonl")[:TEST_CLAIMS]
    cited = {str(d) for claim in train + test for d in claim["relevant"]}  # type: ignore[attr-defined]
    corpus = read_jsonl(scifact_dir / "corpus.jsonl")
    kept = [d for d in corpus if d["doc_id"] in cited]
    kept += [d for d in corpus if d["doc_id"] not in cited][:DISTRACTORS]
    write_jsonl(out / "corpus.jsonl", kept)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    return out


@pytest.fixture(scope="module")
def converted(scifact_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    assert main(["datasets", "scifact", str(scifact_slice), "--out", str(out)]) == 0
    return out


def test_the_converter_writes_abstracts_a_training_query_log_and_the_test_claims(
    scifact_slice: Path, converted: Path
) -> None:
    catalog = pd.read_csv(converted / "catalog.csv", dtype=str)
    corpus = read_jsonl(scifact_slice / "corpus.jsonl")
    assert catalog["item_id"].tolist() == [d["doc_id"] for d in corpus]
    assert catalog["description"].tolist() == [d["text"] for d in corpus]
    queries = read_jsonl(converted / "queries.jsonl")
    test = read_jsonl(converted / "test_queries.jsonl")
    assert len(queries) == TRAIN_CLAIMS and {q["split"] for q in queries} == {"train"}
    assert len(test) == TEST_CLAIMS and {q["split"] for q in test} == {"test"}
    first = read_jsonl(scifact_slice / "train.jsonl")[0]
    assert queries[0] == {
        "query": first["claim"],
        "item_ids": [str(d) for d in first["relevant"]],  # type: ignore[attr-defined]
        "split": "train",
    }
    assert json.loads((converted / "dataset.json").read_text())["dataset"] == "scifact"


def test_bad_files_are_one_line_naming_file_and_line_and_write_nothing(
    scifact_slice: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("corpus.jsonl", "train.jsonl", "test.jsonl"):
        (broken / name).write_text((scifact_slice / name).read_text())
    out = tmp_path / "out"
    (broken / "test.jsonl").write_text('{"id": "1", "claim": "x", "relevant": ["nope"]}\n')
    with pytest.raises(InvalidInput, match=r"test\.jsonl line 1: relevant doc_id 'nope'"):
        convert_scifact(broken, out)
    (broken / "test.jsonl").write_text('{"id": "1", "claim": "x"}\nnot json\n')
    with pytest.raises(InvalidInput, match=r"test\.jsonl line 1: missing field 'relevant'"):
        convert_scifact(broken, out)
    (broken / "test.jsonl").unlink()
    assert main(["datasets", "scifact", str(broken), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "test.jsonl: file not found" in err[0]
    assert not out.exists()


def test_a_build_needs_interactions_or_searches(converted: Path, tmp_path: Path) -> None:
    options = BuildOptions(converted / "catalog.csv", None, tmp_path / "bundle", ranker=None)
    with pytest.raises(InvalidInput, match="--interactions, --queries"):
        load_inputs(options)
    searches = load_inputs(
        BuildOptions(
            converted / "catalog.csv", None, tmp_path / "b", queries=converted / "queries.jsonl"
        )
    )
    assert searches.interactions.empty and len(searches.queries) == TRAIN_CLAIMS


@pytest.fixture(scope="module")
def search_bundle(converted: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A plain build from a query log given as interactions: every row is a search."""
    work = tmp_path_factory.mktemp("search-bundle")
    rows = [
        {"user_id": f"session-{n}", "item_id": item, "query": q["query"], "timestamp": n}
        for n, q in enumerate(read_jsonl(converted / "queries.jsonl"))
        for item in q["item_ids"]  # type: ignore[attr-defined]
    ]
    pd.DataFrame(rows).to_csv(work / "searches.csv", index=False)
    options = BuildOptions(
        converted / "catalog.csv",
        work / "searches.csv",
        work / "bundle",
        ranker=None,
        student=None,
        device="cpu",
    )
    return build_bundle(options)


def test_a_query_log_alone_builds_a_search_bundle_without_cf(
    search_bundle: Bundle, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = search_bundle.manifest
    assert manifest["counts"]["interactions"] == 0
    assert manifest["cf"]["users"] == 0 and manifest["cf"]["items"] == 0
    assert "search bundle" in manifest["cf"]["skipped"]
    # Search fusion was fitted on the held-out share of the logged searches, lexical included.
    query = manifest["fusion"]["query"]
    assert query["fitted_on"]["requests"] == "held-out queries"
    weights = dict(zip(query["first"]["features"], query["first"]["weights"], strict=True))
    assert weights["lexical"] != 0.0


def test_a_search_bundle_answers_searches_and_recommends_from_content(
    search_bundle: Bundle, converted: Path
) -> None:
    retriever = Retriever.load(search_bundle, state_dir=None, device="cpu")
    ranker = Ranker.load(search_bundle, Settings.built_in(device="cpu"))
    test = read_jsonl(converted / "test_queries.jsonl")
    claim = test[0]
    searched, recommended = gather_pools(
        [
            pool_request(20, query=str(claim["query"])),
            pool_request(20, history=[str(i) for i in claim["item_ids"]][:1]),  # type: ignore[index]
        ],
        retriever,
        ranker,
        PoolPolicy(),
    )
    assert searched.items and all(p.lexical_score is not None for p in searched.items)
    assert any(p.lexical_score for p in searched.items)
    # CF knows no one: the history's nearest items, with no degradation.
    assert recommended.items and recommended.recalled == 0 and not recommended.reasons
    assert all(p.retrieval_score is not None for p in recommended.items)
    retriever.close()
