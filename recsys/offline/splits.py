"""The protocol's splits: per-user temporal train/validation/test, and tag queries by md5."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

TEST_PER_USER = 10
VALIDATION_PER_USER = 10
RELEVANT_MIN_RATING = 4.0


@dataclass(frozen=True)
class Split:
    """Interactions split per user by time; each row lands in exactly one part."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    # The protocol's relevance rule: a held-out interaction is relevant when it weighs at least
    # this (MovieLens: rated 4 or more); None: every held-out interaction is (leave-one-out).
    relevant_min_weight: float | None = RELEVANT_MIN_RATING

    def seen(self) -> pd.DataFrame:
        """What the system may see at test time: train + validation."""
        return pd.concat([self.train, self.validation], ignore_index=True)


def temporal_split(
    interactions: pd.DataFrame,
    test_per_user: int = TEST_PER_USER,
    validation_per_user: int = VALIDATION_PER_USER,
) -> Split:
    """Per user, by timestamp: the last `test_per_user` rows are test, the ones before validation."""
    ordered = interactions.sort_values(["user_id", "timestamp"], kind="stable")
    # Position from the end within each user: 0 is the user's latest interaction.
    from_end = ordered.groupby("user_id", sort=False).cumcount(ascending=False)
    test = ordered[from_end < test_per_user]
    validation = ordered[
        (from_end >= test_per_user) & (from_end < test_per_user + validation_per_user)
    ]
    train = ordered[from_end >= test_per_user + validation_per_user]
    return Split(
        train=train.reset_index(drop=True),
        validation=validation.reset_index(drop=True),
        test=test.reset_index(drop=True),
    )


def relevant_items(
    part: pd.DataFrame, min_rating: float | None = RELEVANT_MIN_RATING
) -> dict[str, set[str]]:
    """Per user, the items rated at least `min_rating` (None: every one); users with none are
    left out (not scored)."""
    liked = part if min_rating is None else part[part["weight"] >= min_rating]
    return {str(user): set(group["item_id"]) for user, group in liked.groupby("user_id")}


def histories(seen: pd.DataFrame) -> dict[str, list[str]]:
    """Per user, the item ids they interacted with, most recent first."""
    ordered = seen.sort_values(["user_id", "timestamp"], ascending=[True, False], kind="stable")
    return {
        str(user): list(group["item_id"]) for user, group in ordered.groupby("user_id", sort=False)
    }


def hold_out_recent(interactions: pd.DataFrame, per_user: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out): per user, the most recent min(`per_user`, half) interactions are held
    out, so every user keeps at least as much history as is held out."""
    ordered = interactions.sort_values(["user_id", "timestamp"], kind="stable")
    from_end = ordered.groupby("user_id", sort=False).cumcount(ascending=False)
    size = ordered.groupby("user_id", sort=False)["item_id"].transform("size")
    held = from_end < np.minimum(per_user, size // 2)
    return ordered[~held].reset_index(drop=True), ordered[held].reset_index(drop=True)
