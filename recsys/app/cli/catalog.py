"""`recsys catalog export-state|trim-log|upsert|delete`: a live catalog's online changes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recsys.app.cli.common import add_change_log, add_log_level, settings_from_args
from recsys.core.errors import InvalidInput
from recsys.core.settings import Settings


def add_catalog(sub: Any) -> None:
    p = sub.add_parser(
        "catalog", help="change a live retrieval's items, or export them with the online changes"
    )
    csub = p.add_subparsers(dest="catalog_command", required=True, metavar="COMMAND")
    export = csub.add_parser(
        "export-state",
        help="write the bundle's catalog with the online upserts/deletes applied",
        description="Write ROOT's catalog (CURRENT, or --version) with every upsert and delete "
        "that retrieval keeps in its state dir applied, as the next `recsys build --catalog` "
        "input. Read-only: safe while retrieval serves and writes.",
    )
    export.add_argument("--bundle", type=Path, required=True, metavar="ROOT")
    export.add_argument("--version", help="a version other than CURRENT")
    export.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="retrieval's RECSYS_STATE_DIR (default ROOT/state)",
    )
    export.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="catalog file: .csv, .parquet or .jsonl",
    )
    add_log_level(export)
    export.set_defaults(handler=run_export_state)

    trim = csub.add_parser(
        "trim-log",
        help="delete change log records every bundle version under ROOT already holds",
        description="Delete the shared change log's records up to the oldest position any "
        "version under ROOT was built at (`recsys build --change-log`), so replicas and builds "
        "read less. The floor is recorded: a version built before it refuses to load. Refused "
        "while ROOT holds a version built without the log (it replays from position 0).",
    )
    trim.add_argument("--bundle", type=Path, required=True, metavar="ROOT")
    add_change_log(trim, "the log to trim", required=True)
    add_log_level(trim)
    trim.set_defaults(handler=run_trim_log)

    upsert = csub.add_parser(
        "upsert",
        help="add or replace items in a live retrieval service",
        description="Send every item of a catalog file (the ingestion schema: .csv, .parquet or "
        ".jsonl) to retrieval's UpsertItems, in batches of RECSYS_MAX_UPSERT_ITEMS. Acknowledged "
        "items are durable; after a failure, the error says how many were acknowledged.",
    )
    upsert.add_argument("catalog", type=Path, metavar="FILE", help="items to upsert")
    _add_writer_flags(upsert)
    upsert.set_defaults(handler=run_upsert)

    delete = csub.add_parser(
        "delete",
        help="delete items from a live retrieval service",
        description="Send the ids to retrieval's DeleteItems; ids it does not hold are reported.",
    )
    delete.add_argument("item_ids", nargs="+", metavar="ID", help="item ids to delete")
    _add_writer_flags(delete)
    delete.set_defaults(handler=run_delete)


def _add_writer_flags(p: argparse.ArgumentParser) -> None:
    """How a writer reaches retrieval and proves who it is (recsys.rpc.auth)."""
    p.add_argument(
        "--retrieval",
        required=True,
        metavar="HOST:PORT",
        help="retrieval's gRPC address (RECSYS_RETRIEVAL_ADDRESS in the services)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="a file holding this writer's bearer token (the services' write_tokens_file "
        "names it); not needed with an allowed client certificate",
    )
    for name, what in (
        ("cert", "client certificate (PEM): TLS on, presenting it"),
        ("key", "private key of --tls-cert"),
        ("ca", "CA bundle that signed retrieval's certificate"),
    ):
        p.add_argument(
            f"--tls-{name}",
            type=Path,
            dest=f"setting_tls_{name}_file",
            metavar="FILE",
            help=f"{what} (default RECSYS_TLS_{name.upper()}_FILE)",
        )
    p.add_argument(
        "--tls-server-name",
        dest="setting_tls_server_name",
        metavar="NAME",
        help="name expected in retrieval's certificate, when not HOST",
    )
    add_log_level(p, default="WARNING")


def run_upsert(args: argparse.Namespace) -> int:
    from recsys.app.online import token_metadata, upsert_catalog

    settings = settings_from_args(args)
    sent = upsert_catalog(args.retrieval, args.catalog, settings, token_metadata(args.token_file))
    print(f"upserted {sent:,} items from {args.catalog} into retrieval at {args.retrieval}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from recsys.app.online import delete_items, token_metadata

    settings = settings_from_args(args)
    missing = delete_items(args.retrieval, args.item_ids, settings, token_metadata(args.token_file))
    deleted = len(args.item_ids) - len(missing)
    print(
        f"deleted {deleted:,} items from retrieval at {args.retrieval}"
        + (f"; not there: {', '.join(missing)}" if missing else "")
    )
    return 0


def run_export_state(args: argparse.Namespace) -> int:
    from recsys.app.ingest import items_to_frame, write_catalog
    from recsys.core import bundle as bundle_files
    from recsys.core.bundle import Bundle
    from retrieval_service.catalog import load_catalog_items
    from retrieval_service.durability import catalog_with_changes

    bundle = Bundle.open(args.bundle, args.version)
    state_dir = args.state_dir or Settings.built_in(bundle=args.bundle).state_path()
    if not state_dir.is_dir():
        raise InvalidInput(f"--state-dir {state_dir}: no such directory")
    items = load_catalog_items(bundle.file(bundle_files.CATALOG))
    exported = catalog_with_changes(items, state_dir, bundle.version)
    write_catalog(items_to_frame(exported.items), args.out)
    print(
        f"wrote {len(exported.items):,} items to {args.out}: {bundle.version}'s {len(items):,} "
        f"with {exported.upserts:,} online upserts and {exported.deletes:,} deletes from "
        f"{state_dir}"
    )
    return 0


def run_trim_log(args: argparse.Namespace) -> int:
    from recsys.app.trim import trim_log

    done = trim_log(args.bundle, args.change_log, args.change_log_table)
    print(
        f"trimmed {done.deleted:,} records of {done.log} through position {done.floor} "
        f"(the oldest of {done.versions} versions under {args.bundle})"
    )
    return 0
