from recsys.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("query_text", "query_vector", "history_item_ids", "top_k", "filter", "include_text", "include_vectors", "bundle_version", "new_items_only")
    QUERY_TEXT_FIELD_NUMBER: _ClassVar[int]
    QUERY_VECTOR_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TEXT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_ITEMS_ONLY_FIELD_NUMBER: _ClassVar[int]
    query_text: str
    query_vector: _containers.RepeatedScalarFieldContainer[float]
    history_item_ids: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    filter: _common_pb2.Filter
    include_text: bool
    include_vectors: bool
    bundle_version: str
    new_items_only: bool
    def __init__(self, query_text: _Optional[str] = ..., query_vector: _Optional[_Iterable[float]] = ..., history_item_ids: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ..., include_text: _Optional[bool] = ..., include_vectors: _Optional[bool] = ..., bundle_version: _Optional[str] = ..., new_items_only: _Optional[bool] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("item_id", "score", "item", "text", "vector", "dense_score", "lexical_score", "found_by")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DENSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    FOUND_BY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    item: _common_pb2.Item
    text: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    dense_score: float
    lexical_score: float
    found_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., item: _Optional[_Union[_common_pb2.Item, _Mapping]] = ..., text: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., dense_score: _Optional[float] = ..., lexical_score: _Optional[float] = ..., found_by: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "bundle_version", "unknown_history_item_ids")
    HITS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    bundle_version: str
    unknown_history_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., bundle_version: _Optional[str] = ..., unknown_history_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetItemsRequest(_message.Message):
    __slots__ = ("item_ids", "include_vectors", "bundle_version")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_vectors: bool
    bundle_version: str
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., include_vectors: _Optional[bool] = ..., bundle_version: _Optional[str] = ...) -> None: ...

class ItemRecord(_message.Message):
    __slots__ = ("item", "text", "vector")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    item: _common_pb2.Item
    text: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, item: _Optional[_Union[_common_pb2.Item, _Mapping]] = ..., text: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ...) -> None: ...

class GetItemsResponse(_message.Message):
    __slots__ = ("items", "missing_item_ids", "bundle_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MISSING_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ItemRecord]
    missing_item_ids: _containers.RepeatedScalarFieldContainer[str]
    bundle_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ItemRecord, _Mapping]]] = ..., missing_item_ids: _Optional[_Iterable[str]] = ..., bundle_version: _Optional[str] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.Item]
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.Item, _Mapping]]] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("upserted", "index_size")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    INDEX_SIZE_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    index_size: int
    def __init__(self, upserted: _Optional[int] = ..., index_size: _Optional[int] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ("deleted", "missing_item_ids", "index_size")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INDEX_SIZE_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    missing_item_ids: _containers.RepeatedScalarFieldContainer[str]
    index_size: int
    def __init__(self, deleted: _Optional[int] = ..., missing_item_ids: _Optional[_Iterable[str]] = ..., index_size: _Optional[int] = ...) -> None: ...

class GetIndexInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetIndexInfoResponse(_message.Message):
    __slots__ = ("size", "dimension", "bundle_version", "index_factory", "device", "encoder", "pooling", "change_log", "change_log_position", "lexical")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FACTORY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    CHANGE_LOG_FIELD_NUMBER: _ClassVar[int]
    CHANGE_LOG_POSITION_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_FIELD_NUMBER: _ClassVar[int]
    size: int
    dimension: int
    bundle_version: str
    index_factory: str
    device: str
    encoder: str
    pooling: str
    change_log: str
    change_log_position: int
    lexical: str
    def __init__(self, size: _Optional[int] = ..., dimension: _Optional[int] = ..., bundle_version: _Optional[str] = ..., index_factory: _Optional[str] = ..., device: _Optional[str] = ..., encoder: _Optional[str] = ..., pooling: _Optional[str] = ..., change_log: _Optional[str] = ..., change_log_position: _Optional[int] = ..., lexical: _Optional[str] = ...) -> None: ...
