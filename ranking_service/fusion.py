"""Fusion of stage scores into one: the convex default and a learned logistic model.

Stage scores live on unrelated scales (cross-encoder logits, ALS dot products, cosines), so each
is standardised within the request's candidate list before fusion. A missing score (cold item or
user, or a stage that did not run) is not zero-filled: convex fusion re-weights over the parts
present; the learned model sees it as 0 plus an explicit "missing" indicator it learned a weight for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from recsys.errors import InvalidInput


class Fusion(Protocol):
    kind: str

    def fuse(
        self, ce: np.ndarray | None, cf: np.ndarray, retrieval: np.ndarray | None
    ) -> np.ndarray:
        """One fused score per candidate; cf uses NaN for missing, ce/retrieval None when absent."""
        ...

    def to_dict(self) -> dict[str, Any]: ...


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

    def fuse(
        self, ce: np.ndarray | None, cf: np.ndarray, retrieval: np.ndarray | None
    ) -> np.ndarray:
        n = len(cf)
        z_ret = normalise(retrieval) if retrieval is not None else np.full(n, np.nan)
        z_ce = normalise(ce) if ce is not None else z_ret
        z_cf = normalise(cf)
        if np.isnan(z_cf).all() and ce is not None:
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


FEATURES = ("ce", "cf", "retrieval", "cf_missing", "ce_missing")


def features(ce: np.ndarray | None, cf: np.ndarray, retrieval: np.ndarray | None) -> np.ndarray:
    """Per-candidate [z_ce, z_cf, z_retrieval, cf_missing, ce_missing]; missing z's are 0."""
    n = len(cf)
    columns = []
    for scores in (ce, cf, retrieval):
        z = normalise(scores) if scores is not None else np.full(n, np.nan)
        columns.append(z)
    cf_missing = np.isnan(columns[1]).astype(np.float64)
    ce_missing = np.isnan(columns[0]).astype(np.float64)
    matrix = np.column_stack([*columns, cf_missing, ce_missing])
    return np.nan_to_num(matrix, nan=0.0)


@dataclass
class LogisticFusion:
    """A logistic regression over `features`, fitted on a validation split."""

    weights: list[float]
    bias: float
    fitted_on: dict[str, Any] = field(default_factory=dict)
    kind: str = field(default="logistic", init=False)

    def fuse(
        self, ce: np.ndarray | None, cf: np.ndarray, retrieval: np.ndarray | None
    ) -> np.ndarray:
        logits = features(ce, cf, retrieval) @ np.asarray(self.weights) + self.bias
        return logits.astype(np.float32)

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 500, **meta: Any
    ) -> LogisticFusion:
        """L2-regularised logistic regression by Newton's method (five features: tiny and exact)."""
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
        return cls(weights=[float(v) for v in w[:-1]], bias=float(w[-1]), fitted_on=meta)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "features": list(FEATURES), **asdict(self)}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> LogisticFusion:
        if spec.get("features", list(FEATURES)) != list(FEATURES):
            raise ValueError(f"features {spec['features']} differ from {list(FEATURES)}")
        return cls(
            weights=[float(w) for w in spec["weights"]],
            bias=float(spec["bias"]),
            fitted_on=spec.get("fitted_on", {}),
        )


# kind → reader of its to_dict(); a new fusion model registers here and save/load just work.
FUSION_KINDS: dict[str, Callable[[dict[str, Any]], Fusion]] = {
    "convex": ConvexFusion.from_dict,
    "logistic": LogisticFusion.from_dict,
}


def save_fusion(fusion: Fusion, path: Path) -> None:
    """Writes fusion.json: {"kind": ..., plus the kind's own parameters}."""
    path.write_text(json.dumps(fusion.to_dict(), indent=2, sort_keys=True) + "\n")


def load_fusion(path: Path) -> Fusion:
    """Reads fusion.json; an unreadable file or unknown kind is an InvalidInput naming the file."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path}: unreadable fusion file ({exc})") from None
    kind = spec.get("kind") if isinstance(spec, dict) else None
    reader = FUSION_KINDS.get(str(kind))
    if reader is None:
        known = ", ".join(sorted(FUSION_KINDS))
        raise InvalidInput(f"{path}: unknown fusion kind {kind!r} (expected one of: {known})")
    try:
        return reader(spec)
    except (KeyError, TypeError, ValueError, InvalidInput) as exc:
        raise InvalidInput(f"{path}: invalid {kind} fusion ({exc})") from None
