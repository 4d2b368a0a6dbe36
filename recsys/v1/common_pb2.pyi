from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Item(_message.Message):
    __slots__ = ("item_id", "title", "description", "category", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    description: str
    category: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., category: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("categories", "exclude_item_ids")
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, categories: _Optional[_Iterable[str]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreBreakdown(_message.Message):
    __slots__ = ("cross_encoder", "cf", "retrieval", "fused", "lexical", "first_pass_rank")
    CROSS_ENCODER_FIELD_NUMBER: _ClassVar[int]
    CF_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    FUSED_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_FIELD_NUMBER: _ClassVar[int]
    FIRST_PASS_RANK_FIELD_NUMBER: _ClassVar[int]
    cross_encoder: float
    cf: float
    retrieval: float
    fused: float
    lexical: float
    first_pass_rank: int
    def __init__(self, cross_encoder: _Optional[float] = ..., cf: _Optional[float] = ..., retrieval: _Optional[float] = ..., fused: _Optional[float] = ..., lexical: _Optional[float] = ..., first_pass_rank: _Optional[int] = ...) -> None: ...

class ModelVersions(_message.Message):
    __slots__ = ("bundle_version", "encoder", "index_factory", "cross_encoder", "cf", "fusion", "ranking_bundle_version")
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FACTORY_FIELD_NUMBER: _ClassVar[int]
    CROSS_ENCODER_FIELD_NUMBER: _ClassVar[int]
    CF_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    RANKING_BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    bundle_version: str
    encoder: str
    index_factory: str
    cross_encoder: str
    cf: str
    fusion: str
    ranking_bundle_version: str
    def __init__(self, bundle_version: _Optional[str] = ..., encoder: _Optional[str] = ..., index_factory: _Optional[str] = ..., cross_encoder: _Optional[str] = ..., cf: _Optional[str] = ..., fusion: _Optional[str] = ..., ranking_bundle_version: _Optional[str] = ...) -> None: ...
