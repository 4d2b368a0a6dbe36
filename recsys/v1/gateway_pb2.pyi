from recsys.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_RETRIEVAL: _ClassVar[Stage]
    STAGE_RANKING: _ClassVar[Stage]
    STAGE_DIVERSITY: _ClassVar[Stage]
    STAGE_TOTAL: _ClassVar[Stage]
STAGE_UNSPECIFIED: Stage
STAGE_RETRIEVAL: Stage
STAGE_RANKING: Stage
STAGE_DIVERSITY: Stage
STAGE_TOTAL: Stage

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "query", "history_item_ids", "k", "candidate_pool", "diversity", "filter")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_POOL_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    query: str
    history_item_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    candidate_pool: int
    diversity: float
    filter: _common_pb2.Filter
    def __init__(self, user_id: _Optional[str] = ..., query: _Optional[str] = ..., history_item_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., candidate_pool: _Optional[int] = ..., diversity: _Optional[float] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ...) -> None: ...

class RecommendedItem(_message.Message):
    __slots__ = ("item_id", "title", "score", "scores", "category", "new_product")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    NEW_PRODUCT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    score: float
    scores: _common_pb2.ScoreBreakdown
    category: str
    new_product: bool
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., score: _Optional[float] = ..., scores: _Optional[_Union[_common_pb2.ScoreBreakdown, _Mapping]] = ..., category: _Optional[str] = ..., new_product: _Optional[bool] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    seconds: float
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "degraded", "degraded_reasons", "timings", "versions")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    degraded: bool
    degraded_reasons: _containers.RepeatedScalarFieldContainer[str]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    versions: _common_pb2.ModelVersions
    def __init__(self, items: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ..., degraded: _Optional[bool] = ..., degraded_reasons: _Optional[_Iterable[str]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., versions: _Optional[_Union[_common_pb2.ModelVersions, _Mapping]] = ...) -> None: ...
