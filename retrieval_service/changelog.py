"""The shared catalog change log on PostgreSQL: every acknowledged upsert and delete, in commit
order, for every retrieval replica to apply from its bundle version's position and then tail.

Tables (created when missing, in the URL's database):
- `<table>`: `position bigint` primary key, `op`, the change `record` (jsonb, the local journal's
  record format: see retrieval_service.changes) and `created_at`;
- `<table>_meta`: one row, the log's random id, so a bundle built from one log is never replayed
  against another, and `trimmed_through`, the last position `trim` deleted, so a version that
  would need deleted records refuses to load.

Writers take a transaction-scoped advisory lock before drawing the next position and hold it to
commit, so positions become visible in increasing order: a reader that has seen position P has
seen every position below P that will ever commit. Each commit notifies channel `<table>`;
readers also poll, so a missed notification only delays a change by `poll_s`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from recsys.core.bundle import Bundle
from recsys.core.errors import InvalidInput, NotReady, first_line
from recsys.core.urls import redacted
from retrieval_service.changes import Change, from_record, to_record

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TABLE = "catalog_changes"
# Records a replica reads and applies in one step while catching up.
READ_PAGE = 1000


@dataclass(frozen=True)
class LogRecord:
    """One committed write: its position and its changes."""

    position: int
    changes: list[Change]


class ChangeLog:
    """A PostgreSQL change log: append under the ordering lock, read after a position, wait for
    notifications. Each use opens its connection again after a failure; thread-safe."""

    def __init__(
        self, url: str, table: str = DEFAULT_TABLE, connect_timeout_s: float = 5.0
    ) -> None:
        if not table.isidentifier():
            raise InvalidInput(f"change_log_table {table!r}: must be a plain SQL identifier")
        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise InvalidInput(
                f"change_log_url: not a PostgreSQL URL ({first_line(exc)})"
            ) from None
        self.url = url
        self.table = table
        self.connect_timeout_s = connect_timeout_s
        self.name = f"{redacted(url)} table {table}"
        self._table = sql.Identifier(table)
        self._meta = sql.Identifier(f"{table}_meta")
        self._locks = {role: threading.Lock() for role in ("write", "read", "listen")}
        self._connections: dict[str, psycopg.Connection[Any] | None] = dict.fromkeys(self._locks)
        self.log_id = self._create()

    # -- writing -------------------------------------------------------------------------------

    def append(self, changes: Sequence[Change]) -> int:
        """Commits one write's changes as one record and returns its position; raises NotReady
        (nothing acknowledged) when the server cannot be reached or the commit fails."""
        record = to_record(changes)
        query = sql.SQL(
            "INSERT INTO {} (position, op, record) VALUES (nextval({}), %s, %s) RETURNING position"
        ).format(self._table, sql.Literal(f"{self.table}_position_seq"))

        def insert(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
                row = conn.execute(query, (record["op"], Jsonb(record))).fetchone()
                assert row is not None
                conn.execute("SELECT pg_notify(%s, %s)", (self.table, str(row[0])))
            return int(row[0])

        return self._call("write", insert)

    # -- reading -------------------------------------------------------------------------------

    def read_after(self, position: int, limit: int = READ_PAGE) -> list[LogRecord]:
        """Up to `limit` records after `position`, oldest first; DataLoss (nothing returned)
        when one of them is corrupt."""
        query = sql.SQL(
            "SELECT position, record FROM {} WHERE position > %s ORDER BY position LIMIT %s"
        ).format(self._table)
        rows = self._call("read", lambda conn: conn.execute(query, (position, limit)).fetchall())
        return [
            LogRecord(int(p), from_record(r, f"change log {self.name} position {p}"))
            for p, r in rows
        ]

    def head(self) -> int:
        """The newest committed position (0 for an empty log; never below a trim's floor)."""
        query = sql.SQL(
            "SELECT greatest(coalesce(max(position), 0), (SELECT trimmed_through FROM {})) FROM {}"
        ).format(self._meta, self._table)
        row = self._call("read", lambda conn: conn.execute(query).fetchone())
        return int(row[0]) if row else 0

    def trimmed_through(self) -> int:
        """The last position `trim` deleted (0: nothing was)."""
        query = sql.SQL("SELECT trimmed_through FROM {}").format(self._meta)
        row = self._call("read", lambda conn: conn.execute(query).fetchone())
        return int(row[0]) if row else 0

    def trim(self, through: int) -> int:
        """Deletes the records up to `through` (never beyond the head) and records the floor in
        the same transaction; returns how many were deleted."""

        def delete(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
                conn.execute(
                    sql.SQL("UPDATE {} SET trimmed_through = greatest(trimmed_through, %s)").format(
                        self._meta
                    ),
                    (through,),
                )
                cursor = conn.execute(
                    sql.SQL("DELETE FROM {} WHERE position <= %s").format(self._table), (through,)
                )
                return int(cursor.rowcount)

        head = self.head()
        if through > head:
            raise InvalidInput(f"--through {through}: beyond the log's head, position {head}")
        return self._call("write", delete)

    def wait(self, timeout_s: float) -> bool:
        """Blocks until a change is committed or `timeout_s` passes; True when notified."""

        def notified(conn: psycopg.Connection[Any]) -> bool:
            return any(True for _ in conn.notifies(timeout=timeout_s, stop_after=1))

        return self._call("listen", notified)

    def close(self) -> None:
        for role, lock in self._locks.items():
            with lock:
                conn, self._connections[role] = self._connections[role], None
            if conn is not None:
                conn.close()

    # -- connections ---------------------------------------------------------------------------

    def _call(self, role: str, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`work` on the role's connection. A connection left from before may have been cut
        (a server restart): that failure is tried once more on a new connection. Any other
        failure drops the connection and becomes NotReady naming the log."""
        with self._locks[role]:
            reused = self._connections[role] is not None
            try:
                return work(self._open(role))
            except psycopg.Error as exc:
                self._drop(role)
                if not reused:
                    raise NotReady(f"change log {self.name}: {first_line(exc)}") from None
            try:
                return work(self._open(role))
            except psycopg.Error as exc:
                self._drop(role)
                raise NotReady(f"change log {self.name}: {first_line(exc)}") from None

    def _open(self, role: str) -> psycopg.Connection[Any]:
        conn = self._connections[role]
        if conn is None or conn.closed:
            conn = self._connections[role] = self._connect()
            if role == "listen":
                conn.execute(sql.SQL("LISTEN {}").format(self._table))
        return conn

    def _drop(self, role: str) -> None:
        conn, self._connections[role] = self._connections[role], None
        if conn is not None:
            conn.close()

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            make_conninfo(self.url, connect_timeout=max(1, round(self.connect_timeout_s))),
            autocommit=True,
            application_name="recsys-retrieval",
        )

    def _create(self) -> str:
        """Creates the tables and the log's id when missing (once, under the ordering lock);
        returns the id."""

        def create(conn: psycopg.Connection[Any]) -> str:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
                conn.execute(
                    sql.SQL(
                        "CREATE SEQUENCE IF NOT EXISTS {seq};"
                        "CREATE TABLE IF NOT EXISTS {table} ("
                        " position bigint PRIMARY KEY,"
                        " op text NOT NULL CHECK (op IN ('upsert', 'delete')),"
                        " record jsonb NOT NULL,"
                        " created_at timestamptz NOT NULL DEFAULT now());"
                        "CREATE TABLE IF NOT EXISTS {meta} (log_id text PRIMARY KEY);"
                        "ALTER TABLE {meta}"
                        " ADD COLUMN IF NOT EXISTS trimmed_through bigint NOT NULL DEFAULT 0;"
                        "INSERT INTO {meta} SELECT gen_random_uuid()::text"
                        " WHERE NOT EXISTS (SELECT 1 FROM {meta})"
                    ).format(
                        seq=sql.Identifier(f"{self.table}_position_seq"),
                        table=self._table,
                        meta=self._meta,
                    )
                )
                row = conn.execute(sql.SQL("SELECT log_id FROM {}").format(self._meta)).fetchone()
            assert row is not None
            return str(row[0])

        return self._call("write", create)


def start_position(bundle: Bundle, log: ChangeLog) -> int:
    """Where a bundle version's replay of the log starts: the position `recsys build` read it
    to, or 0 (every change) for a version built without it."""
    built = bundle.manifest.get("change_log")
    position = 0
    if built:
        if built.get("log_id") != log.log_id:
            raise InvalidInput(
                f"bundle {bundle.version}: built from change log {built.get('name')} "
                f"(id {built.get('log_id')}), but change_log_url names {log.name} (id {log.log_id})"
            )
        position = int(built["position"])
    trimmed = log.trimmed_through()
    if position < trimmed:
        raise InvalidInput(
            f"bundle {bundle.version}: needs change log {log.name} from position {position}, but "
            f"it is trimmed through {trimmed}; rebuild it with `recsys build --change-log`"
        )
    return position


def read_through(log: ChangeLog) -> tuple[int, list[LogRecord]]:
    """The log's head position and every record up to it, for a build that starts there."""
    head = log.head()
    records: list[LogRecord] = []
    while (after := records[-1].position if records else 0) < head:
        page = [r for r in log.read_after(after) if r.position <= head]
        if not page:
            break
        records += page
    return head, records
