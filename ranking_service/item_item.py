"""Item-to-item collaborative scores: EASE's item weights and what is bought next to what.

Two views of "users who had this had that", both scored from a request's history alone (so a
user unseen at training is answered as well as a known one, with no fold-in):
- `weights`: EASE (Steck 2019), the closed-form item-item regression B = I − P·diag(1/diag P),
  P = (XᵀX + λI)⁻¹ over binary interactions; a candidate scores the sum of B over the history;
- `transitions`: how often two items were had within TRANSITION_WINDOW steps of each other in
  users' sequences (in time order, each step further weighing TRANSITION_DECAY less); a
  candidate scores it against the RECENT most recent history items (the order signal).

Both keep only each item's NEIGHBOURS largest weights (sparse: the memory and the per-request
work grow with the catalog, not its square), and EASE covers the MAX_ITEMS items with the most
users (its fit inverts an items × items matrix); other items have no score (NaN), as CF's
cold items have none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys.core.errors import InvalidInput

log = logging.getLogger(__name__)

# Weights kept per item; on Amazon Scientific's validation users EASE pruned to 50 or 100
# scored as the dense matrix (docs/architecture.md, "Item-to-item").
NEIGHBOURS = 100
MAX_ITEMS = 10_000
TRANSITION_WINDOW = 3
TRANSITION_DECAY = 0.5
# Most recent history items the transitions are read from, each older one weighing
# TRANSITION_DECAY less.
RECENT = 3
# EASE's regularisation where the build has too few validation users to choose it.
DEFAULT_LAMBDA = 200.0
WEIGHTS_FILE = "item_item_weights.npz"
TRANSITIONS_FILE = "item_item_transitions.npz"
ITEMS_FILE = "item_item.json"


@dataclass(frozen=True)
class ItemItemScores:
    """Per candidate; NaN where the model does not know the candidate."""

    weights: np.ndarray
    transitions: np.ndarray


@dataclass
class ItemItem:
    """EASE weights and sequence transitions over one item id map (rows: the history item)."""

    item_ids: list[str]
    weights: sp.csr_matrix
    transitions: sp.csr_matrix
    lam: float
    _row: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._row = {item_id: row for row, item_id in enumerate(self.item_ids)}

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def train(
        cls,
        interactions: pd.DataFrame,
        lam: float,
        neighbours: int = NEIGHBOURS,
        max_items: int = MAX_ITEMS,
    ) -> ItemItem | None:
        """Both views from the interactions (None without any); `timestamp` orders each user's
        sequence."""
        if lam <= 0:
            raise InvalidInput(f"item-to-item lambda {lam}: must be > 0")
        if interactions.empty:
            return None
        users = interactions["user_id"].astype(str)
        items = interactions["item_id"].astype(str)
        counts = pd.Series(users.values, index=items.values).groupby(level=0).nunique()
        # Most users first, ties by id: the same items whatever the row order.
        ranked = counts.sort_index().sort_values(ascending=False, kind="stable").index[:max_items]
        item_ids = sorted(str(i) for i in ranked)
        column = {item_id: c for c, item_id in enumerate(item_ids)}
        kept = items.map(column)
        known = kept.notna().to_numpy()
        user_codes, _ = pd.factorize(users[known])
        matrix = sp.csr_matrix(
            (np.ones(int(known.sum()), np.float32), (user_codes, kept[known].astype(int))),
            shape=(int(user_codes.max()) + 1, len(item_ids)),
        )
        matrix.data[:] = 1.0  # binary: repeated interactions count once
        weights = _pruned(ease_weights(matrix, lam), neighbours)
        transitions = _pruned_rows(_transitions(interactions[known], column), neighbours)
        log.info(
            "item-to-item: %d items, EASE lambda %g, %d weights and %d transitions kept",
            len(item_ids),
            lam,
            weights.nnz,
            transitions.nnz,
        )
        return cls(item_ids, weights, transitions, lam)

    def save(self, out_dir: Path) -> dict[str, Any]:
        """Writes both matrices and the id map; returns the manifest's record."""
        sp.save_npz(out_dir / WEIGHTS_FILE, self.weights)
        sp.save_npz(out_dir / TRANSITIONS_FILE, self.transitions)
        (out_dir / ITEMS_FILE).write_text(json.dumps({"lambda": self.lam, "items": self.item_ids}))
        return {"lambda": self.lam, "items": self.n_items, "neighbours": NEIGHBOURS}

    @classmethod
    def load(cls, in_dir: Path) -> ItemItem | None:
        """The model a bundle's CF directory holds; None where it has none (older bundles, or
        builds whose validation found it does not pay)."""
        if not (in_dir / ITEMS_FILE).is_file():
            return None
        record = json.loads((in_dir / ITEMS_FILE).read_text())
        return cls(
            [str(i) for i in record["items"]],
            sp.load_npz(in_dir / WEIGHTS_FILE).tocsr(),
            sp.load_npz(in_dir / TRANSITIONS_FILE).tocsr(),
            float(record["lambda"]),
        )

    def scores(self, history: Sequence[str], candidates: Sequence[str]) -> ItemItemScores | None:
        """Both views' score of each candidate from `history` (most recent first); None when
        the model knows no history item."""
        vectors = self._history_vectors(history)
        if vectors is None:
            return None
        whole, recent = vectors
        columns = [self._row.get(c) for c in candidates]
        known = [k for k, c in enumerate(columns) if c is not None]
        rows = [c for c in columns if c is not None]
        out = ItemItemScores(
            np.full(len(candidates), np.nan, np.float32),
            np.full(len(candidates), np.nan, np.float32),
        )
        if known:
            out.weights[known] = whole[rows]
            out.transitions[known] = recent[rows]
        return out

    def recommend(
        self, history: Sequence[str], k: int, exclude: Collection[str] = ()
    ) -> list[list[tuple[str, float]]]:
        """Each view's top k from `history`, skipping it and `exclude` (empty lists when the
        model knows no history item)."""
        vectors = self._history_vectors(history)
        if vectors is None:
            return []
        skip = {*exclude, *history}
        return [_top(self.item_ids, scores, k, skip) for scores in vectors]

    def _history_vectors(self, history: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """(sum of the weights over the history, decayed transitions from its most recent
        items), dense over the model's items; None when the model knows no history item."""
        rows = [self._row.get(h) for h in history]
        if all(r is None for r in rows):
            return None
        whole = np.zeros(self.n_items, np.float32)
        for row in {r for r in rows if r is not None}:
            _add_row(whole, self.weights, row, 1.0)
        recent = np.zeros(self.n_items, np.float32)
        for age, past in enumerate(rows[:RECENT]):
            if past is not None:
                _add_row(recent, self.transitions, past, TRANSITION_DECAY**age)
        return whole, recent


def ease_weights(matrix: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE's dense B (zero diagonal) for a binary users × items matrix."""
    gram = (matrix.T @ matrix).toarray().astype(np.float32)
    gram[np.diag_indices_from(gram)] += lam
    p = _spd_inverse(gram)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


def _spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix through its Cholesky factor
    (LAPACK potrf/potri in float32: a third of a general inverse's work, at half the cost of
    float64; this inverse is EASE's whole fit)."""
    from scipy.linalg import lapack

    factor, info = lapack.spotrf(matrix, lower=False, overwrite_a=True)
    if info != 0:
        raise ValueError(f"EASE: Gram matrix + lambda I is not positive definite (potrf {info})")
    inverse, info = lapack.spotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise ValueError(f"EASE: inverse failed (potri {info})")
    upper = np.triu(inverse)
    return upper + np.triu(upper, 1).T


def _transitions(interactions: pd.DataFrame, column: dict[str, int]) -> sp.csr_matrix:
    """Symmetric counts of two items had within TRANSITION_WINDOW steps of each other in a
    user's time-ordered sequence, each step further weighing TRANSITION_DECAY less."""
    ordered = interactions.sort_values(["user_id", "timestamp"], kind="stable")
    codes = ordered["item_id"].astype(str).map(column).to_numpy(np.int64)
    user_codes, _ = pd.factorize(ordered["user_id"].astype(str))
    rows, cols, values = [], [], []
    for step in range(1, TRANSITION_WINDOW + 1):
        same_user = user_codes[step:] == user_codes[:-step]
        a, b = codes[:-step][same_user], codes[step:][same_user]
        different = a != b
        a, b = a[different], b[different]
        weight = np.full(len(a), TRANSITION_DECAY ** (step - 1), np.float32)
        rows += [a, b]
        cols += [b, a]
        values += [weight, weight]
    n = len(column)
    if not rows:
        return sp.csr_matrix((n, n), dtype=np.float32)
    return sp.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )


def _pruned(dense: np.ndarray, neighbours: int) -> sp.csr_matrix:
    """Each row's `neighbours` largest entries (zeros dropped) as a sparse matrix."""
    n = dense.shape[1]
    if neighbours < n:
        drop = np.argpartition(-dense, neighbours, axis=1)[:, neighbours:]
        dense = dense.copy()
        np.put_along_axis(dense, drop, 0.0, axis=1)
    out = sp.csr_matrix(dense.astype(np.float32))
    out.eliminate_zeros()
    return out


def _pruned_rows(matrix: sp.csr_matrix, neighbours: int) -> sp.csr_matrix:
    """Each row's `neighbours` largest entries of a sparse matrix."""
    matrix = matrix.tocsr()
    matrix.sum_duplicates()
    keep = np.zeros(matrix.nnz, bool)
    for row in range(matrix.shape[0]):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        if end - start <= neighbours:
            keep[start:end] = True
        else:
            keep[start + np.argpartition(-matrix.data[start:end], neighbours)[:neighbours]] = True
    out = matrix.copy()
    out.data[~keep] = 0.0
    out.eliminate_zeros()
    return out


def _add_row(out: np.ndarray, matrix: sp.csr_matrix, row: int, scale: float) -> None:
    start, end = matrix.indptr[row], matrix.indptr[row + 1]
    out[matrix.indices[start:end]] += scale * matrix.data[start:end]


def _top(
    item_ids: Sequence[str], scores: np.ndarray, k: int, skip: Collection[str]
) -> list[tuple[str, float]]:
    """The k best-scored items with a positive score, not in `skip`, best first (ties in id
    order)."""
    positive = np.flatnonzero(scores > 0)
    out: list[tuple[str, float]] = []
    for row in positive[np.argsort(-scores[positive], kind="stable")]:
        if len(out) == k:
            break
        if item_ids[row] not in skip:
            out.append((item_ids[row], float(scores[row])))
    return out


def refitted(cf_section: Mapping[str, Any], interactions: pd.DataFrame) -> ItemItem | None:
    """The item-to-item model a bundle's manifest (its `cf` section) records, refitted on other
    interactions with the same lambda; None where the bundle has none."""
    lam = cf_section.get("item_item", {}).get("lambda")
    return None if lam is None else ItemItem.train(interactions, float(lam))
