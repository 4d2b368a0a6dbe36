"""Held-out users: who is asked offline, with what visible history, and what counts as relevant.

The build fits fusion on them, the CF search and evaluation's baselines are tuned on them, and
the retrain gate scores both versions on them; `HeldOut.of` is the one way they are chosen.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from recsys.core.scoring import K, ndcg_of
from recsys.offline.splits import histories, relevant_items


class Recommends(Protocol):
    def recommend(self, history: Sequence[str], k: int, exclude: Collection[str]) -> list[str]: ...


@dataclass(frozen=True)
class HeldOut:
    """Per user, the visible history (most recent first) and the held-out items that are
    relevant; `relevant` holds only users with a history to answer from."""

    histories: dict[str, list[str]]
    relevant: dict[str, set[str]]

    @classmethod
    def of(cls, seen: pd.DataFrame, held: pd.DataFrame, min_weight: float | None = None) -> HeldOut:
        """Histories from `seen`, relevant items from `held`: those weighing at least
        `min_weight` (None: every one)."""
        visible = histories(seen)
        least = -np.inf if min_weight is None else min_weight
        relevant = {u: r for u, r in relevant_items(held, least).items() if visible.get(u)}
        return cls(visible, relevant)

    def users(self, seed: int | None = None, limit: int | None = None) -> list[str]:
        """The users in id order, or in an order shuffled by `seed`; at most `limit`."""
        users = sorted(self.relevant)
        if seed is not None:
            random.Random(seed).shuffle(users)
        return users if limit is None else users[:limit]

    def answers(self, model: Recommends) -> dict[str, list[str]]:
        """`model`'s top K for every user from their history, the history excluded."""
        return {
            user: model.recommend(self.histories[user], K, set(self.histories[user]))
            for user in sorted(self.relevant)
        }

    def ndcg(self, model: Recommends) -> float:
        """Mean NDCG@K of `model`'s answers."""
        answers = self.answers(model)
        return float(np.mean([ndcg_of(answers[u], items) for u, items in self.relevant.items()]))
