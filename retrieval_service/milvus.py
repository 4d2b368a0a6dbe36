"""The catalog held in Milvus: items and their vectors live in the engine, filters run there.

The counterpart of `ItemStore` + FAISS `VectorIndex` for catalogs beyond one machine: Milvus
shards, replicates and indexes (GPU indexes included), so a retrieval replica holds no catalog
state and every replica sees every acknowledged write. Milvus Lite (a local `.db` path as the
uri) speaks the same client API and is what the tests run against.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle
from recsys.core.domain import Item
from recsys.core.errors import InvalidInput, NotReady, first_line
from recsys.core.settings import Settings
from recsys.core.urls import redacted
from retrieval_service.backends import CatalogOpener, Found
from retrieval_service.catalog import load_catalog_items

# Milvus counts VARCHAR lengths in UTF-8 bytes (Milvus Lite counts characters): we check bytes
# before writing, so a too-long value is the caller's InvalidInput, not an engine failure.
ID_MAX_BYTES = 512
TEXT_MAX_BYTES = 65_535  # Milvus's largest VARCHAR: title, description and category
# Milvus refuses a search whose limit is above this (its default maxTopK).
MAX_TOP_K = 16_384
# Rows per upsert request by default: ~1.6 MB at 384 dimensions, far below gRPC's 64 MB.
LOAD_BATCH = 1_000
# Ids per `in [...]` expression of get/delete, so one call never builds an unbounded expression.
IDS_PER_EXPRESSION = 1_000
# Vectors are L2-normalised, so inner product is cosine: the same scores as the FAISS side.
METRIC = "IP"
# A write the service acknowledged must be visible to the next search on any replica.
CONSISTENCY = "Strong"
DEFAULT_TIMEOUT_S = 10.0
CONNECT_ATTEMPTS = 2
CONNECT_RETRY_S = 0.5
# Collection property naming the bundle version a completed load came from.
LOADED_PROPERTY = "recsys.loaded_from"

VECTOR = "vector"
_TEXT_FIELDS = ("title", "description", "category")
_OUTPUT = ["item_id", *_TEXT_FIELDS, "attributes"]

log = logging.getLogger(__name__)


class MilvusUnavailable(NotReady):
    """Milvus could not be reached or failed a call; a NotReady, so gRPC answers UNAVAILABLE."""


class _QuietRpcErrors(logging.Filter):
    """Drops pymilvus's own log line (with traceback, on its own stderr handler) for a failed
    RPC (pymilvus 3's `_log_rpc_error`): the failure is raised as MilvusUnavailable with
    Milvus's message, and the service logs that once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "_log_rpc_error"


_rpc_log = logging.getLogger("pymilvus.decorators")
if not any(isinstance(f, _QuietRpcErrors) for f in _rpc_log.filters):
    _rpc_log.addFilter(_QuietRpcErrors())


def opener(settings: Settings) -> CatalogOpener:
    """`retrieval_backend=milvus` (see retrieval_service.backends): each bundle version in its
    collection of the configured Milvus."""
    target = MilvusTarget(
        settings.milvus_uri,
        settings.milvus_token_file,
        settings.milvus_collection_prefix,
        settings.milvus_index_type,
    )
    return target.open


@dataclass(frozen=True)
class MilvusTarget:
    """Where the Milvus backend keeps each bundle version: collection PREFIX_<version>."""

    uri: str
    token_file: Path | None = None
    collection_prefix: str = "recsys"
    index_type: str = "AUTOINDEX"

    def collection(self, version: str) -> str:
        return f"{self.collection_prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', version)}"

    def token(self) -> str:
        if self.token_file is None:
            return ""
        try:
            return self.token_file.read_text().strip()
        except OSError as exc:
            raise InvalidInput(f"milvus_token_file {self.token_file}: {exc.strerror}") from None

    def open(self, bundle: Bundle, device: str) -> MilvusCatalog:
        """The bundle version's collection, filled from the bundle by the first replica that
        opens it (the device is Milvus's business, not this process's)."""
        catalog = MilvusCatalog.connect(
            self.uri,
            self.collection(bundle.version),
            int(bundle.manifest["encoder"]["dimension"]),
            token=self.token(),
            index_type=self.index_type,
        )
        try:
            if catalog.loaded_from() != bundle.version:
                items = load_catalog_items(bundle.file(bundle_files.CATALOG))
                catalog.load(items, np.load(bundle.file(bundle_files.EMBEDDINGS)))
                catalog.mark_loaded(bundle.version)
        except BaseException:
            catalog.close()
            raise
        return catalog


class MilvusCatalog:
    """Items and vectors in one Milvus collection: search with filters, get, upsert, delete.

    Thread-safe: the client is a gRPC channel and the catalog keeps no state of its own."""

    def __init__(
        self,
        client: MilvusClient,
        uri: str,
        collection: str,
        dimension: int,
        index_type: str,
        timeout: float,
        search_params: Mapping[str, Any] | None = None,
    ) -> None:
        self._client = client
        self._uri = uri
        self.collection = collection
        self._dimension = dimension
        self.index_type = index_type  # what the collection's vector index is, as Milvus says
        self._timeout = timeout
        self._search_params: dict[str, Any] = {"metric_type": METRIC}
        if search_params:
            self._search_params["params"] = dict(search_params)

    @classmethod
    def connect(
        cls,
        uri: str,
        collection: str,
        dimension: int,
        token: str = "",
        index_type: str = "AUTOINDEX",
        timeout: float = DEFAULT_TIMEOUT_S,
        search_params: Mapping[str, Any] | None = None,
    ) -> MilvusCatalog:
        """Opens the collection, creating it (schema, IP index) when missing; refuses an existing
        one whose schema, dimension or vector index differs. `timeout` bounds every call;
        `search_params` are the index's search knobs (e.g. {"ef": 64} for HNSW)."""
        if dimension < 1:
            raise InvalidInput(f"dimension: {dimension}, must be at least 1")
        try:
            client = _client(uri, token, timeout, collection)
        except MilvusUnavailable as exc:
            if uri.endswith(".db"):
                # The usual cause: Milvus Lite opens a .db in one process at a time (a file lock).
                raise MilvusUnavailable(
                    f"{exc} (a Milvus Lite file is open in one process at a time; "
                    "share it through `milvus-lite server` and an http:// uri)"
                ) from exc.__cause__
            raise
        catalog = cls(client, uri, collection, dimension, index_type, timeout, search_params)
        try:
            catalog._open()
        except BaseException:
            client.close()
            raise
        return catalog

    def _open(self) -> None:
        with self._call("open"):
            exists = self._client.has_collection(self.collection, timeout=self._timeout)
            if not exists:
                try:
                    self._create()  # then checked like any other: info() says what Milvus made
                except MilvusException:
                    # Another replica may have created it first: then validate theirs.
                    if not self._client.has_collection(self.collection, timeout=self._timeout):
                        raise
            described = self._client.describe_collection(self.collection, timeout=self._timeout)
        mismatch = _schema_mismatch(described, self._dimension)
        if mismatch:
            raise InvalidInput(f"milvus collection {self.collection!r}: {mismatch}")
        with self._call("open"):
            names = self._client.list_indexes(
                self.collection, field_name=VECTOR, timeout=self._timeout
            )
            if not names:
                # A collection made elsewhere without an index: Milvus cannot load it without one.
                self._client.create_index(
                    self.collection, self._index_params(), timeout=self._timeout
                )
                names = [VECTOR]
            index = self._client.describe_index(self.collection, names[0], timeout=self._timeout)
        metric, kind = str(index.get("metric_type", "")), str(index.get("index_type", ""))
        if metric.upper() != METRIC or kind.upper() != self.index_type.upper():
            raise InvalidInput(
                f"milvus collection {self.collection!r}: vector index is {kind} with metric "
                f"{metric}, configured {self.index_type} with {METRIC}; drop or rename it"
            )
        self.index_type = kind
        with self._call("open"):
            # Real Milvus searches only loaded collections; loading a loaded one is a no-op.
            self._client.load_collection(self.collection, timeout=self._timeout)

    def _create(self) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("item_id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
        for name in _TEXT_FIELDS:
            schema.add_field(name, DataType.VARCHAR, max_length=TEXT_MAX_BYTES)
        schema.add_field("attributes", DataType.JSON)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=self._dimension)
        self._client.create_collection(
            self.collection,
            schema=schema,
            index_params=self._index_params(),
            consistency_level=CONSISTENCY,
            timeout=self._timeout,
        )

    def _index_params(self) -> Any:
        params = self._client.prepare_index_params()
        params.add_index(
            field_name=VECTOR, index_name=VECTOR, index_type=self.index_type, metric_type=METRIC
        )
        return params

    # -- reads ---------------------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        return self._dimension

    def __len__(self) -> int:
        """Live items: count(*) honours deletes (the collection's row_count statistic does not)."""
        with self._call("count"):
            rows = self._client.query(
                self.collection,
                filter="",
                output_fields=["count(*)"],
                consistency_level=CONSISTENCY,
                timeout=self._timeout,
            )
        return int(rows[0]["count(*)"])

    def search(
        self,
        vector: np.ndarray,
        top_k: int,
        exclude: frozenset[str] = frozenset(),
        categories: frozenset[str] = frozenset(),
        with_vectors: bool = False,
    ) -> list[tuple[Item, float, np.ndarray | None]]:
        """The top_k items by inner product with `vector`, best first, among those in
        `categories` (any when empty) and not in `exclude`; filters run inside Milvus."""
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidInput(f"top_k: {top_k} is outside 1..{MAX_TOP_K}")
        query = self._vectors(np.asarray(vector)[None, :], "vector")[0]
        clauses = []
        if categories:
            clauses.append(f"category in {_string_list(sorted(categories))}")
        if exclude:
            clauses.append(f"item_id not in {_string_list(sorted(exclude))}")
        with self._call("search"):
            results = self._client.search(
                self.collection,
                data=[query.tolist()],
                anns_field=VECTOR,
                filter=" and ".join(clauses),
                limit=top_k,
                output_fields=_OUTPUT + ([VECTOR] if with_vectors else []),
                search_params=self._search_params,
                consistency_level=CONSISTENCY,
                timeout=self._timeout,
            )
        hits = []
        for hit in results[0]:
            entity = hit["entity"]
            found = np.asarray(entity[VECTOR], np.float32) if with_vectors else None
            hits.append((_item(entity), float(hit["distance"]), found))
        return hits

    def lexical_search(
        self,
        text: str,
        top_k: int,
        exclude: frozenset[str] = frozenset(),
        categories: frozenset[str] = frozenset(),
        with_vectors: bool = False,
    ) -> Found:
        """No lexical retrieval on this backend yet (docs/architecture.md, "Hybrid retrieval"):
        searches stay dense-only."""
        return []

    def lexical_scores(self, text: str, item_ids: Sequence[str]) -> list[float | None]:
        return [None] * len(item_ids)

    def get(self, item_ids: Sequence[str]) -> tuple[list[tuple[Item, np.ndarray]], list[str]]:
        """The known items with their vectors in request order, and the ids not found."""
        rows = self._rows(item_ids, [*_OUTPUT, VECTOR], "get")
        found, missing = [], []
        for item_id in item_ids:
            row = rows.get(item_id)
            if row is None:
                missing.append(item_id)
            else:
                found.append((_item(row), np.asarray(row[VECTOR], np.float32)))
        return found, missing

    def _rows(self, item_ids: Sequence[str], fields: list[str], op: str) -> dict[str, Any]:
        """The stored rows of the ids, by id. Built from our own escaped expression: pymilvus's
        get/delete by ids quote string ids without escaping them."""
        rows: dict[str, Any] = {}
        unique = list(dict.fromkeys(item_ids))
        with self._call(op):
            for start in range(0, len(unique), IDS_PER_EXPRESSION):
                chunk = unique[start : start + IDS_PER_EXPRESSION]
                for row in self._client.query(
                    self.collection,
                    filter=f"item_id in {_string_list(chunk)}",
                    output_fields=fields,
                    consistency_level=CONSISTENCY,
                    timeout=self._timeout,
                ):
                    rows[str(row["item_id"])] = row
        return rows

    # -- writes --------------------------------------------------------------------------------

    def load(self, items: Sequence[Item], vectors: np.ndarray, batch: int = LOAD_BATCH) -> None:
        """Upserts a catalog in batches of `batch` rows (a bundle version's catalog at start-up);
        idempotent, so a load that failed half-way can simply run again."""
        if batch < 1:
            raise InvalidInput(f"batch: {batch}, must be at least 1")
        self._write(items, vectors, batch, "load")
        with self._call("load"):
            # Seals what was written so the engine indexes it: until then Milvus searches growing
            # segments by brute force, and Milvus Lite its memtable (~300 ms a search at 10k x
            # 384, ~7 ms once flushed). Only here: frequent flushes make tiny segments.
            self._client.flush(self.collection, timeout=self._timeout)

    def upsert(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        """Inserts the items or replaces those with the same ids (item and vector); visible to the
        next search once this returns. Not atomic across batches of LOAD_BATCH rows."""
        self._write(items, vectors, LOAD_BATCH, "upsert")

    def _write(self, items: Sequence[Item], vectors: np.ndarray, batch: int, op: str) -> None:
        rows = self._prepared(items, vectors)
        with self._call(op):
            for start in range(0, len(rows), batch):
                self._client.upsert(
                    self.collection, rows[start : start + batch], timeout=self._timeout
                )

    def delete(self, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Deletes the items; returns (deleted ids, ids that were not present), as ItemStore."""
        present = self._rows(item_ids, ["item_id"], "delete")
        deleted, missing = [], []
        for item_id in item_ids:
            # A repeated id counts as deleted once and missing after, as in ItemStore.
            if present.pop(item_id, None) is None:
                missing.append(item_id)
            else:
                deleted.append(item_id)
        with self._call("delete"):
            # Milvus reports how many ids were asked for, not found: hence the query above.
            for start in range(0, len(deleted), IDS_PER_EXPRESSION):
                chunk = deleted[start : start + IDS_PER_EXPRESSION]
                self._client.delete(
                    self.collection,
                    filter=f"item_id in {_string_list(chunk)}",
                    timeout=self._timeout,
                )
        return deleted, missing

    def _prepared(self, items: Sequence[Item], vectors: np.ndarray) -> list[dict[str, Any]]:
        """Validated rows, one per id (the last of a repeated id wins, as in ItemStore)."""
        matrix = self._vectors(vectors, "vectors")
        if len(items) != len(matrix):
            raise InvalidInput(f"{len(items)} items but {len(matrix)} vectors")
        rows: dict[str, dict[str, Any]] = {}
        for item, row in zip(items, matrix, strict=True):
            _check_bytes("item_id", item.item_id, item.item_id, ID_MAX_BYTES)
            if not item.item_id:
                raise InvalidInput("item_id: empty")
            for name in _TEXT_FIELDS:
                _check_bytes(name, getattr(item, name), item.item_id, TEXT_MAX_BYTES)
            attributes = dict(item.attributes)
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()):
                raise InvalidInput(f"attributes of {item.item_id!r}: keys and values must be text")
            rows.pop(item.item_id, None)  # re-insert so the batch keeps the last one's position
            rows[item.item_id] = {
                "item_id": item.item_id,
                "title": item.title,
                "description": item.description,
                "category": item.category,
                "attributes": attributes,
                VECTOR: row.tolist(),
            }
        return list(rows.values())

    def _vectors(self, vectors: np.ndarray, field: str) -> np.ndarray:
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self._dimension:
            raise InvalidInput(
                f"{field}: expected rows of {self._dimension} floats, got shape {matrix.shape}"
            )
        if not np.isfinite(matrix).all():
            raise InvalidInput(f"{field}: contains NaN or infinity")
        return matrix

    # -- lifecycle -----------------------------------------------------------------------------

    def loaded_from(self) -> str | None:
        """The bundle version whose catalog a completed `load` put here (None: not loaded yet,
        or a load that did not finish)."""
        with self._call("describe"):
            described = self._client.describe_collection(self.collection, timeout=self._timeout)
        value = (described.get("properties") or {}).get(LOADED_PROPERTY)
        return None if value is None else str(value)

    def mark_loaded(self, version: str) -> None:
        """Records that `version`'s catalog is fully loaded: replicas opening it later skip the
        load (a collection property, so it is set only after every batch is in)."""
        with self._call("mark loaded"):
            self._client.alter_collection_properties(
                self.collection, properties={LOADED_PROPERTY: version}, timeout=self._timeout
            )

    def info(self) -> dict[str, Any]:
        """What /info reports: where the catalog is (without credentials), its index and size;
        `index_factory` and `device` as GetIndexInfo shows them."""
        return {
            "index_factory": f"milvus {self.index_type} {self.collection} at {redacted(self._uri)}",
            "device": "milvus",
            "backend": "milvus",
            "uri": redacted(self._uri),
            "collection": self.collection,
            "index_type": self.index_type,
            "metric": METRIC,
            "dimension": self._dimension,
            "size": len(self),
            "lexical": "none",
        }

    def close(self) -> None:
        """Closes the client (an in-process Milvus Lite keeps running for the process)."""
        self._client.close()

    def drop(self) -> None:
        """Drops the collection and everything in it (tests, rolling back a load)."""
        with self._call("drop"):
            self._client.drop_collection(self.collection, timeout=self._timeout)

    @contextmanager
    def _call(self, op: str) -> Iterator[None]:
        with _engine(op, redacted(self._uri), self.collection):
            yield


@contextmanager
def _engine(op: str, uri: str, collection: str) -> Iterator[None]:
    """Turns the client's and gRPC's failures into MilvusUnavailable, in one line."""
    try:
        yield
    except (MilvusException, grpc.RpcError) as exc:
        raise MilvusUnavailable(
            f"milvus {op} on collection {collection!r} at {uri} failed: {first_line(exc)}"
        ) from exc


def _client(uri: str, token: str, timeout: float, collection: str) -> MilvusClient:
    """A connected client; a failed first attempt is tried once more, because gRPC shares one
    connection among the clients of a target and the server may just have closed it (GOAWAY):
    the next attempt dials anew."""
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            with _engine("connect", redacted(uri), collection):
                return MilvusClient(
                    uri=uri, token=token, timeout=timeout, grpc_options=_grpc_options(uri)
                )
        except MilvusUnavailable:
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
            time.sleep(CONNECT_RETRY_S)
    raise AssertionError("unreachable")


def _grpc_options(uri: str) -> dict[str, Any]:
    """pymilvus pings every 10 s even with no call in flight. A Milvus server permits that;
    Milvus Lite's in-process server keeps gRPC's default (no pings without data more often than
    every 5 min), answers GOAWAY "too many pings", and the next call on that connection fails
    UNAVAILABLE. So towards a Lite file, ping only while calls are in flight."""
    return {"grpc.keepalive_permit_without_calls": 0} if uri.endswith(".db") else {}


def _string_list(values: Sequence[str]) -> str:
    """A Milvus expression list of string literals: `["a", "b\\"c"]`."""
    return "[" + ", ".join(_string_literal(v) for v in values) + "]"


def _string_literal(value: str) -> str:
    """A double-quoted literal that reads back as `value`. Only the escapes that Milvus (Go's
    strconv rules) and Milvus Lite both accept; a raw newline would end the literal there."""
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def _check_bytes(field: str, value: str, item_id: str, limit: int) -> None:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 form, gRPC cannot send it
        raise InvalidInput(f"{field} of {item_id[:64]!r}: not valid Unicode text") from exc
    if size > limit:
        raise InvalidInput(f"{field} of {item_id[:64]!r}: {size} bytes, limit {limit}")


def _item(row: dict[str, Any]) -> Item:
    attributes = row.get("attributes") or {}
    return Item(
        item_id=str(row["item_id"]),
        title=str(row["title"]),
        description=str(row["description"]),
        category=str(row["category"]),
        attributes={str(k): str(v) for k, v in attributes.items()},
    )


def _schema_mismatch(described: dict[str, Any], dimension: int) -> str:
    """How an existing collection differs from ours (field names, types, lengths, dimension,
    primary key), or "" when it matches."""
    expected: dict[str, tuple[DataType, dict[str, int]]] = {
        "item_id": (DataType.VARCHAR, {"max_length": ID_MAX_BYTES}),
        **{name: (DataType.VARCHAR, {"max_length": TEXT_MAX_BYTES}) for name in _TEXT_FIELDS},
        "attributes": (DataType.JSON, {}),
        VECTOR: (DataType.FLOAT_VECTOR, {"dim": dimension}),
    }
    fields = {str(f["name"]): f for f in described.get("fields", [])}
    if set(fields) != set(expected):
        return f"fields {sorted(fields)}, expected {sorted(expected)}"
    for name, (kind, params) in expected.items():
        field = fields[name]
        if field.get("type") != kind:
            return f"field {name} is {field.get('type')!r}, expected {kind.name}"
        for key, value in params.items():
            have = field.get("params", {}).get(key)
            if have is None or int(have) != value:
                return f"field {name} has {key} {have}, expected {value}"
    primary = [name for name, f in fields.items() if f.get("is_primary")]
    if primary != ["item_id"] or described.get("auto_id"):
        return f"primary key {primary} (auto_id {described.get('auto_id')}), expected item_id"
    return ""
