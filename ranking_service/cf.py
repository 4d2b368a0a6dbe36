"""Implicit-feedback ALS (the `implicit` library) with exact fold-in for users unseen at training."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys.core.bundle import CF_ITEMS
from recsys.core.errors import InvalidInput

log = logging.getLogger(__name__)

# What an interaction contributes to ALS's confidence: its weight (summed per user and item),
# or 1 for every item a user interacted with, whatever the weights ("binary").
Weighting = Literal["weight", "binary"]
WEIGHTINGS: tuple[Weighting, ...] = ("weight", "binary")


@dataclass(frozen=True)
class ALSParams:
    """ALS's hyper-parameters (CFModel.train's keywords besides the seed)."""

    factors: int = 64
    iterations: int = 15
    regularization: float = 0.05
    alpha: float = 2.0
    weighting: Weighting = "weight"

    @classmethod
    def of(cls, section: Mapping[str, Any]) -> ALSParams:
        """The values a manifest's `cf` section (CFModel.save's) records; bundles from before
        `weighting` was recorded trained with weights."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in names})

    def kwargs(self) -> dict[str, Any]:
        """CFModel.train's keywords."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _checked_weighting(weighting: str) -> Weighting:
    if weighting not in WEIGHTINGS:
        raise InvalidInput(f"CF weighting {weighting!r}: must be one of {', '.join(WEIGHTINGS)}")
    return cast(Weighting, weighting)


@dataclass
class CFModel:
    """User and item factors with their id maps; confidence = alpha × summed interaction weight
    (alpha × 1 per item the user interacted with, for `binary` weighting)."""

    user_ids: list[str]
    item_ids: list[str]
    user_factors: np.ndarray
    item_factors: np.ndarray
    regularization: float
    alpha: float
    iterations: int
    # Who interacted with what at training (users x items, CSR); None in older bundles.
    user_items: sp.csr_matrix | None = None
    weighting: Weighting = "weight"

    def __post_init__(self) -> None:
        self.weighting = _checked_weighting(self.weighting)
        self._user_row = {u: i for i, u in enumerate(self.user_ids)}
        self._item_row = {it: i for i, it in enumerate(self.item_ids)}
        # Shared by every fold-in: YᵀY is the same for all users.
        self._gram = self.item_factors.T.astype(np.float64) @ self.item_factors.astype(np.float64)
        # Distinct users per item: the popularity prior.
        self._item_counts = (
            None if self.user_items is None else np.diff(self.user_items.tocsc().indptr)
        )

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def factors(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def params(self) -> ALSParams:
        return ALSParams(
            self.factors, self.iterations, self.regularization, self.alpha, self.weighting
        )

    @classmethod
    def train(
        cls,
        interactions: pd.DataFrame,
        factors: int = 64,
        iterations: int = 15,
        regularization: float = 0.05,
        alpha: float = 2.0,
        weighting: Weighting = "weight",
        seed: int = 0,
    ) -> CFModel:
        """Fits ALS on the (user, item) matrix of summed weights (1 per pair, for `binary`
        weighting); on a GPU when implicit has CUDA."""
        weighting = _checked_weighting(weighting)
        if interactions.empty:
            log.info("CF: no interactions to train on; it knows no user and no item")
            return cls.empty(factors, iterations, regularization, alpha, weighting)
        grouped = (
            interactions.groupby(["user_id", "item_id"], sort=True)["weight"].sum().reset_index()
        )
        if weighting == "binary":
            grouped["weight"] = 1.0
        user_ids = sorted(grouped["user_id"].unique().tolist())
        item_ids = sorted(grouped["item_id"].unique().tolist())
        rows = pd.Categorical(grouped["user_id"], categories=user_ids).codes
        cols = pd.Categorical(grouped["item_id"], categories=item_ids).codes
        matrix = sp.csr_matrix(
            (grouped["weight"].to_numpy(np.float32), (rows, cols)),
            shape=(len(user_ids), len(item_ids)),
        )
        if matrix.nnz and matrix.data.min() <= 0:
            # implicit reads a non-positive confidence as a negative preference; we never mean that.
            raise InvalidInput("interactions: summed weight per (user, item) must be > 0 for CF")
        user_factors, item_factors = _fit_als(
            matrix, factors, iterations, regularization, alpha, seed
        )
        log.info(
            "ALS: %d users x %d items, %d factors, %d iterations, regularization %g, alpha %g, "
            "%s weighting",
            len(user_ids),
            len(item_ids),
            factors,
            iterations,
            regularization,
            alpha,
            weighting,
        )
        return cls(
            user_ids=[str(u) for u in user_ids],
            item_ids=[str(i) for i in item_ids],
            user_factors=user_factors,
            item_factors=item_factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            user_items=(matrix > 0).astype(np.int8).tocsr(),
            weighting=weighting,
        )

    @classmethod
    def empty(
        cls,
        factors: int = 64,
        iterations: int = 15,
        regularization: float = 0.05,
        alpha: float = 2.0,
        weighting: Weighting = "weight",
    ) -> CFModel:
        """CF of a search bundle (no user interactions): it scores nothing, recalls nothing and
        folds no one in, so ranking reads the other signals and recommendations come from
        content."""
        return cls(
            user_ids=[],
            item_ids=[],
            user_factors=np.zeros((0, factors), np.float32),
            item_factors=np.zeros((0, factors), np.float32),
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            user_items=sp.csr_matrix((0, 0), dtype=np.int8),
            weighting=weighting,
        )

    def save(self, out_dir: Path) -> dict[str, Any]:
        """Writes factors, id maps and parameters; returns the manifest section."""
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / "user_factors.npy", self.user_factors)
        np.save(out_dir / "item_factors.npy", self.item_factors)
        if self.user_items is not None:
            sp.save_npz(out_dir / "user_items.npz", self.user_items)
        (out_dir / "users.json").write_text(json.dumps(self.user_ids))
        (out_dir / CF_ITEMS).write_text(json.dumps(self.item_ids))
        params = {
            "factors": self.factors,
            "iterations": self.iterations,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "weighting": self.weighting,
        }
        (out_dir / "params.json").write_text(json.dumps(params))
        return {**params, "users": self.n_users, "items": self.n_items}

    @classmethod
    def load(cls, in_dir: Path) -> CFModel:
        params = json.loads((in_dir / "params.json").read_text())
        user_items = in_dir / "user_items.npz"
        return cls(
            user_ids=json.loads((in_dir / "users.json").read_text()),
            item_ids=json.loads((in_dir / CF_ITEMS).read_text()),
            user_factors=np.load(in_dir / "user_factors.npy"),
            item_factors=np.load(in_dir / "item_factors.npy"),
            regularization=params["regularization"],
            alpha=params["alpha"],
            iterations=params["iterations"],
            user_items=sp.load_npz(user_items).tocsr() if user_items.is_file() else None,
            # Bundles from before it was recorded trained with weights.
            weighting=params.get("weighting", "weight"),
        )

    def user_vector(self, user_id: str) -> np.ndarray | None:
        """The trained vector of a known user (a copy), None for a user unseen at training."""
        row = self._user_row.get(user_id)
        return None if row is None else self.user_factors[row].copy()

    def items_of(self, user_id: str) -> list[str]:
        """The items a known user interacted with at training (empty when unknown)."""
        row = self._user_row.get(user_id)
        if row is None or self.user_items is None:
            return []
        start, end = self.user_items.indptr[row], self.user_items.indptr[row + 1]
        return [self.item_ids[i] for i in self.user_items.indices[start:end]]

    def fold_in(
        self, item_ids: Sequence[str], weights: Sequence[float] | None = None
    ) -> np.ndarray | None:
        """The ALS solution for a new user from their items (None when CF knows none of them).

        Solves (YᵀY + Σ (c−1) y yᵀ + λI) x = Σ c y with c = alpha × weight, as one ALS user step.
        Repeated items sum their weights, as training does; with `binary` weighting, as there,
        weights are ignored and every item counts once (c = alpha).
        """
        if weights is not None and len(weights) != len(item_ids):
            raise InvalidInput(
                f"fold_in: {len(weights)} weights for {len(item_ids)} items (must match)"
            )
        confidence: dict[int, float] = {}
        for k, item_id in enumerate(item_ids):
            row = self._item_row.get(item_id)
            if row is not None:
                if self.weighting == "binary":
                    confidence[row] = self.alpha
                    continue
                w = 1.0 if weights is None else float(weights[k])
                confidence[row] = confidence.get(row, 0.0) + self.alpha * w
        if not confidence:
            return None
        rows = np.fromiter(confidence, dtype=np.int64)
        c = np.fromiter(confidence.values(), dtype=np.float64)
        y = self.item_factors[rows].astype(np.float64)
        a = self._gram + (y.T * (c - 1.0)) @ y + self.regularization * np.eye(self.factors)
        b = y.T @ c
        return np.linalg.solve(a, b).astype(np.float32)

    def scores(self, user_vector: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """Dot products with the items' factors; NaN for items CF never saw."""
        out = np.full(len(item_ids), np.nan, np.float32)
        pairs = [(k, self._item_row.get(i)) for k, i in enumerate(item_ids)]
        known = [(k, r) for k, r in pairs if r is not None]
        if known:
            positions, rows = zip(*known, strict=True)
            out[list(positions)] = self.item_factors[list(rows)] @ user_vector
        return out

    def popularity(self, item_ids: Sequence[str]) -> np.ndarray | None:
        """log(1 + users who interacted) per item, 0 for items CF never saw; None if unknown
        (also when CF knows no item at all)."""
        if self._item_counts is None or not self.n_items:
            return None
        rows = [self._item_row.get(i) for i in item_ids]
        counts = np.array([0 if r is None else self._item_counts[r] for r in rows], np.float64)
        return np.log1p(counts)

    def recommend(
        self, user_vector: np.ndarray, k: int, exclude: Collection[str] = ()
    ) -> list[tuple[str, float]]:
        """Top-k items by CF score, skipping `exclude`."""
        scores = self.item_factors @ user_vector
        order = np.argsort(-scores, kind="stable")
        out: list[tuple[str, float]] = []
        for row in order:
            item_id = self.item_ids[row]
            if item_id not in exclude:
                out.append((item_id, float(scores[row])))
                if len(out) == k:
                    break
        return out


def _fit_als(
    matrix: sp.csr_matrix,
    factors: int,
    iterations: int,
    regularization: float,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs implicit's ALS (GPU build when CUDA is usable) and returns float32 CPU factors."""
    import implicit.gpu

    params: dict[str, Any] = {
        "factors": factors,
        "regularization": regularization,
        "alpha": alpha,
        "iterations": iterations,
        "random_state": seed,
    }
    if implicit.gpu.HAS_CUDA:
        from implicit.gpu.als import AlternatingLeastSquares as GpuALS

        gpu_model = GpuALS(**params)
        gpu_model.fit(matrix, show_progress=False)
        model = gpu_model.to_cpu()
    else:
        from implicit.cpu.als import AlternatingLeastSquares as CpuALS

        # implicit parallelises over users itself; a BLAS thread pool inside that only contends.
        with threadpool_limits(1, "blas"):
            model = CpuALS(**params, num_threads=0)
            model.fit(matrix, show_progress=False)
    return (
        np.ascontiguousarray(model.user_factors, np.float32),
        np.ascontiguousarray(model.item_factors, np.float32),
    )
