"""The trained parts of one bundle, loaded once for offline evaluation (no servers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gateway.candidates import PoolItem, Recalled, merge, pool_split
from ranking_service.cf import CFModel
from ranking_service.cross_encoder import CrossEncoderScorer, build_context
from ranking_service.ranker import Ranker
from recsys import bundle as bundle_files
from recsys.bundle import Bundle
from recsys.domain import Candidate, HistoryItem, Hit, RankContext, SearchQuery
from recsys.evaluation.metrics import K
from recsys.settings import Settings
from retrieval_service.retriever import Retriever

Pair = tuple[str, str]


@dataclass
class EvalModels:
    """Retriever, ranker (CF + fusion), the fine-tuned and the base cross-encoder."""

    bundle: Bundle
    retriever: Retriever
    ranker: Ranker
    tuned: CrossEncoderScorer
    base: CrossEncoderScorer

    @classmethod
    def load(cls, bundle: Bundle, device: str = "auto") -> EvalModels:
        settings = Settings(bundle=bundle.root, device=device)  # type: ignore[arg-type]
        retriever = Retriever.load(bundle, state_dir=None, device=device)
        ranker = Ranker.load(bundle, settings)
        section = bundle.manifest["cross_encoder"]
        # Both read pairs cut to the length the ranking service uses.
        max_length = int(section.get("max_length", 128))
        tuned = CrossEncoderScorer.load(
            bundle.file(bundle_files.CROSS_ENCODER_DIR), device, max_length
        )
        # The untuned baseline: the same backbone with a fresh (seeded) one-logit head.
        base = CrossEncoderScorer.load(Path(section["base"]), device, max_length)
        return cls(bundle, retriever, ranker, tuned, base)

    def text(self, item_id: str) -> str:
        item = self.retriever.store.get(item_id)
        return item.text() if item is not None else ""

    def vector(self, item_id: str) -> np.ndarray | None:
        row = self.retriever.store.row(item_id)
        return None if row is None else self.retriever.store.vector_at(row)

    def context(self, query: str, history: Sequence[str]) -> RankContext:
        """No user id: CF folds the user in from the whole history the protocol lets it see."""
        return RankContext(
            query=query, history=tuple(HistoryItem(i, self.text(i)) for i in history)
        )

    def candidates(self, hits: Sequence[Hit]) -> list[Candidate]:
        return [Candidate(h.item_id, self.text(h.item_id), h.score) for h in hits]


@dataclass(frozen=True)
class HistoryPool:
    """One user's candidates, offline, as the serving path would gather them."""

    hits: list[Hit]  # retrieval's top `pool`: what the dense baselines re-rank
    recalled: list[tuple[str, float]]  # CF's best, at least K of them
    full: list[PoolItem]  # what the gateway sends to ranking (gateway.candidates)


def history_pool(
    retriever: Retriever,
    cf: CFModel,
    history: Sequence[str],
    seen: set[str],
    pool: int,
    cf_share: float,
) -> HistoryPool:
    """Retrieval from the history vector and CF recall from the folded-in user, both without
    `seen`, merged into the pool a history-only Recommend of `pool` candidates would rank."""
    dense_k, cf_k = pool_split(pool, has_query=False, has_history=True, cf_share=cf_share)
    vector = cf.fold_in(history)
    recalled = cf.recommend(vector, max(K, cf_k), exclude=seen) if vector is not None else []
    hits: list[Hit] = []
    if history:  # a user seen only in test has nothing to search from
        hits, _ = retriever.search(
            SearchQuery(
                top_k=pool,
                history_item_ids=tuple(history),
                exclude_item_ids=frozenset(seen),
                include_text=True,
            )
        )
    cf_items = [
        Recalled(item, score)
        for item_id, score in recalled[:cf_k]
        if (item := retriever.store.get(item_id)) is not None
    ]
    return HistoryPool(hits, recalled, merge(hits[:dense_k], cf_items))


def score_lists(
    scorer: CrossEncoderScorer,
    contexts: Sequence[RankContext],
    pools: Sequence[Sequence[Candidate]],
    desc: str = "cross-encoder",
    progress: bool = True,
) -> list[np.ndarray]:
    """Cross-encoder scores for many (context, pool) lists in large batches; one array per list."""
    pairs: list[Pair] = []
    for context, pool in zip(contexts, pools, strict=True):
        text = build_context(context.query, [h.text for h in context.history])
        pairs.extend((text, c.text) for c in pool)
    chunk = 4096
    parts = [
        scorer.score(pairs[i : i + chunk], batch_size=128)
        for i in tqdm(range(0, len(pairs), chunk), desc=desc, unit="chunk", disable=not progress)
    ]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    out, offset = [], 0
    for pool in pools:
        out.append(flat[offset : offset + len(pool)])
        offset += len(pool)
    return out
