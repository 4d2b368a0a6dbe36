"""`recsys search`: offline search over a bundle, in-process (debugging)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from recsys.app.cli.common import add_log_level
from recsys.core.errors import InvalidInput
from recsys.core.settings import default


def add_search(sub: Any) -> None:
    p = sub.add_parser(
        "search",
        help="offline search over a bundle (debugging)",
        description="Search a bundle in-process, without servers. Give TEXT or --queries FILE (one query a line).",
    )
    p.add_argument("text", nargs="?", metavar="TEXT", help="query text")
    p.add_argument("--bundle", type=Path, required=True, metavar="ROOT")
    p.add_argument("--queries", type=Path, metavar="FILE", help="one query a line")
    p.add_argument(
        "--k",
        type=int,
        default=default("default_k"),
        help=f"hits per query, at most {default('max_k')} (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object a line: query and hits")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_log_level(p, default="WARNING")  # the hits are the output: no progress lines around them
    p.set_defaults(handler=run_search)


def run_search(args: argparse.Namespace) -> int:
    from recsys.core.bundle import Bundle
    from recsys.core.domain import SearchQuery
    from retrieval_service.retriever import Retriever

    if (args.text is None) == (args.queries is None):
        raise InvalidInput("search: give exactly one of TEXT or --queries FILE")
    if not 1 <= args.k <= default("max_k"):
        raise InvalidInput(f"--k {args.k}: must be within 1..{default('max_k')}")
    if args.queries is not None:
        if not args.queries.is_file():
            raise InvalidInput(f"{args.queries}: no such file")
        queries = [q.strip() for q in args.queries.read_text().splitlines() if q.strip()]
    else:
        queries = [args.text]
    retriever = Retriever.load(Bundle.open(args.bundle), state_dir=None, device=args.device)
    for query in queries:
        hits, _ = retriever.search(SearchQuery(top_k=args.k, text=query, include_text=True))
        if args.json:
            row = {
                "query": query,
                "hits": [{"item_id": h.item_id, "score": round(h.score, 6)} for h in hits],
            }
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"# {query}")
            for rank, hit in enumerate(hits, start=1):
                title = hit.item.title if hit.item else ""
                print(f"{rank:3d}  {hit.score:.4f}  {hit.item_id}  {title}")
    return 0
