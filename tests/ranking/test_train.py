"""Cross-encoder fine-tuning on a small shop: mining, a loadable model, and a validation gain."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ranking_service.cross_encoder import CrossEncoderScorer
from ranking_service.train import (
    Example,
    NegativesFn,
    RankerTrainConfig,
    hard_negatives,
    item_texts,
    mine_examples,
    train_cross_encoder,
    training_sample,
)
from recsys.core.errors import InvalidInput
from recsys.offline.fitting import hold_out_queries
from tests.ranking.conftest import EmbeddingRetrieval

POOL = 31  # candidates proposed per example, as a small serving pool would


def by_context(retrieval: EmbeddingRetrieval) -> NegativesFn:
    """Negatives from the examples' context texts alone."""
    return lambda examples: retrieval([e.context for e in examples], POOL)


@pytest.fixture(scope="module")
def trained(
    base_model_dir: Path,
    shop_catalog: pd.DataFrame,
    shop_interactions: pd.DataFrame,
    shop_retrieval: EmbeddingRetrieval,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("ce") / "cross_encoder"
    config = RankerTrainConfig(
        steps=12,
        batch_size=8,
        learning_rate=1e-4,
        max_length=48,
        validation_users=16,
        validation_candidates=8,
        device="cpu",
    )
    section = train_cross_encoder(
        base_model_dir,
        shop_catalog,
        shop_interactions,
        by_context(shop_retrieval),
        out,
        config,
        train_queries=[("coffee beans", ["D1I3"]), ("kids toys", ["D4I0", "D4I1"])],
    )
    return out, section


def test_mining_follows_time_and_holds_out_last_items(
    shop_catalog: pd.DataFrame, shop_interactions: pd.DataFrame
) -> None:
    train, validation = mine_examples(shop_catalog, shop_interactions, 10, random.Random(0))
    assert len(validation) == 10
    # A user's first interaction only becomes an example when it came with a query.
    first = shop_interactions.sort_values("timestamp").groupby("user_id").head(1)
    queried_firsts = int((first["query"] != "").sum())
    assert len(train) + len(validation) == len(shop_interactions) - len(first) + queried_firsts
    assert all(e.context for e in train)
    assert all(e.positive in e.known for e in [*train, *validation])
    assert not {(e.context, e.positive) for e in validation} <= {
        (e.context, e.positive) for e in train
    }


def test_fine_tune_writes_a_loadable_model_and_manifest(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    out, section = trained
    assert (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    assert 1 <= section["steps"] <= 12
    assert section["pairs"] > 0 and section["train_seconds"] > 0
    assert section["plan"]["budget_seconds"] == RankerTrainConfig().seconds
    assert section["plan"]["step_seconds"] > 0
    assert section["validation"]["examples"] == 16
    scorer = CrossEncoderScorer.load(out, device="cpu")
    scores = scorer.score([("espresso", "Burr coffee grinder. Coffee"), ("tent", "Chef knife")])
    assert scores.shape == (2,) and np.isfinite(scores).all()


def test_fine_tuning_takes_the_steps_its_time_budget_leaves(
    base_model_dir: Path,
    shop_catalog: pd.DataFrame,
    shop_interactions: pd.DataFrame,
    shop_retrieval: EmbeddingRetrieval,
    tmp_path: Path,
) -> None:
    # Spent before the first step: one step, so that a model still comes out.
    config = RankerTrainConfig(
        steps=12, batch_size=8, max_length=48, validation_users=8, seconds=1e-3, device="cpu"
    )
    out = tmp_path / "cross_encoder"
    section = train_cross_encoder(
        base_model_dir, shop_catalog, shop_interactions, by_context(shop_retrieval), out, config
    )
    assert section["steps"] == 1 and section["max_steps"] == 12
    assert (out / "config.json").is_file()


def test_fine_tune_learns_the_shop(trained: tuple[Path, dict[str, Any]]) -> None:
    validation = trained[1]["validation"]
    before, after = validation["before"], validation["after"]
    assert set(before) == set(after) == {"mrr@10", "ndcg@10"}
    assert after["ndcg@10"] > before["ndcg@10"] + 0.05
    assert after["mrr@10"] > before["mrr@10"]


def test_nothing_to_learn_is_an_input_error(
    base_model_dir: Path,
    shop_catalog: pd.DataFrame,
    shop_retrieval: EmbeddingRetrieval,
    tmp_path: Path,
) -> None:
    # One interaction per user and no queries: no context precedes any item.
    lonely = pd.DataFrame(
        {
            "user_id": ["a", "b"],
            "item_id": ["D0I0", "D1I0"],
            "timestamp": [1, 2],
            "weight": np.ones(2, np.float32),
            "query": ["", ""],
        }
    )
    with pytest.raises(InvalidInput, match="no \\(context, item\\) pairs"):
        train_cross_encoder(
            base_model_dir,
            shop_catalog,
            lonely,
            by_context(shop_retrieval),
            tmp_path / "ce",
            RankerTrainConfig(steps=2, device="cpu"),
        )


def test_queries_get_their_share_of_the_training_contexts(
    shop_catalog: pd.DataFrame, shop_interactions: pd.DataFrame
) -> None:
    train, _ = mine_examples(shop_catalog, shop_interactions, 10, random.Random(0))
    ids = list(shop_catalog["item_id"])
    queries = [(f"query {i}", ids[3 * i : 3 * i + 3]) for i in range(10)]
    config = RankerTrainConfig(steps=5, batch_size=8, query_share=0.5)
    sample = training_sample(train, queries, config, item_texts(shop_catalog), random.Random(0))
    assert len(sample) == 40
    assert sum(e.context.startswith("query ") for e in sample) == 20
    with pytest.raises(InvalidInput, match="query_share"):
        RankerTrainConfig(query_share=1.5)


def test_negatives_skip_the_positive_and_owned_items() -> None:
    example = Example("context", "pos", frozenset({"pos", "owned"}), ("h1", "h2"))

    def proposed(examples: Sequence[Example]) -> list[list[str]]:
        assert [e.history for e in examples] == [("h1", "h2")]
        return [["r1", "pos", "r2", "owned", "r3", "c1", "c2"]]

    allowed = {"r1", "r2", "r3", "c1", "c2"}
    (negatives,) = hard_negatives([example], proposed, 10, random.Random(0), allowed)
    assert sorted(negatives) == sorted(allowed)
    (few,) = hard_negatives([example], proposed, 2, random.Random(0), allowed)
    assert len(few) == 2 and set(few) <= allowed


def test_fusion_queries_are_held_out_of_fine_tuning() -> None:
    queries = [(f"tag {i}", ["x"]) for i in range(20)]
    tune, held = hold_out_queries(queries, seed=0)
    assert len(held) == 6 and len(tune) == 14
    assert not {q for q, _ in tune} & {q for q, _ in held}
    assert hold_out_queries(list(reversed(queries)), seed=0) == (tune, held)
