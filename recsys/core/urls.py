"""Connection strings made fit to show in logs, metrics, manifests and GetIndexInfo: the one
place that decides what of a URL is a secret."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})
# libpq's other form, `host=... dbname=... password=...`: starts with a keyword and `=`.
_CONNINFO = re.compile(r"^\s*[A-Za-z_]+\s*=")


def redacted(url: str) -> str:
    """`url` without its credentials:

    - a PostgreSQL URL or key=value conninfo: `postgresql://USER@HOST:PORT/DB`, the user kept
      (it names the role), the password and every other parameter dropped;
    - any other URL (a Milvus endpoint): `SCHEME://HOST:PORT/PATH`, without user, password,
      query or fragment (a token may ride in any of them);
    - anything else, such as a Milvus Lite file path: unchanged.
    """
    parts = urlsplit(url)
    if parts.scheme in _POSTGRES_SCHEMES or (not parts.scheme and _CONNINFO.match(url)):
        return _postgres(url)
    if not parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _postgres(url: str) -> str:
    """Parsed as libpq does (percent escapes, query parameters such as `?host=`), by psycopg:
    imported here, so the ground floor loads no database driver until a URL needs it."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable PostgreSQL URL>"
    host, port, db = params.get("host", ""), params.get("port", ""), params.get("dbname", "")
    user = f"{params['user']}@" if params.get("user") else ""
    return f"postgresql://{user}{host}{':' + str(port) if port else ''}/{db}"
