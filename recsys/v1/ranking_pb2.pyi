from recsys.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HistoryItem(_message.Message):
    __slots__ = ("item_id", "text")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    text: str
    def __init__(self, item_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class RankContext(_message.Message):
    __slots__ = ("query", "user_id", "history")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    query: str
    user_id: str
    history: _containers.RepeatedCompositeFieldContainer[HistoryItem]
    def __init__(self, query: _Optional[str] = ..., user_id: _Optional[str] = ..., history: _Optional[_Iterable[_Union[HistoryItem, _Mapping]]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "text", "retrieval_score", "lexical_score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    text: str
    retrieval_score: float
    lexical_score: float
    def __init__(self, item_id: _Optional[str] = ..., text: _Optional[str] = ..., retrieval_score: _Optional[float] = ..., lexical_score: _Optional[float] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("context", "candidates", "bundle_version")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    context: RankContext
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    bundle_version: str
    def __init__(self, context: _Optional[_Union[RankContext, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., bundle_version: _Optional[str] = ...) -> None: ...

class ScoredCandidate(_message.Message):
    __slots__ = ("item_id", "scores")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    scores: _common_pb2.ScoreBreakdown
    def __init__(self, item_id: _Optional[str] = ..., scores: _Optional[_Union[_common_pb2.ScoreBreakdown, _Mapping]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("candidates", "versions", "cf_folded_in")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CF_FOLDED_IN_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[ScoredCandidate]
    versions: _common_pb2.ModelVersions
    cf_folded_in: bool
    def __init__(self, candidates: _Optional[_Iterable[_Union[ScoredCandidate, _Mapping]]] = ..., versions: _Optional[_Union[_common_pb2.ModelVersions, _Mapping]] = ..., cf_folded_in: _Optional[bool] = ...) -> None: ...

class RecallCandidatesRequest(_message.Message):
    __slots__ = ("user_id", "history_item_ids", "top_k", "exclude_item_ids", "bundle_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history_item_ids: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    bundle_version: str
    def __init__(self, user_id: _Optional[str] = ..., history_item_ids: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., bundle_version: _Optional[str] = ...) -> None: ...

class RecalledItem(_message.Message):
    __slots__ = ("item_id", "cf_score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CF_SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    cf_score: float
    def __init__(self, item_id: _Optional[str] = ..., cf_score: _Optional[float] = ...) -> None: ...

class RecallCandidatesResponse(_message.Message):
    __slots__ = ("items", "versions", "cf_folded_in")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CF_FOLDED_IN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecalledItem]
    versions: _common_pb2.ModelVersions
    cf_folded_in: bool
    def __init__(self, items: _Optional[_Iterable[_Union[RecalledItem, _Mapping]]] = ..., versions: _Optional[_Union[_common_pb2.ModelVersions, _Mapping]] = ..., cf_folded_in: _Optional[bool] = ...) -> None: ...
