"""The shared change log on a real PostgreSQL: commit order is position order, notifications
wake followers, a crash of the server loses nothing acknowledged, and retrievers that follow one
log converge on the same catalog."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import grpc
import pandas as pd
import psycopg
import pytest
from prometheus_client import REGISTRY

from recsys.core.bundle import Bundle, publish, staged_version, write_manifest
from recsys.core.errors import DataLoss, InvalidInput, NotReady
from recsys.rpc.status import status_code
from retrieval_service.backends import CatalogOpener, FaissCatalog
from retrieval_service.changelog import ChangeLog, read_through, start_position
from retrieval_service.changes import deletes
from retrieval_service.durability import SharedLog
from retrieval_service.retriever import Retriever
from tests.postgres import PostgresServer
from tests.retrieval.conftest import write_retrieval_version
from tests.retrieval.test_changes import DELETE_LINE, ECLAIR, UPSERT_LINE
from tests.retrieval.test_state import FLOOR_LAMP, KAYAK, TELESCOPE, state_of, top


@pytest.fixture(scope="module")
def v1(catalog: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return write_retrieval_version(tmp_path_factory.mktemp("bundle"), catalog, "v1")


def built_at(root: Path, version: str, source: Bundle, log: ChangeLog, position: int) -> Bundle:
    """A copy of `source` (files linked) whose manifest says it was built from `log` through
    `position`, as `recsys build --change-log` records it (a real build also folds those
    changes into its catalog), published under ROOT."""
    manifest = dict(source.manifest)
    manifest["change_log"] = {"log_id": log.log_id, "position": position, "name": log.name}
    with staged_version(root, version) as stage:
        for path in source.path.iterdir():
            if path.name != "manifest.json":
                (stage / path.name).symlink_to(path)
        write_manifest(stage, {**manifest, "version": version})
    publish(root, version)
    return Bundle.open(root, version)


def follow(bundle: Bundle, log: ChangeLog, backend: CatalogOpener = FaissCatalog.open) -> Retriever:
    return Retriever.load(bundle, None, device="cpu", change_log=log, backend=backend)


def log_of(retriever: Retriever) -> ChangeLog:
    assert isinstance(retriever.durability, SharedLog)
    return retriever.durability.log


def test_positions_increase_and_reads_return_records_in_order(change_log_url: str) -> None:
    log = ChangeLog(change_log_url)
    positions = [log.append(deletes([f"id-{n}"])) for n in range(5)]
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert log.head() == positions[-1]
    records = log.read_after(positions[1])
    assert [r.position for r in records] == positions[2:]
    assert [r.changes for r in records] == [deletes([f"id-{n}"]) for n in (2, 3, 4)]
    assert log.read_after(positions[-1]) == []
    # Opening the log again (another replica) finds the same tables and the same log id.
    again = ChangeLog(change_log_url)
    assert again.log_id == log.log_id and again.head() == positions[-1]


def test_a_reader_tailing_concurrent_writers_never_skips_a_position(change_log_url: str) -> None:
    """Four writers commit while a reader pages through; because positions become visible in
    order, a reader that moved past a position never meets it later."""
    log = ChangeLog(change_log_url)
    acknowledged: list[int] = []
    guard = threading.Lock()

    def write(writer: int) -> None:
        own = ChangeLog(change_log_url)  # a replica of its own: its own connections
        for n in range(40):
            position = own.append(deletes([f"w{writer}-{n}"]))
            with guard:
                acknowledged.append(position)
        own.close()

    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in writers:
        thread.start()
    seen: list[int] = []
    while any(t.is_alive() for t in writers) or (seen[-1] if seen else 0) < log.head():
        seen += [r.position for r in log.read_after(seen[-1] if seen else 0, limit=7)]
    for thread in writers:
        thread.join()
    assert seen == sorted(acknowledged)


def test_wait_returns_when_a_change_is_committed(change_log_url: str) -> None:
    log = ChangeLog(change_log_url)
    assert log.wait(0.2) is False
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(log.wait(30)))
    waiter.start()
    ChangeLog(change_log_url).append(deletes(["x"]))
    waiter.join(timeout=30)
    assert woke == [True]


def test_a_crashed_server_loses_no_acknowledged_change(own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database("crash")
    log = ChangeLog(url)
    acknowledged = [log.append(deletes([f"before-{n}"])) for n in range(20)]
    own_postgres.kill()
    with pytest.raises(NotReady, match=r"^change log postgresql://recsys@127\.0\.0\.1:\d+/crash"):
        log.append(deletes(["during"]))
    own_postgres.start()
    acknowledged.append(log.append(deletes(["after"])))  # the same object reconnects
    records = log.read_after(0)
    assert [r.position for r in records] == acknowledged
    assert records[-1].changes == deletes(["after"])


def test_bad_urls_are_one_line_errors(postgres: PostgresServer) -> None:
    with pytest.raises(InvalidInput, match="change_log_url: not a PostgreSQL URL"):
        ChangeLog("not a url")
    with pytest.raises(InvalidInput, match="change_log_table 'a; drop'"):
        ChangeLog(postgres.url(), table="a; drop")
    with pytest.raises(NotReady, match="nosuchdb") as info:
        ChangeLog(postgres.url("nosuchdb"))
    assert "\n" not in str(info.value)


def test_retrievers_on_one_log_converge(
    v1: Bundle, change_log_url: str, backend: CatalogOpener
) -> None:
    """A write to one replica is applied by the other when it catches up (with Milvus they
    share the catalog: at once); deletes judge 'missing' on every change so far; a replica
    started later replays everything."""
    a = follow(v1, ChangeLog(change_log_url), backend)
    b = follow(v1, ChangeLog(change_log_url), backend)
    a.upsert([TELESCOPE, FLOOR_LAMP])
    assert top(a, "telescope for looking at stars") == ["new-1"]
    if backend == FaissCatalog.open:
        assert top(b, "telescope for looking at stars") != ["new-1"]
    b.catch_up()
    assert top(b, "telescope for looking at stars") == ["new-1"]
    assert b.delete(["new-1", "nope"]) == (["new-1"], ["nope"])
    assert a.delete(["new-1"]) == ([], ["new-1"])  # a catches up before it judges
    b.upsert([KAYAK])
    a.catch_up()
    late = follow(v1, ChangeLog(change_log_url), backend)
    ids = ["new-1", "new-2", "item-018"]
    assert state_of(a, ids) == state_of(b, ids) == state_of(late, ids)
    assert state_of(late, ids) == {"new-1": None, "new-2": KAYAK, "item-018": FLOOR_LAMP}
    assert a.position == b.position == late.position == log_of(late).head()
    assert late.replayed.stored_vectors == 2  # journaled vectors reused: nothing re-encoded
    assert late.info()["change_log_position"] == late.position


def test_a_bundle_built_from_the_log_replays_only_what_came_after(
    catalog: pd.DataFrame, tmp_path: Path, change_log_url: str
) -> None:
    log = ChangeLog(change_log_url)
    v1 = write_retrieval_version(tmp_path, catalog, "v1")
    writer = follow(v1, log)
    writer.upsert([TELESCOPE])
    position, records = read_through(log)
    assert position == writer.position and len(records) == 1
    writer.upsert([KAYAK])
    v2 = built_at(tmp_path, "v2", v1, log, position)
    assert start_position(v2, log) == position
    later = follow(v2, log)
    assert later.replayed.upserts == 1  # only the kayak
    assert state_of(later, ["new-1", "new-2"]) == {"new-1": None, "new-2": KAYAK}

    other = ChangeLog(change_log_url, table="other_catalog")
    with pytest.raises(
        InvalidInput, match=r"bundle v2: built from change log .* but change_log_url"
    ):
        follow(v2, other)


def test_trimming_records_a_floor_that_older_versions_cannot_load_below(
    catalog: pd.DataFrame, tmp_path: Path, change_log_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from recsys.app.cli import main

    log = ChangeLog(change_log_url)
    source = write_retrieval_version(tmp_path / "source", catalog, "v1")
    writer = follow(source, log)
    writer.upsert([TELESCOPE])
    first = writer.position
    writer.upsert([KAYAK])
    root = tmp_path / "bundle"
    trim = ["catalog", "trim-log", "--bundle", str(root), "--change-log", change_log_url]
    write_retrieval_version(root, catalog, "v1")  # built without the log: replays from 0
    assert main(trim) == 2
    assert "version v1 was built without --change-log" in capsys.readouterr().err
    assert len(log.read_after(0)) == 2

    shutil.rmtree(root / "v1")
    built_at(root, "v2", source, log, first)
    built_at(root, "v3", source, log, writer.position)
    assert main(trim) == 0
    assert f"trimmed 1 records of {log.name} through position {first}" in capsys.readouterr().out
    assert [r.position for r in log.read_after(0)] == [writer.position]
    assert log.trimmed_through() == first
    # v2 still loads and replays the kayak; a version from before the floor refuses to load.
    assert state_of(follow(Bundle.open(root, "v2"), log), ["new-2"]) == {"new-2": KAYAK}
    with pytest.raises(InvalidInput, match=rf"from position 0, but it is trimmed through {first}"):
        follow(source, log)
    # Trimmed to the last record, the head stays at the floor: a later build records it.
    assert log.trim(writer.position) == 1 and log.read_after(0) == []
    assert log.head() == writer.position
    with pytest.raises(InvalidInput, match="beyond the log's head"):
        log.trim(writer.position + 1)


def test_a_successor_on_the_log_catches_up_and_the_old_version_keeps_following(
    v1: Bundle, change_log_url: str
) -> None:
    old = follow(v1, ChangeLog(change_log_url))
    old.upsert([TELESCOPE])
    new = old.successor(v1, device="cpu")
    assert log_of(new) is log_of(old) and new.position == old.position
    assert state_of(new, ["new-1"]) == {"new-1": TELESCOPE}
    new.upsert([KAYAK])
    old.catch_up()  # the follower does this for every version held
    assert state_of(old, ["new-2"]) == {"new-2": KAYAK}


def test_rows_of_the_earlier_format_apply_and_a_corrupt_row_is_data_loss(
    v1: Bundle, change_log_url: str
) -> None:
    """Rows as the release before `Change` committed them are applied (their vectors, of
    another encoder, re-encoded); a row the log holds that does not decode is DATA_LOSS naming
    its position, counted, and nothing of its page is applied: the replica stays where it was."""
    log = ChangeLog(change_log_url)

    def commit(op: str, record: str) -> int:
        """A row written around ChangeLog.append, as it lies in the table."""
        with psycopg.connect(change_log_url, autocommit=True) as conn:
            row = conn.execute(
                "INSERT INTO catalog_changes (position, op, record)"
                " VALUES (nextval('catalog_changes_position_seq'), %s, %s::jsonb)"
                " RETURNING position",
                (op, record),
            ).fetchone()
        assert row is not None
        return int(row[0])

    commit("upsert", UPSERT_LINE)
    commit("delete", DELETE_LINE)
    retriever = follow(v1, log)
    assert retriever.replayed.encoded == 1  # the lamp was deleted again
    assert state_of(retriever, ["a-1", "b-2"]) == {"a-1": None, "b-2": ECLAIR}
    applied = retriever.position

    corrupt = commit("upsert", '{"op": "upsert", "items": {"item_id": "c-3"}}')
    log.append(deletes(["b-2"]))
    counted = REGISTRY.get_sample_value("recsys_retrieval_corrupt_records_total") or 0.0
    with pytest.raises(DataLoss, match=rf"position {corrupt}: corrupt record \(items") as info:
        retriever.catch_up()
    assert status_code(info.value) == grpc.StatusCode.DATA_LOSS
    assert REGISTRY.get_sample_value("recsys_retrieval_corrupt_records_total") == counted + 1
    assert retriever.position == applied
    assert state_of(retriever, ["b-2"]) == {"b-2": ECLAIR}  # the delete after it is not applied
