"""The tuned baselines on small hand-made logs whose right answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys.app.evaluation.baselines import (
    EASE,
    Grids,
    ItemKNN,
    ItemText,
    SASRec,
    SASRecConfig,
    TextNeighbours,
    tuned_baselines,
)
from recsys.offline.cf_search import CFRecent
from recsys.offline.splits import temporal_split

CF_PARAMS = {"factors": 8, "iterations": 5, "regularization": 0.05, "alpha": 2.0}


def log(rows: list[tuple[str, str]]) -> pd.DataFrame:
    """(user, item) rows in time order per user, rated 5."""
    return pd.DataFrame(
        [
            {"user_id": u, "item_id": i, "timestamp": t, "weight": 5.0, "query": ""}
            for t, (u, i) in enumerate(rows)
        ]
    )


def co_occurring() -> pd.DataFrame:
    """a and b always go together, as do x and y; every user has one pair, plus noise item n."""
    rows = []
    for u in range(30):
        pair = ("a", "b") if u % 2 else ("x", "y")
        rows += [(f"u{u}", pair[0]), (f"u{u}", pair[1]), (f"u{u}", "n")]
    return log(rows)


@pytest.mark.parametrize("model", [EASE(1.0), ItemKNN(neighbours=5, shrink=0.0)])
def test_item_models_recommend_the_partner_item_and_never_the_history(
    model: EASE | ItemKNN,
) -> None:
    model.fit(co_occurring())
    assert model.recommend(["a"], 1, set()) == ["b"]
    assert model.recommend(["y"], 1, set()) == ["x"]
    answer = model.recommend(["a", "n"], 3, {"x"})
    assert "a" not in answer and "n" not in answer and "x" not in answer
    assert model.recommend(["unknown"], 3, set()) == []


def test_cf_recent_folds_in_only_the_recent_window() -> None:
    model = CFRecent(window=1, cf_params=CF_PARAMS)
    model.fit(co_occurring())
    # Most recent first: only "x" is read, so its partner wins over a's.
    assert model.recommend(["x", "a"], 1, set()) == ["y"]


def test_sasrec_learns_a_fixed_order() -> None:
    """Every user watches the same ten items in the same order: the next one is predictable."""
    items = [f"i{k}" for k in range(10)]
    rows = [(f"u{u}", item) for u in range(40) for item in items]
    model = SASRec(SASRecConfig(dim=16, max_len=8, negatives=8, max_epochs=30, lr=1e-2), 30)
    model.fit(log(rows))
    # History most recent first: after i0..i3 comes i4.
    assert model.recommend(["i3", "i2", "i1", "i0"], 1, set()) == ["i4"]
    assert "i3" not in model.recommend(["i3"], 9, set())


def test_tuning_picks_the_best_validation_row_and_records_it() -> None:
    rows = []
    for u in range(30):
        pair = ("a", "b") if u % 2 else ("x", "y")
        rows += [(f"u{u}", f"p{u}-{t}") for t in range(3)] + [(f"u{u}", pair[0])]
        rows += [(f"u{u}", pair[1])] + [(f"u{u}", f"q{u}-{t}") for t in range(10)]
    split = temporal_split(log(rows), test_per_user=10, validation_per_user=1)
    grids = Grids(
        windows=(1, 2),
        lambdas=(1.0, 10.0),
        neighbours=(5,),
        shrinks=(0.0,),
        sasrec=SASRecConfig(dim=8, max_len=4, negatives=4, max_epochs=2, eval_every=1),
    )
    models, record = tuned_baselines(split, CF_PARAMS, grids)
    assert set(models) == {"cf_recent", "ease", "itemknn", "sasrec"}
    for name in models:
        entry = record[name]
        best = max(row["ndcg@10"] for row in entry["validation"])
        assert entry["chosen"]["ndcg@10"] == best
        assert entry["refit_seconds"] >= 0
    assert [row["epochs"] for row in record["sasrec"]["validation"]] == [1, 2]
    assert record["validation_users"] == 30


def test_text_neighbours_follow_the_recent_history_and_fade_older_items() -> None:
    """Unit vectors on two axes: a, a2 point one way, b, b2 the other, c between them."""
    s = np.sqrt(0.5)
    vectors = np.array(
        [[1, 0], [0.96, 0.28], [0, 1], [0.28, 0.96], [s, s]], np.float32
    )  # a, a2, b, b2, c
    text = ItemText(["a", "a2", "b", "b2", "c"], vectors)
    # Window 1 reads the most recent item alone: a's neighbour a2 first.
    assert TextNeighbours(text, 1, 1.0).recommend(["a", "b"], 2, set()) == ["a2", "c"]
    # Window 2 with a steep fade still leans to the most recent item ...
    assert TextNeighbours(text, 2, 0.1).recommend(["b", "a"], 1, set()) == ["b2"]
    # ... and history, `exclude` and unknown items never come back.
    model = TextNeighbours(text, 3, 1.0)
    assert model.recommend(["b", "unknown"], 5, {"c"}) == ["b2", "a2", "a"]
    assert model.recommend(["unknown"], 5, set()) == []
    model.fit(log([("u", "a")]))  # no interactions are read: the same answer
    assert model.recommend(["b"], 1, set()) == ["b2"]
