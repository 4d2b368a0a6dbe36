"""One redaction for every connection string shown: the change log's PostgreSQL URL (manifests,
logs, GetIndexInfo) and the Milvus endpoint (/info, errors)."""

from __future__ import annotations

import pytest

from recsys.core.urls import redacted


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # PostgreSQL: the role stays, the password and the parameters go.
        ("postgresql://recsys:s3cret@db:5432/catalog", "postgresql://recsys@db:5432/catalog"),
        (
            "postgres://recsys@db/catalog?sslmode=require&password=x",
            "postgresql://recsys@db/catalog",
        ),
        ("postgresql://u%40corp:p%3Aw@db/c", "postgresql://u@corp@db/c"),
        (
            "host=db port=5433 dbname=catalog user=recsys password=s3cret",
            "postgresql://recsys@db:5433/catalog",
        ),
        ("password=s3cret host", "<unparsable PostgreSQL URL>"),
        # Milvus: user, password and query go (a token may ride in any of them).
        (
            "https://root:s3cret@milvus.internal:19530/prod?token=t",
            "https://milvus.internal:19530/prod",
        ),
        ("http://milvus:19530", "http://milvus:19530"),
        # A Milvus Lite file is shown as it is.
        ("/var/lib/recsys/catalog.db", "/var/lib/recsys/catalog.db"),
        ("./catalog.db", "./catalog.db"),
    ],
)
def test_redacted_shows_where_without_credentials(url: str, shown: str) -> None:
    assert redacted(url) == shown
