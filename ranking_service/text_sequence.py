"""A sequential model over the items' text embeddings: what is had next, read from what was had.

The language model's view of order. The encoder stays frozen; two learned linear adapters map
the history's context (the decayed mean of its RECENT most recent item vectors) and a
candidate's vector into one space, and a candidate scores their cosine. Trained with a softmax
over the catalog on each "history → next item" step of the training sequences, so it learns
which kinds of product follow which (a pipette after a pipette-tip box), not only which look
alike, as content similarity does. Every input is a text embedding: a product added after the
build, with no interactions, is scored from its text at once, and so is a user the build never
saw. The reference models (UniSRec, VQ-Rec) put a transformer over the same inputs; this is
the linear case that trains on CPU within the build (docs/architecture.md, "Text in order").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# The context: the RECENT most recent history items, each older one weighing DECAY less.
RECENT = 5
DECAY = 0.6
# Training: at most MAX_EPOCHS passes over the steps, stopped when the held-out steps' loss
# stops falling or the next pass would not fit in the time budget.
MAX_EPOCHS = 10
BATCH = 512
LEARNING_RATE = 1e-3
# Catalogs up to this size are scored whole in each step's softmax; larger ones against the
# batch's targets and this many items drawn at random.
SOFTMAX_ITEMS = 8192
HELD_OUT = 2000
DEFAULT_SECONDS = 120.0
FILE = "text_sequence.npz"


@dataclass(frozen=True)
class TextSequence:
    """The two adapters (dimension × dimension)."""

    context_adapter: np.ndarray
    item_adapter: np.ndarray

    def scores(self, past: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Each candidate vector's score after the history `past` (vectors, most recent first)."""
        query = _unit(context(past) @ self.context_adapter)
        return (_unit(candidates @ self.item_adapter) @ query).astype(np.float32)

    def save(self, version_dir: Path) -> None:
        np.savez(
            version_dir / FILE, context_adapter=self.context_adapter, item_adapter=self.item_adapter
        )

    @classmethod
    def load(cls, version_dir: Path) -> TextSequence | None:
        """The model a bundle version holds; None where it has none (older bundles, builds
        without sequences to learn from)."""
        path = version_dir / FILE
        if not path.is_file():
            return None
        with np.load(path) as saved:
            return cls(saved["context_adapter"], saved["item_adapter"])


def context(past: np.ndarray) -> np.ndarray:
    """The history's context vector: its RECENT most recent vectors (rows, most recent first),
    each older one weighing DECAY less, as a unit vector."""
    recent = np.asarray(past[:RECENT], np.float32)
    weights = DECAY ** np.arange(len(recent), dtype=np.float32)
    return _unit(weights @ recent)


def train(
    vectors: np.ndarray,
    sequences: Sequence[Sequence[int]],
    held_out: Sequence[tuple[Sequence[int], int]],
    seed: int = 0,
    seconds: float = DEFAULT_SECONDS,
) -> tuple[TextSequence | None, dict[str, Any]]:
    """The model (its softmax's temperature learned alongside) fitted on every "history → next"
    step of `sequences` (rows of `vectors`, each in time order), and the manifest's record; the
    epochs stop where the loss on `held_out` ((history rows, most recent first; next row)
    pairs) is lowest. None without a step."""
    import torch

    started = time.perf_counter()
    contexts, targets = _steps(vectors, sequences)
    if not len(targets):
        return None, {"skipped": "no sequence of two or more known items to learn from"}
    held = _held_out(vectors, held_out)
    generator = torch.Generator().manual_seed(seed)
    items = torch.from_numpy(np.array(vectors, np.float32))  # a copy: bundles are read-only maps
    dim = items.shape[1]
    context_adapter = torch.nn.Parameter(torch.eye(dim))
    item_adapter = torch.nn.Parameter(torch.eye(dim))
    log_scale = torch.nn.Parameter(torch.tensor(3.0))
    optimizer = torch.optim.Adam([context_adapter, item_adapter, log_scale], lr=LEARNING_RATE)
    x, y = torch.from_numpy(contexts), torch.from_numpy(targets)

    def logits(queries: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        keys = items if columns is None else items[columns]
        q = torch.nn.functional.normalize(queries @ context_adapter, dim=1)
        k = torch.nn.functional.normalize(keys @ item_adapter, dim=1)
        return log_scale.exp() * (q @ k.T)

    def held_loss() -> float | None:
        if held is None:
            return None
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(logits(held[0], None), held[1]))

    best = (held_loss(), _state(context_adapter, item_adapter), 0)
    losses: list[float] = []
    epoch_s = 0.0
    for epoch in range(1, MAX_EPOCHS + 1):
        if time.perf_counter() - started + epoch_s > seconds and epoch > 1:
            break
        began = time.perf_counter()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), BATCH):
            batch = order[start : start + BATCH]
            columns, labels = _softmax_columns(y[batch], len(items), generator)
            loss = torch.nn.functional.cross_entropy(logits(x[batch], columns), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epoch_s = time.perf_counter() - began
        current = held_loss()
        if current is not None:
            losses.append(round(current, 4))
        if current is None or best[0] is None or current < best[0]:
            best = (current, _state(context_adapter, item_adapter), epoch)
        else:
            break  # the held-out loss rose: the best epoch is behind
    context_w, item_w = best[1]
    record = {
        "steps": len(targets),
        "held_out": 0 if held is None else len(held[1]),
        "epochs": best[2],
        "held_out_loss": losses,
        "seconds": round(time.perf_counter() - started, 1),
        "recent": RECENT,
        "decay": DECAY,
    }
    log.info("text sequence model: %s", record)
    return TextSequence(context_w, item_w), record


def _steps(
    vectors: np.ndarray, sequences: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(context vectors, next rows) of every step after a sequence's first item."""
    contexts: list[np.ndarray] = []
    targets: list[int] = []
    for rows in sequences:
        for t in range(1, len(rows)):
            past = vectors[np.asarray(rows[max(0, t - RECENT) : t][::-1])]
            contexts.append(context(past))
            targets.append(rows[t])
    if not targets:
        return np.zeros((0, vectors.shape[1]), np.float32), np.zeros(0, np.int64)
    return np.stack(contexts), np.asarray(targets, np.int64)


def _held_out(vectors: np.ndarray, held_out: Sequence[tuple[Sequence[int], int]]) -> Any:
    """(contexts, targets) tensors of at most HELD_OUT held-out steps; None without any."""
    import torch

    pairs = [(h, t) for h, t in held_out if len(h)][:HELD_OUT]
    if not pairs:
        return None
    contexts = np.stack([context(vectors[np.asarray(h[:RECENT])]) for h, _ in pairs])
    targets = np.asarray([t for _, t in pairs], np.int64)
    return torch.from_numpy(contexts), torch.from_numpy(targets)


def _softmax_columns(targets: Any, n_items: int, generator: Any) -> tuple[Any, Any]:
    """(the catalog rows a step's softmax runs over, None: all of them; each target's index
    among them)."""
    import torch

    if n_items <= SOFTMAX_ITEMS:
        return None, targets
    drawn = torch.randint(n_items, (SOFTMAX_ITEMS,), generator=generator)
    columns, inverse = torch.unique(torch.cat([targets, drawn]), return_inverse=True)
    return columns, inverse[: len(targets)]


def _state(context_adapter: Any, item_adapter: Any) -> tuple[np.ndarray, np.ndarray]:
    return context_adapter.detach().numpy().copy(), item_adapter.detach().numpy().copy()


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, 1e-12)
