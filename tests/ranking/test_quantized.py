"""int8 cross-encoder: export, agreement with fp32, input order whatever the batching, bad dirs."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import spearmanr

from ranking_service.cross_encoder import CrossEncoderScorer, build_context
from ranking_service.quantized import (
    BACKEND,
    INFO_FILE,
    MODEL_XML,
    Int8CrossEncoderScorer,
    export_int8,
)
from recsys.core.domain import item_text
from recsys.core.errors import InvalidInput
from tests.ranking.conftest import DEPARTMENTS

MAX_LENGTH = 64

Pair = tuple[str, str]


def shop_lists(contexts_per_department: int, offset: int) -> list[list[Pair]]:
    """Candidate lists like PAIRS: a query and/or history context against every product."""
    items = [
        item_text(title, department)
        for department, (titles, _) in DEPARTMENTS.items()
        for title in titles
    ]
    lists = []
    for department, (titles, queries) in DEPARTMENTS.items():
        for k in range(contexts_per_department):
            j = k + offset
            history = [item_text(titles[(j + i) % len(titles)], department) for i in range(2)]
            query = queries[j % len(queries)] if j % 3 else ""
            lists.append([(build_context(query, history), item) for item in items])
    return lists


@pytest.fixture(scope="module")
def exported(cross_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("int8") / "cross_encoder_int8"
    calibration = [p for pairs in shop_lists(2, offset=3) for p in pairs]
    section = export_int8(cross_encoder_dir, out, MAX_LENGTH, calibration_pairs=calibration)
    return {"dir": out, "section": section}


@pytest.fixture(scope="module")
def scorer(exported: dict[str, Any]) -> Int8CrossEncoderScorer:
    return Int8CrossEncoderScorer.load(exported["dir"], max_length=MAX_LENGTH, threads=2)


def test_export_writes_the_model_tokenizer_and_manifest(exported: dict[str, Any]) -> None:
    out, section = exported["dir"], exported["section"]
    assert section["backend"] == BACKEND == "openvino"
    assert section["max_length"] == MAX_LENGTH and section["calibration_pairs"] > 0
    assert {MODEL_XML, "model_int8.bin", INFO_FILE, "tokenizer.json"} <= set(section["files"])
    assert all((out / name).is_file() for name in section["files"])
    assert {"openvino", "nncf", "torch", "transformers"} <= set(section["versions"])
    assert section["seconds"] >= 0
    assert json.loads((out / INFO_FILE).read_text()) == section


def test_int8_logits_track_fp32(cross_encoder_dir: Path, scorer: Int8CrossEncoderScorer) -> None:
    reference = CrossEncoderScorer.load(cross_encoder_dir, device="cpu", max_length=MAX_LENGTH)
    assert scorer.device == "cpu" and scorer.name == "cross_encoder_int8"
    assert scorer.max_length == MAX_LENGTH
    lists = shop_lists(1, offset=0)  # other contexts than the calibration ones
    rhos = []
    for pairs in lists:
        expected, got = reference.score(pairs), scorer.score(pairs)
        assert got.dtype == np.float32 and got.shape == (len(pairs),)
        spread = expected.max() - expected.min()
        assert np.abs(got - expected).max() < 0.25 * spread
        rhos.append(spearmanr(got, expected)[0])
    assert np.mean(rhos) > 0.95, rhos


@pytest.mark.parametrize(
    ("batch_size", "max_batch_tokens"), [(64, 1), (2, 100), (7, 4096), (64, 1 << 20)]
)
def test_input_order_is_kept_whatever_the_batching(
    scorer: Int8CrossEncoderScorer, batch_size: int, max_batch_tokens: int
) -> None:
    pairs = shop_lists(1, offset=1)[0][:12]
    one_by_one = np.array([scorer.score([pair])[0] for pair in pairs])
    got = scorer.score(pairs, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    np.testing.assert_allclose(got, one_by_one, atol=1e-4)
    np.testing.assert_allclose(scorer.score(pairs[::-1])[::-1], one_by_one, atol=1e-4)
    assert scorer.score([]).shape == (0,)


def test_scoring_from_two_threads_at_once(scorer: Int8CrossEncoderScorer) -> None:
    pairs = [p for pairs in shop_lists(1, offset=2)[:2] for p in pairs]
    expected = scorer.score(pairs, batch_size=8)
    results: list[np.ndarray] = []

    def work() -> None:
        for _ in range(3):
            results.append(scorer.score(pairs, batch_size=8))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    for got in results:
        np.testing.assert_array_equal(got, expected)


def test_without_calibration_only_weights_are_quantized(
    cross_encoder_dir: Path, tmp_path: Path
) -> None:
    section = export_int8(cross_encoder_dir, tmp_path / "weights", MAX_LENGTH)
    assert section["calibration_pairs"] == 0 and "weights" in section["quantization"]
    pairs = shop_lists(1, offset=0)[0]
    reference = CrossEncoderScorer.load(cross_encoder_dir, device="cpu", max_length=MAX_LENGTH)
    got = Int8CrossEncoderScorer.load(tmp_path / "weights", MAX_LENGTH, threads=1).score(pairs)
    assert spearmanr(got, reference.score(pairs))[0] > 0.95


def test_not_an_int8_model_is_an_input_error(tmp_path: Path, cross_encoder_dir: Path) -> None:
    with pytest.raises(InvalidInput, match=str(tmp_path)) as info:
        Int8CrossEncoderScorer.load(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / MODEL_XML).write_text("<net><broken")
    with pytest.raises(InvalidInput, match=str(tmp_path)) as info:
        Int8CrossEncoderScorer.load(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidInput, match="nowhere"):
        Int8CrossEncoderScorer.load(tmp_path / "nowhere")
    # A PyTorch cross-encoder directory is not an int8 one.
    with pytest.raises(InvalidInput, match=MODEL_XML):
        Int8CrossEncoderScorer.load(cross_encoder_dir)
    with pytest.raises(InvalidInput, match="nowhere"):
        export_int8(tmp_path / "nowhere", tmp_path / "out", MAX_LENGTH)
