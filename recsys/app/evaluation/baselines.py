"""Strong recommendation baselines (short-term CF, EASE, item-kNN, SASRec, text-only nearest
neighbours), each tuned on the protocol's validation split only and then refitted on train +
validation for test.

Every baseline has `fit(interactions)` and `recommend(history, k, exclude)`; `history` is the
user's item ids most recent first, as the recommend protocol hands them out.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ranking_service.item_item import ease_weights
from recsys.core import bundle as bundle_files
from recsys.core.scoring import K
from recsys.offline.cf_search import CFRecent
from recsys.offline.heldout import HeldOut
from recsys.offline.splits import Split

log = logging.getLogger(__name__)

NAMES = ("cf_recent", "ease", "itemknn", "sasrec", "text_knn")


class Baseline(Protocol):
    def fit(self, interactions: pd.DataFrame) -> None: ...

    def recommend(self, history: Sequence[str], k: int, exclude: Collection[str]) -> list[str]: ...


@dataclass
class ItemMatrix:
    """The binary users × items matrix of some interactions, with the item id map."""

    item_ids: list[str]
    matrix: sp.csr_matrix
    row_of: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.row_of = {item: i for i, item in enumerate(self.item_ids)}

    @classmethod
    def of(cls, interactions: pd.DataFrame) -> ItemMatrix:
        pairs = interactions[["user_id", "item_id"]].drop_duplicates()
        users = sorted(pairs["user_id"].astype(str).unique())
        items = sorted(pairs["item_id"].astype(str).unique())
        rows = pd.Categorical(pairs["user_id"].astype(str), categories=users).codes
        cols = pd.Categorical(pairs["item_id"].astype(str), categories=items).codes
        data = np.ones(len(pairs), np.float32)
        matrix = sp.csr_matrix((data, (rows, cols)), shape=(len(users), len(items)))
        return cls(items, matrix)

    def rows(self, item_ids: Iterator[str] | Sequence[str]) -> list[int]:
        """Known items' columns, each once."""
        return sorted({r for r in (self.row_of.get(i) for i in item_ids) if r is not None})

    def top(self, scores: np.ndarray, k: int, exclude: Collection[str]) -> list[str]:
        """The k best-scored items not in `exclude` (best first, ties in id order)."""
        scores = np.asarray(scores, np.float64).copy()
        scores[self.rows(list(exclude))] = -np.inf
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.item_ids[i] for i in order if np.isfinite(scores[i])]


class EASE:
    """EASE (Steck 2019) over binary interactions, dense (ranking_service.item_item serves it
    pruned)."""

    def __init__(self, lam: float) -> None:
        self.lam = lam

    def fit(self, interactions: pd.DataFrame) -> None:
        self.items = ItemMatrix.of(interactions)
        self.b = ease_weights(self.items.matrix, self.lam)

    def recommend(self, history: Sequence[str], k: int, exclude: Collection[str]) -> list[str]:
        rows = self.items.rows(history)
        if not rows:
            return []
        return self.items.top(self.b[rows].sum(axis=0), k, {*exclude, *history})


class ItemKNN:
    """Item-kNN: cosine similarity of items' user sets with shrinkage, n_i·n_j / (√n_i √n_j +
    shrink), each history item voting for its `neighbours` most similar items."""

    def __init__(self, neighbours: int, shrink: float) -> None:
        self.neighbours = neighbours
        self.shrink = shrink

    def fit(self, interactions: pd.DataFrame) -> None:
        self.items = ItemMatrix.of(interactions)
        x = self.items.matrix
        co = (x.T @ x).toarray().astype(np.float32)
        norms = np.sqrt(np.diag(co).copy())
        sim = co / (np.outer(norms, norms) + self.shrink + 1e-9)
        np.fill_diagonal(sim, 0.0)
        keep = min(self.neighbours, sim.shape[1])
        # Each row keeps its `neighbours` largest similarities (chunked: argpartition is big).
        for start in range(0, sim.shape[0], 1024):
            block = sim[start : start + 1024]
            if keep < block.shape[1]:
                cut = np.argpartition(-block, keep, axis=1)[:, keep:]
                np.put_along_axis(block, cut, 0.0, axis=1)
        self.sim = sim

    def recommend(self, history: Sequence[str], k: int, exclude: Collection[str]) -> list[str]:
        rows = self.items.rows(history)
        if not rows:
            return []
        return self.items.top(self.sim[rows].sum(axis=0), k, {*exclude, *history})


@dataclass(frozen=True)
class ItemText:
    """Every catalog item's unit-length text embedding (the bundle's encoder, the vectors
    retrieval serves), row i for item_ids[i]."""

    item_ids: list[str]
    vectors: np.ndarray

    @classmethod
    def of_bundle(cls, version_dir: Path) -> ItemText:
        catalog = pd.read_parquet(version_dir / bundle_files.CATALOG, columns=["item_id"])
        vectors = np.load(version_dir / bundle_files.EMBEDDINGS)
        return cls([str(i) for i in catalog["item_id"]], np.asarray(vectors, np.float32))


class TextNeighbours:
    """Text only: the catalog items whose embeddings are nearest (cosine) to the user's last
    `window` history items, item j back weighing decay**j (the most recent weighs 1). Reads no
    interactions, so it ranks every product, also those no one has bought yet."""

    def __init__(self, text: ItemText, window: int, decay: float) -> None:
        self.text = text
        self.window = window
        self.decay = decay
        self.row_of = {item: i for i, item in enumerate(text.item_ids)}

    def fit(self, interactions: pd.DataFrame) -> None:
        """Nothing to learn from interactions: the embeddings are the whole model."""

    def recommend(self, history: Sequence[str], k: int, exclude: Collection[str]) -> list[str]:
        known = [
            (age, self.row_of[item])
            for age, item in enumerate(history[: self.window])
            if item in self.row_of
        ]
        if not known:
            return []
        weights = np.array([self.decay**age for age, _ in known], np.float32)
        profile = weights @ self.text.vectors[[row for _, row in known]]
        scores = (self.text.vectors @ profile).astype(np.float64)
        banned = [self.row_of[i] for i in {*exclude, *history} if i in self.row_of]
        scores[banned] = -np.inf
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.text.item_ids[i] for i in order if np.isfinite(scores[i])]


@dataclass(frozen=True)
class SASRecConfig:
    """A small SASRec (Kang & McAuley 2018) trained with sampled softmax cross-entropy."""

    dim: int = 64
    blocks: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    batch_size: int = 64
    negatives: int = 512
    lr: float = 5e-3
    # Validation NDCG still rose past 60 epochs where measured (docs/architecture.md, "Why
    # these thresholds"): the search runs to 120 so the baseline is not undertrained.
    max_epochs: int = 120
    eval_every: int = 10
    seed: int = 0
    threads: int = 1


class SASRec:
    """Self-attentive next-item model over item ids, trained on users' chronological sequences
    (windows of `max_len` + 1 items); `epochs` is chosen on validation."""

    def __init__(self, config: SASRecConfig, epochs: int | None = None) -> None:
        self.config = config
        self.epochs = config.max_epochs if epochs is None else epochs

    def fit(self, interactions: pd.DataFrame) -> None:
        for _ in self.train_epochs(interactions, self.epochs):
            pass

    def train_epochs(self, interactions: pd.DataFrame, epochs: int) -> Iterator[int]:
        """Trains for `epochs`, yielding the number done after each (callers evaluate between)."""
        import torch

        cfg = self.config
        torch.manual_seed(cfg.seed)
        # Small matrices: more threads than one mostly spin against each other on a shared CPU
        # (8x slower per step with 2 threads on the busy 2-core evaluation machine).
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            yield from self._train(interactions, epochs)
        finally:
            torch.set_num_threads(threads)

    def _train(self, interactions: pd.DataFrame, epochs: int) -> Iterator[int]:
        import torch

        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        self.items = ItemMatrix.of(interactions)
        ordered = interactions.sort_values(["user_id", "timestamp"], kind="stable")
        sequences = [
            [self.items.row_of[str(i)] + 1 for i in group["item_id"]]
            for _, group in ordered.groupby("user_id", sort=True)
        ]
        windows = _windows(sequences, cfg.max_len)
        self.net = _sasrec_net(len(self.items.item_ids), cfg)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        n_items = len(self.items.item_ids)
        generator = torch.Generator().manual_seed(cfg.seed)
        for epoch in range(1, epochs + 1):
            self.net.train()
            order = rng.permutation(len(windows))
            for start in range(0, len(order), cfg.batch_size):
                batch = torch.from_numpy(windows[order[start : start + cfg.batch_size]])
                loss = self._loss(batch, n_items, cfg.negatives, generator)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            yield epoch

    def _loss(self, batch: Any, n_items: int, negatives: int, generator: Any) -> Any:
        """Sampled softmax over the next item and `negatives` items drawn uniformly, shared by
        the batch (a full softmax over every item's logits dominated each CPU step); a negative
        that is the target itself is masked out."""
        import torch

        inputs, targets = batch[:, :-1], batch[:, 1:]
        hidden = self.net(inputs)  # (B, L, d)
        real = targets > 0
        hidden, targets = hidden[real], targets[real]  # (N, d), (N,)
        sampled = torch.randint(1, n_items + 1, (negatives,), generator=generator)
        weight = self.net.item.weight
        positive = (hidden * weight[targets]).sum(-1, keepdim=True)
        negative = hidden @ weight[sampled].T
        negative = negative.masked_fill(sampled[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([positive, negative], dim=1)
        return torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))

    def recommend(self, history: Sequence[str], k: int, exclude: Collection[str]) -> list[str]:
        import torch

        known = [self.items.row_of[i] + 1 for i in history if i in self.items.row_of]
        if not known:
            return []
        # History is most recent first; the model reads time order, ending at the newest.
        seq = known[: self.config.max_len][::-1]
        padded = np.zeros((1, self.config.max_len), np.int64)
        padded[0, -len(seq) :] = seq
        self.net.eval()
        with torch.no_grad():
            hidden = self.net(torch.from_numpy(padded))[0, -1]
            scores = (self.net.item.weight[1:] @ hidden).numpy()
        return self.items.top(scores, k, {*exclude, *history})


def _windows(sequences: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    """Every sequence cut from its end into windows of max_len + 1 ids (left-padded with 0)."""
    out = []
    for seq in sequences:
        for end in range(len(seq), 1, -max_len):
            window = seq[max(0, end - max_len - 1) : end]
            row = np.zeros(max_len + 1, np.int64)
            row[-len(window) :] = window
            out.append(row)
    return np.stack(out) if out else np.zeros((0, max_len + 1), np.int64)


def _sasrec_net(n_items: int, cfg: SASRecConfig) -> Any:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.item = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
            self.position = nn.Embedding(cfg.max_len, cfg.dim)
            layer = nn.TransformerEncoderLayer(
                cfg.dim, cfg.heads, cfg.dim * 2, cfg.dropout, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(cfg.dim)
            self.drop = nn.Dropout(cfg.dropout)
            causal = torch.triu(torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool), 1)
            self.register_buffer("causal", causal)

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            length = seq.shape[1]
            x = self.item(seq) * math.sqrt(cfg.dim) + self.position.weight[:length]
            # Padding stays a zero vector (as in SASRec): no key padding mask, whose fully
            # masked rows would turn the left padding's attention into NaN.
            x = self.drop(x) * (seq != 0).unsqueeze(-1)
            mask = cast(torch.Tensor, self.causal)[:length, :length]
            return self.norm(self.encoder(x, mask=mask))

    return Net()


@dataclass(frozen=True)
class Grids:
    """The validation search of each baseline (the full protocol's; tests pass smaller ones)."""

    windows: tuple[int, ...] = (5, 10, 20, 50)
    # An earlier grid's top edge was chosen: this one goes past it.
    lambdas: tuple[float, ...] = (100.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0)
    neighbours: tuple[int, ...] = (20, 50, 100, 200)
    shrinks: tuple[float, ...] = (0.0, 10.0, 50.0)
    sasrec: SASRecConfig = SASRecConfig()
    # Text-only neighbours: how many recent items, and how fast older ones fade (window 1 is
    # "the text of the last item alone").
    text_windows: tuple[int, ...] = (1, 3, 5, 10, 20)
    text_decays: tuple[float, ...] = (1.0, 0.7, 0.4)


DEFAULT_GRIDS = Grids()


def validation_users(split: Split) -> HeldOut:
    """Train history → validation items (relevant by the split's rule: MovieLens, rated at least
    4; leave-one-out, every one); users without train history skipped."""
    return HeldOut.of(split.train, split.validation, split.relevant_min_weight)


Factory = Callable[[dict[str, Any]], Baseline]


def text_configs(grids: Grids) -> list[dict[str, Any]]:
    """The text-only neighbours' validation grid (window 1 has no older items to fade: one
    decay is enough there)."""
    return [
        {"window": w, "decay": d}
        for w in grids.text_windows
        for d in (grids.text_decays if w > 1 else grids.text_decays[:1])
    ]


def tuned_baselines(
    split: Split,
    cf_params: Mapping[str, Any],
    grids: Grids = DEFAULT_GRIDS,
    seed: int = 0,
    progress: bool = False,
    text: ItemText | None = None,
) -> tuple[dict[str, Baseline], dict[str, Any]]:
    """Each baseline with its hyper-parameters chosen on validation (fitted on train), refitted
    on train + validation; and the record of the search (chosen values, validation figures).
    The text-only baseline needs the bundle's embeddings (`text`); without them it is left out."""
    from tqdm.auto import tqdm

    users = validation_users(split)
    searches: dict[str, tuple[list[dict[str, Any]], Factory]] = {
        "cf_recent": (
            [{"window": w} for w in grids.windows],
            lambda c: CFRecent(c["window"], cf_params, seed),
        ),
        "ease": ([{"lambda": lam} for lam in grids.lambdas], lambda c: EASE(c["lambda"])),
        "itemknn": (
            [{"neighbours": n, "shrink": s} for n in grids.neighbours for s in grids.shrinks],
            lambda c: ItemKNN(c["neighbours"], c["shrink"]),
        ),
    }
    if text is not None:
        item_text = text
        searches["text_knn"] = (
            text_configs(grids),
            lambda c: TextNeighbours(item_text, c["window"], c["decay"]),
        )
    fits = sum(len(configs) for configs, _ in searches.values()) + 1 + len(searches) + 1
    bar = tqdm(total=fits, desc="baselines: validation search, refit", disable=not progress)
    models: dict[str, Baseline] = {}
    record: dict[str, Any] = {}
    for name, (configs, make) in searches.items():
        rows = []
        for config in configs:
            model = make(config)
            model.fit(split.train)
            rows.append({**config, "ndcg@10": round(users.ndcg(model), 4)})
            log.info("%s %s: validation ndcg@10 %s", name, config, rows[-1]["ndcg@10"])
            bar.update()
        best = max(rows, key=lambda r: r["ndcg@10"])
        models[name] = make({k: v for k, v in best.items() if k != "ndcg@10"})
        record[name] = {"chosen": {**best}, "validation": rows}
    sasrec = SASRec(grids.sasrec)
    rows = []
    for epoch in sasrec.train_epochs(split.train, grids.sasrec.max_epochs):
        if epoch % grids.sasrec.eval_every == 0 or epoch == grids.sasrec.max_epochs:
            rows.append({"epochs": epoch, "ndcg@10": round(users.ndcg(sasrec), 4)})
            log.info("sasrec after %d epochs: validation ndcg@10 %s", epoch, rows[-1]["ndcg@10"])
    bar.update()
    best = max(rows, key=lambda r: r["ndcg@10"])
    models["sasrec"] = SASRec(grids.sasrec, best["epochs"])
    settings = {
        k: v for k, v in asdict(grids.sasrec).items() if k not in ("max_epochs", "eval_every")
    }
    record["sasrec"] = {"chosen": {**best, **settings}, "validation": rows}
    seen = split.seen()
    for name, model in models.items():
        started = time.perf_counter()
        model.fit(seen)
        record[name]["refit_seconds"] = round(time.perf_counter() - started, 1)
        bar.update()
    bar.close()
    record["validation_users"] = len(users.relevant)
    return models, record


class Case(Protocol):
    @property
    def user_id(self) -> str: ...

    @property
    def history(self) -> list[str]: ...


def run_baselines(
    models: Mapping[str, Baseline], cases: Sequence[Case]
) -> dict[str, dict[str, list[str]]]:
    """Each baseline's top 10 for each test case (visible history, all of it excluded)."""
    runs: dict[str, dict[str, list[str]]] = {}
    for name, model in models.items():
        runs[name] = {
            c.user_id: model.recommend(c.history, K, set(c.history)) if c.history else []
            for c in cases
        }
    return runs
