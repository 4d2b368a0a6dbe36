"""Every bad Recommend field is an InvalidInput naming it; zeros take the defaults."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.servicer import validate
from recsys.core.errors import InvalidInput
from recsys.core.settings import Settings
from recsys.v1 import gateway_pb2

SETTINGS = Settings()


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({}, "query, user_id, history_item_ids"),
        ({"query": "x", "k": 1001}, "k"),
        ({"query": "x", "k": 10, "candidate_pool": 5}, "candidate_pool"),
        ({"query": "x", "candidate_pool": 5000}, "candidate_pool"),
        ({"query": "x", "diversity": 1.01}, "diversity"),
        ({"query": "x", "diversity": float("nan")}, "diversity"),
        ({"query": "x" * 2001}, "query"),
        ({"history_item_ids": ["a", " "]}, "history_item_ids"),
        ({"history_item_ids": ["a"] * 101}, "history_item_ids"),
        ({"query": "x", "user_id": "u" * 2001}, "user_id"),
        ({"query": "x", "filter": {"exclude_item_ids": ["a", ""]}}, "filter.exclude_item_ids"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate(gateway_pb2.RecommendRequest(**fields), SETTINGS)
    assert name in str(info.value)


def test_defaults_for_zero_values() -> None:
    request = validate(gateway_pb2.RecommendRequest(query=" shoes ", k=0), SETTINGS)
    assert request.k == SETTINGS.default_k
    assert request.candidate_pool == SETTINGS.default_candidate_pool
    assert request.query == "shoes"
    wide = validate(gateway_pb2.RecommendRequest(query="x", k=500), SETTINGS)
    assert wide.candidate_pool == 500
    assert request.diversity == 0.0 and request.history_item_ids == ()


def test_user_id_alone_is_a_request() -> None:
    request = validate(gateway_pb2.RecommendRequest(user_id=" u1 "), SETTINGS)
    assert request.user_id == "u1" and request.query == "" and request.history_item_ids == ()


def test_default_pool_never_exceeds_the_limit() -> None:
    settings = Settings(default_candidate_pool=300, max_candidate_pool=200)
    assert validate(gateway_pb2.RecommendRequest(query="x"), settings).candidate_pool == 200


def test_fields_are_trimmed_and_carried() -> None:
    msg = gateway_pb2.RecommendRequest(
        user_id=" u1 ",
        history_item_ids=[" h1", "h2 "],
        k=3,
        candidate_pool=7,
        diversity=0.5,
        filter={"categories": ["sport"], "exclude_item_ids": [" x "]},
    )
    request = validate(msg, SETTINGS)
    assert (request.user_id, request.query, request.history_item_ids) == ("u1", "", ("h1", "h2"))
    assert (request.k, request.candidate_pool, request.diversity) == (3, 7, 0.5)
    assert request.categories == {"sport"} and request.exclude_item_ids == {"x"}
