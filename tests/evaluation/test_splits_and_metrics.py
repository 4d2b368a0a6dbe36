"""The protocol's splits and metric plumbing on small hand-made data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from recsys.app.evaluation.metrics import (
    accuracy,
    bootstrap,
    coverage,
    paired_bootstrap_ratio,
    per_query_ndcg,
)
from recsys.offline.splits import histories, relevant_items, temporal_split


def interactions(users: int = 3, per_user: int = 25) -> pd.DataFrame:
    rows = []
    for u in range(users):
        for t in range(per_user):
            # Timestamps deliberately out of file order to prove the split sorts by time.
            ts = (t * 7919) % per_user
            rows.append(
                {
                    "user_id": f"u{u}",
                    "item_id": f"i{u}-{ts}",
                    "timestamp": ts,
                    "weight": 4.0 if ts % 2 else 3.0,
                    "query": "",
                }
            )
    return pd.DataFrame(rows)


def test_temporal_split_takes_last_ten_as_test_and_ten_before_as_validation() -> None:
    split = temporal_split(interactions())
    for user in ("u0", "u1", "u2"):
        train = split.train[split.train.user_id == user].timestamp
        val = split.validation[split.validation.user_id == user].timestamp
        test = split.test[split.test.user_id == user].timestamp
        assert sorted(test) == list(range(15, 25))
        assert sorted(val) == list(range(5, 15))
        assert sorted(train) == list(range(0, 5))
        # No leakage: everything in train precedes validation, which precedes test.
        assert train.max() < val.min() and val.max() < test.min()
    total = len(split.train) + len(split.validation) + len(split.test)
    assert total == len(interactions())


def test_short_histories_go_to_test_first() -> None:
    split = temporal_split(interactions(users=1, per_user=12))
    assert len(split.test) == 10 and len(split.validation) == 2 and split.train.empty


def test_relevant_items_keep_ratings_of_four_and_up_and_drop_users_without_any() -> None:
    part = pd.DataFrame(
        {"user_id": ["a", "a", "b"], "item_id": ["x", "y", "z"], "weight": [4.0, 3.5, 2.0]}
    )
    assert relevant_items(part) == {"a": {"x"}}


def test_histories_are_most_recent_first() -> None:
    seen = pd.DataFrame(
        {"user_id": ["a", "a", "a"], "item_id": ["old", "new", "mid"], "timestamp": [1, 3, 2]}
    )
    assert histories(seen) == {"a": ["new", "mid", "old"]}


def test_accuracy_matches_hand_computed_values() -> None:
    relevant = {"q1": {"a"}, "q2": {"b", "c"}, "q3": {"z"}}
    answers = {"q1": ["a", "x"], "q2": ["x", "b", "y", "c"], "q3": []}
    scores = accuracy(relevant, answers)
    ndcg_q2 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert scores["ndcg@10"] == pytest.approx((1.0 + ndcg_q2 + 0.0) / 3)
    assert scores["recall@10"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert scores["mrr@10"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_coverage_counts_distinct_items_in_top_ten() -> None:
    assert coverage({"a": ["x", "y"], "b": ["y", "z"]}, catalog_size=10) == pytest.approx(0.3)


def test_per_query_ndcg_averages_to_rank_s_ndcg() -> None:
    relevant = {"q1": {"a"}, "q2": {"b", "c"}, "q3": {"z"}}
    answers = {"q1": ["a", "x"], "q2": ["x", "b", "y", "c"], "q3": []}
    values = per_query_ndcg(relevant, answers)
    assert values[0] == pytest.approx(1.0) and values[2] == 0.0
    assert values.mean() == pytest.approx(accuracy(relevant, answers)["ndcg@10"])


def test_paired_bootstrap_of_a_constant_ratio_is_that_ratio() -> None:
    """Each user's score doubled: every resample's ratio is exactly 2."""
    base = np.random.default_rng(1).uniform(0.1, 1.0, 200)
    ratio = paired_bootstrap_ratio(2 * base, base, draws=300)
    assert ratio["ratio"] == pytest.approx(2.0)
    assert ratio["low"] == pytest.approx(2.0) and ratio["high"] == pytest.approx(2.0)


def test_paired_bootstrap_interval_matches_the_normal_approximation() -> None:
    """A difference of means is what the ratio's spread follows when the denominator is
    constant: 1 + mean(d) with d ~ N(0.1, 1), n = 400, so 95% is 1.1 ± 1.96 / 20."""
    n = 400
    noise = np.random.default_rng(2).standard_normal(n)
    noise = (noise - noise.mean()) / noise.std()  # exactly mean 0, sd 1
    ratio = paired_bootstrap_ratio(1.1 + noise, np.ones(n), draws=4000, seed=3)
    assert ratio["ratio"] == pytest.approx(1.1)
    assert ratio["low"] == pytest.approx(1.1 - 1.96 / 20, abs=0.01)
    assert ratio["high"] == pytest.approx(1.1 + 1.96 / 20, abs=0.01)


def test_paired_bootstrap_refuses_unpaired_scores() -> None:
    with pytest.raises(ValueError, match="must be equal"):
        paired_bootstrap_ratio(np.ones(3), np.ones(4))


def test_bootstrap_pairs_a_sampled_method_with_full_over_its_sample_only() -> None:
    relevant = {f"u{i}": {"hit"} for i in range(6)}
    full = {u: ["hit"] for u in relevant}  # NDCG 1 for everyone
    # `sampled` answered u0..u2 only, better than `cf` did everyone (5 of 6 right).
    runs = {
        "cf": {u: ["hit"] if u != "u5" else ["miss"] for u in relevant},
        "sampled": {"u0": ["hit"], "u1": ["hit"], "u2": ["miss", "hit"]},
        "full": full,
    }
    out = bootstrap(relevant, runs, {"sampled": {"u0", "u1", "u2"}})
    # Over its 3 users, not over 6 with three unanswered.
    mean = (1.0 + 1.0 + 1 / math.log2(3)) / 3
    assert out["full / each"]["sampled"]["ratio"] == pytest.approx(1.0 / mean)
    assert out["full / each"]["cf"]["ratio"] == pytest.approx(6 / 5)
    # The best other is chosen among the methods that answered everyone.
    assert out["best_other"] == "cf"
