"""Protobuf ↔ domain conversions shared by servicers (server side) and stage clients (gateway side)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.core.domain import (
    Candidate,
    HistoryItem,
    Hit,
    Item,
    RankContext,
    Scored,
    Scores,
    SearchQuery,
)
from recsys.v1 import common_pb2, ranking_pb2, retrieval_pb2


def item_to_proto(item: Item) -> common_pb2.Item:
    return common_pb2.Item(
        item_id=item.item_id,
        title=item.title,
        description=item.description,
        category=item.category,
        attributes=item.attributes,
    )


def item_from_proto(msg: common_pb2.Item) -> Item:
    return Item(
        item_id=msg.item_id.strip(),
        title=msg.title.strip(),
        description=msg.description,
        category=msg.category,
        attributes=dict(msg.attributes),
    )


def scores_to_proto(scores: Scores) -> common_pb2.ScoreBreakdown:
    msg = common_pb2.ScoreBreakdown(fused=scores.fused)
    # Unset optional fields mean "this stage did not score the item".
    if scores.cross_encoder is not None:
        msg.cross_encoder = scores.cross_encoder
    if scores.cf is not None:
        msg.cf = scores.cf
    if scores.retrieval is not None:
        msg.retrieval = scores.retrieval
    if scores.lexical is not None:
        msg.lexical = scores.lexical
    if scores.first_pass_rank is not None:
        msg.first_pass_rank = scores.first_pass_rank
    return msg


def scores_from_proto(msg: common_pb2.ScoreBreakdown) -> Scores:
    return Scores(
        fused=msg.fused,
        cross_encoder=msg.cross_encoder if msg.HasField("cross_encoder") else None,
        cf=msg.cf if msg.HasField("cf") else None,
        retrieval=msg.retrieval if msg.HasField("retrieval") else None,
        lexical=msg.lexical if msg.HasField("lexical") else None,
        first_pass_rank=msg.first_pass_rank if msg.HasField("first_pass_rank") else None,
    )


def search_request(query: SearchQuery) -> retrieval_pb2.SearchRequest:
    return retrieval_pb2.SearchRequest(
        query_text=query.text,
        query_vector=[] if query.vector is None else query.vector.tolist(),
        history_item_ids=list(query.history_item_ids),
        top_k=query.top_k,
        filter=common_pb2.Filter(
            categories=sorted(query.categories), exclude_item_ids=sorted(query.exclude_item_ids)
        ),
        include_text=query.include_text,
        include_vectors=query.include_vectors,
        new_items_only=query.new_items_only,
    )


def hit_to_proto(hit: Hit) -> retrieval_pb2.SearchHit:
    msg = retrieval_pb2.SearchHit(
        item_id=hit.item_id,
        score=hit.score,
        dense_score=hit.dense_score,
        lexical_score=hit.lexical_score,
        found_by=list(hit.found_by),
    )
    if hit.item is not None:
        msg.item.CopyFrom(item_to_proto(hit.item))
        msg.text = hit.item.text()
    if hit.vector is not None:
        msg.vector.extend(hit.vector.tolist())
    return msg


def hit_from_proto(msg: retrieval_pb2.SearchHit) -> Hit:
    return Hit(
        item_id=msg.item_id,
        score=msg.score,
        item=item_from_proto(msg.item) if msg.HasField("item") else None,
        vector=np.asarray(msg.vector, dtype=np.float32) if len(msg.vector) else None,
        dense_score=msg.dense_score if msg.HasField("dense_score") else None,
        lexical_score=msg.lexical_score if msg.HasField("lexical_score") else None,
        found_by=tuple(msg.found_by),
    )


def rank_request(context: RankContext, candidates: Sequence[Candidate]) -> ranking_pb2.RankRequest:
    return ranking_pb2.RankRequest(
        context=ranking_pb2.RankContext(
            query=context.query,
            user_id=context.user_id,
            history=[
                ranking_pb2.HistoryItem(item_id=h.item_id, text=h.text) for h in context.history
            ],
        ),
        candidates=[
            ranking_pb2.Candidate(
                item_id=c.item_id,
                text=c.text,
                retrieval_score=c.retrieval_score,
                lexical_score=c.lexical_score,
            )
            for c in candidates
        ],
    )


def rank_context_from_proto(msg: ranking_pb2.RankContext) -> RankContext:
    return RankContext(
        query=msg.query,
        user_id=msg.user_id,
        history=tuple(HistoryItem(item_id=h.item_id, text=h.text) for h in msg.history),
    )


def candidates_from_proto(msgs: Sequence[ranking_pb2.Candidate]) -> list[Candidate]:
    return [
        Candidate(
            item_id=c.item_id,
            text=c.text,
            retrieval_score=c.retrieval_score if c.HasField("retrieval_score") else None,
            lexical_score=c.lexical_score if c.HasField("lexical_score") else None,
        )
        for c in msgs
    ]


def scored_to_proto(scored: Scored) -> ranking_pb2.ScoredCandidate:
    return ranking_pb2.ScoredCandidate(
        item_id=scored.item_id, scores=scores_to_proto(scored.scores)
    )


def scored_from_proto(msg: ranking_pb2.ScoredCandidate) -> Scored:
    return Scored(item_id=msg.item_id, scores=scores_from_proto(msg.scores))
