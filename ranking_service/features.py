"""The signals ranking reads and the feature registry learned fusion is fitted on.

`StageScores` holds one request's scores per candidate and signal; each signal belongs to a
component (`GROUP` metadata), which is what the build gates and the ablation drops. `REGISTRY`
lists the learned fusion's columns (their names are `FEATURES`), generated into the feature
matrix by `features`. A new signal is a field here, its columns in `REGISTRY`, and the one
place that computes it (`ranking_service.ranker.Ranker.stage_scores`).

Stage scores live on unrelated scales (cross-encoder logits, ALS dot products, cosines), so each
is standardised within the request's candidate list. A missing score (cold item or user, or a
stage that did not run) is not zero-filled: the learned model sees it as 0 plus an explicit
"missing" indicator it learned a weight for.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np

GROUP = "group"  # a StageScores field's component
# The components learned from interactions: a product added after the build has none of them.
COLLABORATIVE = ("cf", "popularity", "item_item")


@dataclass(frozen=True)
class StageScores:
    """One request's scores per candidate and signal.

    None: the stage did not run for this request; NaN: it could not score that candidate.
    `cf` always has one entry per candidate (NaN where CF knows neither user nor item).
    """

    cf: np.ndarray = field(metadata={GROUP: "cf"})
    ce: np.ndarray | None = field(default=None, metadata={GROUP: "cross_encoder"})
    retrieval: np.ndarray | None = field(default=None, metadata={GROUP: "retrieval"})
    # BM25 of a search's text (retrieval's lexical index); None for recommendations.
    lexical: np.ndarray | None = field(default=None, metadata={GROUP: "lexical"})
    # CF's item prior (log interaction count).
    popularity: np.ndarray | None = field(default=None, metadata={GROUP: "popularity"})
    # CF from the most recent history items only: the user's current taste, next to `cf`'s
    # long-term one (from the user's trained vector or the whole history).
    cf_recent: np.ndarray | None = field(default=None, metadata={GROUP: "cf"})
    # The language model's view: embedding similarity to the history's nearest and most
    # recent items (ranking_service.content); None without a history the catalog knows.
    content_nearest: np.ndarray | None = field(default=None, metadata={GROUP: "content"})
    content_recent: np.ndarray | None = field(default=None, metadata={GROUP: "content"})
    # ... and the text sequence model's score of what follows the history
    # (ranking_service.text_sequence): order, read from the items' text.
    content_sequence: np.ndarray | None = field(default=None, metadata={GROUP: "content"})
    # Item-to-item CF from the history alone (ranking_service.item_item): EASE's weights summed
    # over the history, and how often candidates were had next to the most recent items.
    item_item: np.ndarray | None = field(default=None, metadata={GROUP: "item_item"})
    transitions: np.ndarray | None = field(default=None, metadata={GROUP: "item_item"})
    # Which kind of request: a search, or a recommendation from history or user.
    has_query: bool = False

    def __len__(self) -> int:
        return len(self.cf)

    def subset(self, rows: np.ndarray) -> StageScores:
        """The same request's scores for the candidates at `rows` only."""
        taken: dict[str, Any] = {
            name: None if v is None else v[rows] for name, v in self.signals().items()
        }
        return replace(self, **taken)

    def without(self, *groups: str) -> StageScores:
        """These scores with every signal of the named components missing."""
        dropped: dict[str, Any] = {}
        for f in _signal_fields():
            if f.metadata[GROUP] in groups:
                required = f.default is MISSING
                dropped[f.name] = np.full(len(self), np.nan, np.float32) if required else None
        return replace(self, **dropped)

    def as_new(self, rows: np.ndarray) -> StageScores:
        """These scores as they would be had the candidates at `rows` been added after the
        build: no collaborative score (missing), no interactions counted (the build fits how to
        rank new products on known ones treated so)."""
        changed: dict[str, Any] = {}
        for f in _signal_fields():
            values = getattr(self, f.name)
            if values is not None and f.metadata[GROUP] in COLLABORATIVE:
                values = values.copy()
                values[rows] = 0.0 if f.name == "popularity" else np.nan
                changed[f.name] = values
        return replace(self, **changed)

    def signals(self) -> dict[str, np.ndarray | None]:
        return {f.name: getattr(self, f.name) for f in _signal_fields()}

    def has(self, group: str) -> bool:
        """Whether any signal of the component is present."""
        return any(
            getattr(self, f.name) is not None
            for f in _signal_fields()
            if f.metadata[GROUP] == group
        )


def _signal_fields() -> list[Field[Any]]:
    """StageScores' fields that hold a signal (all but `has_query`)."""
    return [f for f in fields(StageScores) if GROUP in f.metadata]


@dataclass(frozen=True)
class Feature:
    """One column of the learned fusion: a signal's z-score, or whether it is missing."""

    name: str
    signal: str
    kind: Literal["z", "missing"] = "z"


# Only ever appended to: a fusion file fitted on fewer features still loads, the newest at
# weight 0 (ranking_service.fusion.LogisticFusion.from_dict).
REGISTRY = (
    Feature("ce", "ce"),
    Feature("cf", "cf"),
    Feature("retrieval", "retrieval"),
    Feature("cf_missing", "cf", "missing"),
    Feature("ce_missing", "ce", "missing"),
    Feature("retrieval_missing", "retrieval", "missing"),
    Feature("popularity", "popularity"),
    Feature("cf_recent", "cf_recent"),
    Feature("content_nearest", "content_nearest"),
    Feature("content_recent", "content_recent"),
    Feature("lexical", "lexical"),
    Feature("lexical_missing", "lexical", "missing"),
    Feature("item_item", "item_item"),
    Feature("item_item_missing", "item_item", "missing"),
    Feature("transitions", "transitions"),
    Feature("content_sequence", "content_sequence"),
)
FEATURES = tuple(f.name for f in REGISTRY)


def columns(*groups: str) -> list[int]:
    """Indices in FEATURES of the columns read from the named components' signals."""
    group = {f.name: f.metadata[GROUP] for f in _signal_fields()}
    return [i for i, f in enumerate(REGISTRY) if group[f.signal] in groups]


def normalise(scores: np.ndarray) -> np.ndarray:
    """Z-score over the request's candidates; NaN stays NaN; a constant list becomes 0.

    Cross-encoder logits, ALS dot products and cosines have unrelated, per-model and per-user
    scales, so only their order and spread within one request are comparable.
    """
    scores = np.asarray(scores, dtype=np.float64)
    present = ~np.isnan(scores)
    out = np.full(scores.shape, np.nan)
    if not present.any():
        return out
    values = scores[present]
    std = values.std()
    out[present] = (values - values.mean()) / std if std > 1e-12 else 0.0
    return out


def features(scores: StageScores, zeroed: Collection[str] = ()) -> np.ndarray:
    """One row per candidate, one column per FEATURES entry: each signal's z-score (0 where it
    is missing) or its missing indicator; the columns of the `zeroed` components are 0."""
    n = len(scores)
    z = {
        name: normalise(values) if values is not None else np.full(n, np.nan)
        for name, values in scores.signals().items()
    }
    matrix = np.column_stack(
        [
            np.isnan(z[f.signal]).astype(np.float64) if f.kind == "missing" else z[f.signal]
            for f in REGISTRY
        ]
    )
    matrix = np.nan_to_num(matrix, nan=0.0)
    if zeroed:
        matrix[:, columns(*zeroed)] = 0.0
    return matrix
