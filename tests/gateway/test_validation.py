"""Every bad Recommend field is an InvalidInput naming it; zeros take the defaults."""

from __future__ import annotations

import pytest

from gateway.servicer import validate
from recsys.errors import InvalidInput
from recsys.settings import Settings
from recsys.v1 import gateway_pb2

SETTINGS = Settings()


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({}, "query, user_id, history_item_ids"),
        ({"user_id": "u1"}, "user_id alone"),
        ({"query": "x", "k": 1001}, "k"),
        ({"query": "x", "k": 10, "candidate_pool": 5}, "candidate_pool"),
        ({"query": "x", "candidate_pool": 5000}, "candidate_pool"),
        ({"query": "x", "diversity": 1.01}, "diversity"),
        ({"query": "x", "diversity": float("nan")}, "diversity"),
        ({"query": "x" * 2001}, "query"),
        ({"history_item_ids": ["a", " "]}, "history_item_ids"),
        ({"history_item_ids": ["a"] * 101}, "history_item_ids"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, object], name: str) -> None:
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
