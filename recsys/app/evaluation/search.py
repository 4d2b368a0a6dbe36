"""The search protocol: tag queries (test half) against BM25, dense, dense + base CE, and full."""

from __future__ import annotations

from collections.abc import Sequence

from recsys.app.evaluation.metrics import K
from recsys.app.evaluation.models import EvalModels, rerank
from recsys.app.movielens import TagQuery
from recsys.offline.local import pool_request

METHODS = ("bm25", "dense", "dense+ce_base", "dense+ce", "full")
Run = dict[str, list[str]]


def bm25_run(item_ids: Sequence[str], texts: Sequence[str], queries: Sequence[str]) -> Run:
    """BM25 (the bm25s library) over item text, English stop words removed."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False
    )
    tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
    docs, _ = retriever.retrieve(tokens, k=K, show_progress=False)
    return {q: [item_ids[int(d)] for d in row] for q, row in zip(queries, docs, strict=True)}


def run_search(
    models: EvalModels, queries: Sequence[TagQuery], pool: int, progress: bool = True
) -> dict[str, Run]:
    """Top-10 answers of every method for each test query."""
    texts = [i.text() for i in models.items]
    ids = [i.item_id for i in models.items]
    runs: dict[str, Run] = {"bm25": bm25_run(ids, texts, [q.query for q in queries])}
    runs.update({m: {} for m in METHODS if m != "bm25"})
    requests = [pool_request(pool, query=q.query) for q in queries]
    gathered = models.pools(requests, "search: candidates" if progress else None)
    contexts = [g.context() for g in gathered]
    pools = [g.candidates() for g in gathered]
    for q, candidates in zip(queries, pools, strict=True):
        runs["dense"][q.query] = [c.item_id for c in candidates[:K]]
    # A search's pool is retrieval's: the dense baselines rerank its head.
    answers = rerank(models, contexts, pools, pools, "search", progress)
    for q, answer in zip(queries, answers, strict=True):
        runs["dense+ce"][q.query] = answer.dense_ce
        runs["dense+ce_base"][q.query] = answer.dense_ce_base
        runs["full"][q.query] = [s.item_id for s in answer.full[:K]]
    return runs
