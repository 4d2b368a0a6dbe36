"""The one settings object per process: every port, address and limit, from flags or RECSYS_* env."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recsys.core.scoring import RRF_K

Device = Literal["auto", "cpu", "cuda"]

HEALTH_PORT = (
    "Extra plaintext port serving only grpc.health.v1, for probes that cannot present a client "
    "certificate (kubelet); health is always served on the gRPC port too. 0: none."
)


class Settings(BaseSettings):
    """Runtime settings; each field reads RECSYS_<NAME> (e.g. RECSYS_GATEWAY_PORT)."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore", frozen=True)

    # Artifacts
    bundle: Path | None = Field(None, description="Bundle root (the directory holding CURRENT).")
    state_dir: Path | None = Field(
        None,
        description="Where retrieval keeps online upserts/deletes (snapshot + journal), applied "
        "over whichever bundle version it loads; one per retrieval process (default BUNDLE/state).",
    )
    device: Device = Field("auto", description="Model/index device: auto, cpu or cuda.")
    bundle_poll_s: float = Field(
        10.0,
        ge=0,
        description="Retrieval and ranking read BUNDLE/CURRENT this often and switch to a new "
        "version without a restart: loaded beside the live one, then swapped (0: off, the "
        "version loaded at start serves until a restart).",
    )
    bundle_keep_previous_s: float = Field(
        120.0,
        ge=0,
        description="After a switch, the previous version stays loaded this long (twice the "
        "memory) to answer requests the gateway pins to it, so an answer never mixes versions "
        "while the other service is still switching; then it is closed once idle.",
    )

    # Network
    host: str = Field("0.0.0.0", description="Address every server binds.")
    gateway_port: int = 50051
    retrieval_port: int = 50052
    ranking_port: int = 50053
    gateway_metrics_port: int = 9091
    retrieval_metrics_port: int = 9092
    ranking_metrics_port: int = 9093
    gateway_health_port: int = Field(0, ge=0, description=HEALTH_PORT)
    retrieval_health_port: int = Field(0, ge=0, description=HEALTH_PORT)
    ranking_health_port: int = Field(0, ge=0, description=HEALTH_PORT)
    retrieval_address: str = Field("localhost:50052", description="Gateway → retrieval target.")
    ranking_address: str = Field("localhost:50053", description="Gateway → ranking target.")

    # Transport security (docs/operations.md, "Security"). Off by default: plaintext.
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate chain this process presents: as a server, and as a client "
        "of the other services. Setting it (with tls_key_file) turns TLS on; the files are "
        "re-read when they change.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle trusted for peers: servers verify client certificates with it, "
        "clients verify servers with it (unset: clients use the system roots).",
    )
    tls_client_auth: bool = Field(
        True,
        description="With TLS on, servers refuse connections without a client certificate signed "
        "by tls_ca_file (mTLS). false: server-side TLS only.",
    )
    tls_server_name: str | None = Field(
        None,
        description="Name clients expect in servers' certificates instead of the target's host "
        "(e.g. when dialing a pod through a port-forward).",
    )
    write_identities: str = Field(
        "",
        description="Comma-separated identities allowed to call UpsertItems/DeleteItems: a client "
        "certificate's CN or a SAN, or a NAME from write_tokens_file. Empty, with no "
        "write_tokens_file: writes are open to anyone who can connect.",
    )
    write_tokens_file: Path | None = Field(
        None,
        description="File of NAME:TOKEN lines (re-read when it changes): a caller without a client "
        "certificate authenticates with `authorization: Bearer TOKEN` metadata as NAME.",
    )

    # Server limits
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_concurrent_rpcs: int = Field(64, ge=1, description="Beyond this: RESOURCE_EXHAUSTED.")
    grace_period_s: float = Field(10.0, ge=0, description="Drain time after SIGTERM/SIGINT.")
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM/SIGINT, keep answering this long with health NOT_SERVING "
        "before refusing new RPCs, so load balancers that watch health stop routing here first "
        "(Kubernetes' preStop sleep does this job in deploy/k8s).",
    )
    max_connection_age_s: float = Field(
        300.0, ge=0, description="Clients reconnect after this, so new pods get traffic."
    )

    # Request limits
    max_k: int = Field(1000, ge=1)
    default_k: int = Field(10, ge=1)
    max_candidate_pool: int = Field(1000, ge=1)
    default_candidate_pool: int = Field(100, ge=1)
    max_text_chars: int = Field(2000, ge=1)
    max_history_items: int = Field(100, ge=1)
    max_upsert_items: int = Field(1000, ge=1)

    # Retrieval
    history_half_life: float = Field(
        5.0, gt=0, description="Recency weighting of history: weight halves every N items."
    )
    history_weight: float = Field(
        1.0, ge=0, description="Weight of the history vector when mixed with a text query."
    )
    lexical_retrieval: bool = Field(
        True,
        description="A search with query text also retrieves lexically (BM25 over item text) "
        "and merges both lists by reciprocal rank fusion; false: dense only.",
    )
    hybrid_rrf_k: int = Field(
        RRF_K, ge=1, description="Reciprocal rank fusion's k: a hit at rank r adds 1 / (k + r)."
    )
    change_log_url: str = Field(
        "",
        description="PostgreSQL URL (postgresql://USER@HOST:PORT/DB; password from the URL, "
        "PGPASSWORD or PGPASSFILE) of the catalog change log shared by every retrieval replica: "
        "writes are committed there before they are acknowledged and every replica applies them "
        "in order. Empty: the local journal in state_dir, for one replica.",
    )
    change_log_table: str = Field(
        "catalog_changes", description="Table of the change log (one per catalog)."
    )
    change_log_poll_s: float = Field(
        1.0,
        gt=0,
        description="Replicas read the change log this often besides when notified of a change "
        "(a notification lost while reconnecting delays a change at most this long).",
    )
    retrieval_backend: Literal["faiss", "milvus"] = Field(
        "faiss",
        description="Where retrieval keeps each bundle version's items and vectors: faiss (in "
        "this process's memory or GPU) or milvus (a Milvus cluster: sharded, replicated; "
        "replicas hold no catalog state).",
    )
    milvus_uri: str = Field(
        "",
        description="Milvus endpoint (http://HOST:19530) for retrieval_backend=milvus, or a Milvus "
        "Lite file (*.db, one process only).",
    )
    milvus_token_file: Path | None = Field(
        None, description="File holding the Milvus token (USER:PASSWORD or an API key)."
    )
    milvus_collection_prefix: str = Field(
        "recsys",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Each bundle version lives in collection PREFIX_<version>, filled from the "
        "bundle by the first replica that opens it.",
    )
    milvus_index_type: str = Field(
        "AUTOINDEX",
        description="Milvus vector index of new collections (AUTOINDEX, HNSW, IVF_FLAT, FLAT, "
        "GPU_CAGRA, ...).",
    )
    journal_compact_records: int = Field(
        5000,
        ge=1,
        description="Journal records after which retrieval folds its online changes into the "
        "state dir's snapshot and starts a new journal: start-up replays at most this many.",
    )

    # Ranking (dynamic batching)
    rank_max_batch_pairs: int = Field(64, ge=1)
    rank_max_wait_ms: float = Field(5.0, ge=0)
    rank_max_batch_tokens: int = Field(
        4096,
        ge=1,
        description="Tokens per cross-encoder forward pass (pairs x longest pair): batches are "
        "length-sorted and cut at this budget, so short pairs are not padded to long ones.",
    )
    rank_max_queue_pairs: int = Field(8192, ge=1, description="Beyond this: RESOURCE_EXHAUSTED.")
    rerank_depth: int | None = Field(
        None,
        ge=0,
        description="The cross-encoder rescores this many of the first pass's best candidates "
        "(default: the depth the bundle's validation sweep chose; 0 turns it off).",
    )
    cross_encoder_copy: Literal["bundle", "fp32", "int8", "student", "student_int8"] = Field(
        "bundle",
        description="Which copy of the cross-encoder serves: the fastest one the bundle "
        "validated against the fine-tuned model's NDCG (bundle), or one by name. On CUDA the "
        "int8 copies give way to their PyTorch model in half precision.",
    )
    rank_threads: int = Field(
        0, ge=0, description="Threads per cross-encoder forward pass (0: every core)."
    )
    rerank_kinds: Literal["validated", "all"] = Field(
        "validated",
        description="Request kinds the cross-encoder reranks: those where it raised the "
        "bundle's validation NDCG (validated), or searches and recommendations alike (all).",
    )

    # Gateway
    default_budget_ms: float = Field(
        2000.0, gt=0, description="Deadline applied when the caller sets none."
    )
    ranking_budget_fraction: float = Field(
        0.8, gt=0, le=1, description="Share of the remaining budget ranking may use."
    )
    cf_candidate_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of the candidate pool CF fills for requests without a query.",
    )
    new_item_slot: int = Field(
        5,
        ge=0,
        description="Position (from 1) in a recommendation's answer (a history, no query) kept "
        "for the new product nearest the history's most recent item, one no interaction of the "
        "bundle had, when ranking placed it lower and their cosine is at least "
        "new_item_min_similarity; 0: never asked for.",
    )
    new_item_min_similarity: float = Field(
        0.75,
        ge=-1,
        le=1,
        description="Cosine to the most recent item below which the new product keeps no "
        "position (it may still rank on its own scores).",
    )
    new_item_lead_similarity: float = Field(
        0.88,
        ge=-1,
        description="Cosine to the most recent item from which the new product leads the "
        "answer (position 1) instead; above 1: never.",
    )

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _tls_files_in_pairs(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: set both or neither")
        if self.tls_cert_file is not None and self.tls_client_auth and self.tls_ca_file is None:
            raise ValueError(
                "tls_ca_file: required to verify client certificates (or set tls_client_auth=false)"
            )
        return self

    def tls_enabled(self) -> bool:
        """Whether servers listen with TLS and clients dial with it."""
        return self.tls_cert_file is not None

    def health_port(self, service: str) -> int:
        """The plaintext health-only port of `service` (0: none)."""
        return int(getattr(self, f"{service}_health_port"))

    @classmethod
    def built_in(cls, **values: Any) -> Settings:
        """The built-in defaults with `values`, ignoring RECSYS_* variables: offline jobs (build,
        evaluation) take their inputs from their options, never from the environment."""
        return cls.model_construct(**values)

    @model_validator(mode="after")
    def _milvus_needs_a_uri(self) -> Settings:
        if self.retrieval_backend == "milvus" and not self.milvus_uri:
            raise ValueError("milvus_uri: required with retrieval_backend=milvus")
        return self

    def state_path(self) -> Path:
        """Directory of retrieval's durable online changes (snapshot and journal)."""
        if self.state_dir is not None:
            return self.state_dir
        if self.bundle is None:
            raise ValueError("bundle is not set")
        return self.bundle / "state"

    def limits(self) -> dict[str, object]:
        """The enforced limits, for the start-up log line."""
        names = [n for n in type(self).model_fields if n.startswith(("max_", "default_", "rank_"))]
        return {n: getattr(self, n) for n in names}


def default(name: str) -> Any:
    """A setting's built-in default (not the environment's value): for offline code's defaults."""
    return Settings.model_fields[name].default
