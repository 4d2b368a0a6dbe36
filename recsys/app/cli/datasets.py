"""`recsys datasets`: public data sets converted into the ingestion schema."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recsys.app.cli.common import add_log_level


def add_datasets(sub: Any) -> None:
    p = sub.add_parser("datasets", help="convert public data sets into the ingestion schema")
    dsub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    ml = dsub.add_parser(
        "movielens",
        help="MovieLens zip → catalog.csv, interactions.csv, queries.jsonl",
        description="Convert a MovieLens zip (e.g. ml-latest-small.zip) into the catalog/interactions "
        "schema plus the tag search queries of the evaluation protocol.",
    )
    ml.add_argument("zip", type=Path, metavar="ZIP")
    ml.add_argument("--out", type=Path, required=True, metavar="DIR")
    add_log_level(ml)
    ml.set_defaults(handler=run_movielens)
    sf = dsub.add_parser(
        "scifact",
        help="SciFact folder → catalog.csv, queries.jsonl, test_queries.jsonl",
        description="Convert SciFact (corpus.jsonl, train.jsonl, test.jsonl; ../shared/data/"
        "scifact) into a catalog of abstracts, the training claims as a query log "
        "(queries.jsonl, for `recsys build --queries`) and the test claims "
        "(test_queries.jsonl, for `recsys evaluate` only).",
    )
    sf.add_argument("data", type=Path, metavar="DIR")
    sf.add_argument("--out", type=Path, required=True, metavar="DIR")
    add_log_level(sf)
    sf.set_defaults(handler=run_scifact)
    amazon = dsub.add_parser(
        "amazon-scientific",
        help="UniSRec's Amazon Scientific files → catalog.csv, interactions.csv, splits.csv",
        description="Convert the UniSRec 'Scientific' files (Scientific.text, .item2index, "
        ".user2index, .train/.valid/.test.inter) into the catalog/interactions schema, each "
        "user's sequence in order, plus the leave-one-out split (splits.csv) and dataset.json, "
        "which makes `recsys evaluate --data DIR` run that protocol.",
    )
    amazon.add_argument("folder", type=Path, metavar="FOLDER")
    amazon.add_argument("--out", type=Path, required=True, metavar="DIR")
    add_log_level(amazon)
    amazon.set_defaults(handler=run_amazon_scientific)


def run_movielens(args: argparse.Namespace) -> int:
    from recsys.app.movielens import convert_movielens

    files = convert_movielens(args.zip, args.out)
    print(
        f"wrote {files.catalog} ({files.items:,} items), {files.interactions} "
        f"({files.interactions_count:,} interactions, {files.users:,} users), "
        f"{files.queries} ({files.queries_count:,} queries)"
    )
    return 0


def run_scifact(args: argparse.Namespace) -> int:
    from recsys.app.scifact import convert_scifact

    files = convert_scifact(args.data, args.out)
    print(
        f"wrote {files.catalog} ({files.items:,} abstracts), {files.queries} "
        f"({files.train_claims:,} training claims), {files.test_queries} "
        f"({files.test_claims:,} test claims)"
    )
    return 0


def run_amazon_scientific(args: argparse.Namespace) -> int:
    from recsys.app.amazon import convert_amazon_scientific

    files = convert_amazon_scientific(args.folder, args.out)
    print(
        f"wrote {files.catalog} ({files.items:,} items), {files.interactions} "
        f"({files.interactions_count:,} interactions, {files.users:,} users), {files.splits}, "
        f"{files.marker}"
    )
    return 0
