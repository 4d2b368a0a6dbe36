"""Content similarity of candidates to the request's history, from the bundle's item embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ranking_service.content import NEAREST_OF, RECENT_OF, ItemVectors
from ranking_service.features import FEATURES, columns
from ranking_service.fusion import (
    ContextFusion,
    ConvexFusion,
    LogisticFusion,
    TwoPassFusion,
    reads,
)
from ranking_service.ranker import Ranker
from recsys.core.bundle import Bundle
from recsys.core.domain import Candidate, HistoryItem, RankContext
from recsys.core.encoder import TextEncoder
from recsys.core.settings import Settings


def unit(*values: float) -> np.ndarray:
    v = np.array(values, np.float32)
    return v / np.linalg.norm(v)


def test_nearest_and_recent_similarities() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"i{k}" for k in range(12)]
    store = ItemVectors(ids, vectors)
    history = ids[2:10]  # most recent first
    scores = store.scores(["i0", "i1", "gone"], [*history, "unknown"])
    assert scores is not None
    sims = vectors[:2] @ vectors[2:10].T
    expected_nearest = np.sort(sims, axis=1)[:, -NEAREST_OF:].mean(axis=1)
    np.testing.assert_allclose(scores.nearest[:2], expected_nearest, rtol=1e-5)
    np.testing.assert_allclose(scores.recent[:2], sims[:, :RECENT_OF].mean(axis=1), rtol=1e-5)
    # A candidate the catalog lacks (added online) is unscored, not zero.
    assert np.isnan(scores.nearest[2]) and np.isnan(scores.recent[2])
    assert store.scores(["i0"], ["unknown"]) is None


def test_a_short_history_uses_what_there_is() -> None:
    store = ItemVectors(["a", "b", "c"], np.stack([unit(1, 0), unit(0, 1), unit(1, 1)]))
    scores = store.scores(["c", "b"], ["a"])
    assert scores is not None
    np.testing.assert_allclose(scores.nearest, [np.sqrt(0.5), 0.0], atol=1e-6)
    np.testing.assert_allclose(scores.recent, scores.nearest)
    with pytest.raises(ValueError, match="2 item ids for 3 vectors"):
        ItemVectors(["a", "b"], np.zeros((3, 2), np.float32))


class CountingEncoder:
    """The real encoder, counting the texts it is asked to embed."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.texts: list[str] = []

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        self.texts += texts
        return self.encoder.encode(texts, batch_size)


def test_items_the_catalog_lacks_are_embedded_from_their_text_once(
    encoder: TextEncoder,
) -> None:
    texts = ["Espresso machine with a steam wand", "Burr coffee grinder", "Garden hose, 25 m"]
    store = ItemVectors(["espresso", "hose"], encoder.encode([texts[0], texts[2]]))
    plain = store.scores(["grinder"], ["espresso"], {"grinder": texts[1]})
    assert plain is not None and np.isnan(plain.nearest[0])  # no encoder: unscored
    counting = CountingEncoder(encoder)
    reading = ItemVectors(["espresso", "hose"], encoder.encode([texts[0], texts[2]]), counting)  # type: ignore[arg-type]
    new_text = {"grinder": texts[1], "new-kettle": "Gooseneck kettle for pour-over coffee"}
    scores = reading.scores(["grinder", "hose"], ["espresso"], new_text)
    assert scores is not None
    grinder = encoder.encode([texts[1]])[0]
    # The new product is scored as if the build had embedded it: the same encoder, its text.
    np.testing.assert_allclose(
        scores.nearest[0], grinder @ encoder.encode([texts[0]])[0], rtol=1e-4
    )
    assert scores.nearest[0] > scores.nearest[1]  # coffee is nearer coffee than a hose
    # A new product in the history is read too; what was embedded is not embedded again.
    again = reading.scores(["hose"], ["new-kettle", "grinder"], new_text)
    assert again is not None and not np.isnan(again.nearest[0])
    assert sorted(counting.texts) == sorted([texts[1], new_text["new-kettle"]])
    # A changed text is read again; an item without text stays unscored.
    changed = reading.scores(["grinder", "no-text"], ["espresso"], {"grinder": "Tea kettle"})
    assert changed is not None and np.isnan(changed.nearest[1])
    assert changed.nearest[0] != pytest.approx(scores.nearest[0], abs=1e-3)
    assert counting.texts[-1] == "Tea kettle"


def test_the_ranker_scores_content_from_the_bundle_when_its_fusion_reads_it(
    sample_bundle_root: Path,
) -> None:
    bundle = Bundle.open(sample_bundle_root)
    served = Ranker.load(bundle, Settings.built_in(bundle=sample_bundle_root))
    # Serving computes content similarity only where the build gave it weight.
    assert (served.content is not None) == reads(served.fusion, "content")
    # ... with the bundle's encoder, for the products added after the build.
    assert served.content is None or served.content.encoder is not None
    ranker = Ranker(served.cf, served.fusion, None, {}, content=ItemVectors.load(bundle.path))
    catalog = pd.read_parquet(bundle.file("catalog.parquet"), columns=["item_id"])
    first, second = (str(i) for i in catalog["item_id"][:2])
    context = RankContext(history=(HistoryItem(first, ""),))
    stages, _ = ranker.stage_scores(context, [Candidate(first, ""), Candidate(second, "")])
    assert stages.content_nearest is not None and stages.content_recent is not None
    # An item is its own nearest neighbour.
    assert stages.content_nearest[0] == pytest.approx(1.0, abs=1e-5)
    assert stages.content_nearest[1] < stages.content_nearest[0]
    # The bundle's text sequence model scores what follows the history.
    assert stages.content_sequence is not None and not np.isnan(stages.content_sequence).any()
    # A product added after the build is read from the text the request carries.
    reading = Ranker(
        served.cf,
        served.fusion,
        None,
        {},
        content=ItemVectors.load(bundle.path, TextEncoder.of_bundle(bundle, "cpu")),
    )
    title = str(pd.read_parquet(bundle.file("catalog.parquet"))["title"].iloc[0])
    added = [Candidate("ADDED", title), Candidate("ADDED-ELSEWHERE", "Garden hose, 25 m")]
    new, _ = reading.stage_scores(context, added)
    assert new.content_nearest is not None and not np.isnan(new.content_nearest).any()
    assert new.content_sequence is not None and not np.isnan(new.content_sequence).any()
    assert new.content_nearest[0] > new.content_nearest[1]
    assert np.isnan(new.cf).all()  # CF never saw them
    # A search without history has no content scores.
    query, _ = ranker.stage_scores(RankContext(query="x"), [Candidate(first, "")])
    assert query.content_nearest is None and query.content_sequence is None


def test_fusion_reads_content_only_where_a_pass_weighs_it() -> None:
    weights = [0.5] * len(FEATURES)
    blind = [0.0 if i in columns("content") else 0.5 for i in range(len(FEATURES))]
    reading, ignoring = LogisticFusion(weights, 0.0), LogisticFusion(blind, 0.0)
    assert reads(reading, "content") and not reads(ignoring, "content")
    assert not reads(ConvexFusion(), "content")
    two_pass = TwoPassFusion(ignoring, reading, 10, cross_encoder_pays=False)
    assert reads(two_pass, "content")
    assert not reads(TwoPassFusion(ignoring, None, 0, False), "content")
    assert reads(ContextFusion(query=ConvexFusion(), history=two_pass), "content")
