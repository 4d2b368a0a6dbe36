"""Fusion of stage scores into one: the convex default, a learned logistic model over the
feature registry (ranking_service.features), two passes (a cheap first fusion over the pool, the
cross-encoder and a second fusion over its head: the parameters of ranking_service.plan), and a
pair of fusions chosen by request kind (search or recommendation); saved as fusion.json.

Each stage's scores are standardised within the request's candidate list before fusion. A missing
score is not zero-filled: convex fusion re-weights over the parts present; the learned model sees
it as 0 plus an explicit "missing" indicator it learned a weight for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ranking_service import plan
from ranking_service.features import FEATURES, StageScores, columns, features, normalise
from recsys.core.errors import InvalidInput


class Fusion(Protocol):
    kind: str

    def fuse(self, scores: StageScores) -> np.ndarray:
        """One fused score per candidate."""
        ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class ConvexFusion:
    """alpha × z(ce) + (1 − alpha) × z(cf); per item, weights re-normalise over the parts present.

    Retrieval stands in for a stage that scored nothing: for the cross-encoder when it did not run
    (so a query still counts), for CF when it knows neither the user nor any candidate.
    """

    alpha: float = 0.7
    kind: str = field(default="convex", init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidInput(f"convex fusion alpha {self.alpha}: must be within [0, 1]")

    def fuse(self, scores: StageScores) -> np.ndarray:
        n = len(scores.cf)
        z_ret = normalise(scores.retrieval) if scores.retrieval is not None else np.full(n, np.nan)
        z_ce = normalise(scores.ce) if scores.ce is not None else z_ret
        z_cf = normalise(scores.cf)
        if np.isnan(z_cf).all() and scores.ce is not None:
            z_cf = z_ret
        total = np.zeros(n)
        weight = np.zeros(n)
        for w, z in ((self.alpha, z_ce), (1.0 - self.alpha, z_cf)):
            present = ~np.isnan(z)
            total[present] += w * z[present]
            weight[present] += w
        fused = np.divide(total, weight, out=np.zeros(n), where=weight > 0)
        # Items no part scored (or only a zero-weight part) fall back to retrieval's order.
        unscored = weight == 0
        fused[unscored] = np.nan_to_num(z_ret[unscored])
        return fused.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "alpha": self.alpha}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> ConvexFusion:
        return cls(alpha=float(spec.get("alpha", 0.7)))


@dataclass
class LogisticFusion:
    """A logistic regression over `features`, fitted on a validation split."""

    weights: list[float]
    bias: float
    fitted_on: dict[str, Any] = field(default_factory=dict)
    kind: str = field(default="logistic", init=False)

    def fuse(self, scores: StageScores) -> np.ndarray:
        logits = features(scores) @ np.asarray(self.weights) + self.bias
        return logits.astype(np.float32)

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 500, **meta: Any
    ) -> LogisticFusion:
        """L2-regularised logistic regression by Newton's method (ten features: tiny and exact)."""
        design = np.column_stack([x, np.ones(len(x))])
        w = np.zeros(design.shape[1])
        penalty = l2 * np.eye(design.shape[1])
        penalty[-1, -1] = 0.0  # the bias is not shrunk
        # Positives are rare in a candidate list: weight them up so both classes count equally.
        pos = max(float(y.sum()), 1.0)
        sample_w = np.where(y > 0, len(y) / (2 * pos), len(y) / (2 * max(len(y) - pos, 1.0)))
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-(design @ w)))
            grad = design.T @ (sample_w * (p - y)) + penalty @ w
            hess = (design * (sample_w * p * (1 - p))[:, None]).T @ design + penalty
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        # A column constant over every row (a dropped signal's missing indicator) cannot change
        # an order; its weight is 0 exactly, so `reads` does not count it as read.
        if len(x):
            w[:-1][np.ptp(x, axis=0) == 0] = 0.0
        return cls(weights=[float(v) for v in w[:-1]], bias=float(w[-1]), fitted_on=meta)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "features": list(FEATURES), **asdict(self)}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> LogisticFusion:
        names = list(spec.get("features", FEATURES))
        # Features are only ever appended: an older file lacks the newest, which weigh 0.
        if names != list(FEATURES[: len(names)]) or len(spec["weights"]) != len(names):
            raise ValueError(f"features {names} are not a prefix of {list(FEATURES)}")
        weights = [float(w) for w in spec["weights"]]
        return cls(
            weights=weights + [0.0] * (len(FEATURES) - len(weights)),
            bias=float(spec["bias"]),
            fitted_on=spec.get("fitted_on", {}),
        )


# A single-pass fusion (older bundles) reranks every candidate with the cross-encoder.
RERANK_ALL = 1_000_000


@dataclass
class TwoPassFusion:
    """`first` ranks the whole pool without the cross-encoder; the cross-encoder scores the
    first pass's top `rerank_depth` and `second` orders those.

    `cross_encoder_pays` is False where the second pass did not raise validation NDCG for this
    request kind: serving then answers with the first pass alone. `second` is None when the
    bundle has no cross-encoder.
    """

    first: Fusion
    second: Fusion | None
    rerank_depth: int
    cross_encoder_pays: bool
    fitted_on: dict[str, Any] = field(default_factory=dict)
    kind: str = field(default="two_pass", init=False)

    def fuse(self, scores: StageScores) -> np.ndarray:
        """Both passes when `scores.ce` covers every candidate and the cross-encoder pays."""
        ce = scores.ce
        if ce is None:
            return plan.first_pass(self, scores, can_rerank=False).scores
        return plan.rank(self, scores, True, lambda rows: ce[rows])[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "first": self.first.to_dict(),
            "second": None if self.second is None else self.second.to_dict(),
            "rerank_depth": self.rerank_depth,
            "cross_encoder_pays": self.cross_encoder_pays,
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> TwoPassFusion:
        depth = int(spec["rerank_depth"])
        if depth < 0:
            raise ValueError(f"rerank_depth {depth}: must be >= 0")
        return cls(
            first=_read(spec["first"]),
            second=None if spec.get("second") is None else _read(spec["second"]),
            rerank_depth=depth,
            cross_encoder_pays=bool(spec["cross_encoder_pays"]),
            fitted_on=spec.get("fitted_on", {}),
        )

    @classmethod
    def single_pass(cls, fusion: Fusion) -> TwoPassFusion:
        """An older one-fusion bundle: the cross-encoder scores every candidate."""
        return cls(first=fusion, second=fusion, rerank_depth=RERANK_ALL, cross_encoder_pays=True)


@dataclass
class ContextFusion:
    """One fusion for searches (requests with a query), another for recommendations.

    The signals weigh differently in the two (CF knows nothing of a query; retrieval of a
    history is a weaker cue than of a query), and within one request a shared weight cannot
    adapt: every feature that tells the kinds apart is constant across the candidates.
    """

    query: Fusion
    history: Fusion
    kind: str = field(default="by_context", init=False)

    def fuse(self, scores: StageScores) -> np.ndarray:
        return self.pick(scores.has_query).fuse(scores)

    def pick(self, has_query: bool) -> Fusion:
        return self.query if has_query else self.history

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "query": self.query.to_dict(), "history": self.history.to_dict()}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> ContextFusion:
        return cls(query=_read(spec["query"]), history=_read(spec["history"]))


# kind → reader of its to_dict(); a new fusion model registers here and save/load just work.
FUSION_KINDS: dict[str, Callable[[dict[str, Any]], Fusion]] = {
    "convex": ConvexFusion.from_dict,
    "logistic": LogisticFusion.from_dict,
    "by_context": ContextFusion.from_dict,
    "two_pass": TwoPassFusion.from_dict,
}


def plan_for(fusion: Fusion, has_query: bool) -> TwoPassFusion:
    """The two passes that rank one kind of request (search when `has_query`)."""
    if isinstance(fusion, ContextFusion):
        fusion = fusion.pick(has_query)
    return fusion if isinstance(fusion, TwoPassFusion) else TwoPassFusion.single_pass(fusion)


def reads(fusion: Fusion, group: str) -> bool:
    """Whether any pass of `fusion` gives weight to a feature of the component `group`
    (serving skips computing what no pass reads)."""
    if isinstance(fusion, LogisticFusion):
        return any(fusion.weights[i] != 0.0 for i in columns(group))
    if isinstance(fusion, TwoPassFusion):
        second = fusion.second is not None and reads(fusion.second, group)
        return reads(fusion.first, group) or second
    if isinstance(fusion, ContextFusion):
        return reads(fusion.query, group) or reads(fusion.history, group)
    return False  # convex: the cross-encoder, CF and retrieval only


def _read(spec: Any) -> Fusion:
    kind = spec.get("kind") if isinstance(spec, dict) else None
    reader = FUSION_KINDS.get(str(kind))
    if reader is None:
        known = ", ".join(sorted(FUSION_KINDS))
        raise InvalidInput(f"unknown fusion kind {kind!r} (expected one of: {known})")
    return reader(spec)


def save_fusion(fusion: Fusion, path: Path) -> None:
    """Writes fusion.json: {"kind": ..., plus the kind's own parameters}."""
    path.write_text(json.dumps(fusion.to_dict(), indent=2, sort_keys=True) + "\n")


def load_fusion(path: Path) -> Fusion:
    """Reads fusion.json; an unreadable file or unknown kind is an InvalidInput naming the file."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path}: unreadable fusion file ({exc})") from None
    try:
        return _read(spec)
    except (KeyError, TypeError, ValueError, InvalidInput) as exc:
        raise InvalidInput(f"{path}: invalid fusion ({exc})") from None
