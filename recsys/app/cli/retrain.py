"""`recsys retrain`: the next version from the live one, switched to only past the gate."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from recsys.app.cli.common import FOLDED, Deferred, add_change_log, add_log_level, resolve
from recsys.core.errors import DataLoss, InvalidInput


def add_retrain(sub: Any) -> None:
    p = sub.add_parser(
        "retrain",
        help="build the next version from the live one; switch CURRENT only if it is not worse",
        description="Build a new version under ROOT from the live one (CURRENT): its settings, "
        "its embeddings of items whose text is unchanged and its fine-tuned cross-encoder as "
        "the starting point; CF and fusion fitted on the new interactions. A gate then ranks "
        "each user's most recent held-out interactions (those after the live version's last "
        "one) with both versions and switches CURRENT only if the candidate's NDCG@10 is at "
        "most --max-drop below the live one's; otherwise the candidate is kept aside with "
        "ROOT/<version>/rejected.json. Exit 0: switched; 3: refused (the reason is printed); "
        "2: a mistake in the arguments or inputs; 4: the change log unreachable; 5: the live "
        "version damaged (its files differ from its manifest).",
    )
    p.add_argument("--bundle", type=Path, required=True, metavar="ROOT", help="bundle root")
    p.add_argument(
        "--interactions",
        type=Path,
        required=True,
        help="every interaction to train on, old and new: user_id, item_id [, timestamp, "
        "weight, query]",
    )
    p.add_argument(
        "--catalog", type=Path, help="the catalog now (default: the live version's items)"
    )
    p.add_argument(
        "--queries",
        type=Path,
        metavar="FILE",
        help="searches with their relevant items (default: the live version's file, if present)",
    )
    p.add_argument(
        "--ranker-steps",
        type=int,
        default=Deferred(_ranker_steps),
        metavar="N",
        help="fine-tuning steps from the live cross-encoder (default %(default)s)",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=Deferred(_max_drop),
        metavar="SHARE",
        help="how far below the live version's NDCG@10 the candidate may score, relative "
        "(default %(default)s)",
    )
    p.add_argument(
        "--gate-users",
        type=int,
        default=Deferred(_gate_users),
        metavar="N",
        help="held-out users each version ranks for the gate, at most (default %(default)s)",
    )
    p.add_argument(
        "--candidate",
        metavar="VERSION",
        help="gate this version under ROOT (e.g. one kept aside earlier) instead of building one",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_change_log(p, FOLDED)
    add_log_level(p)
    p.set_defaults(handler=run_retrain)


def _ranker_steps() -> int:
    from recsys.app.retrain import RETRAIN_RANKER_STEPS

    return RETRAIN_RANKER_STEPS


def _max_drop() -> float:
    from recsys.offline.gate import MAX_DROP

    return MAX_DROP


def _gate_users() -> int:
    from recsys.offline.gate import GATE_USERS

    return GATE_USERS


def run_retrain(args: argparse.Namespace) -> int:
    from recsys.app.manifest_view import warm_start_summary
    from recsys.app.retrain import EXIT_REFUSED, EXIT_SWITCHED, judge, retrain
    from recsys.core.bundle import Bundle

    steps, drop, users = (
        resolve(args.ranker_steps),
        resolve(args.max_drop),
        resolve(args.gate_users),
    )
    if steps < 1:
        raise InvalidInput(f"--ranker-steps {steps}: must be >= 1")
    if not 0 <= drop < 1:
        raise InvalidInput(f"--max-drop {drop}: must be within [0, 1)")
    if users < 1:
        raise InvalidInput(f"--gate-users {users}: must be >= 1")
    live = Bundle.open(args.bundle)
    bad = live.verify()
    if bad:
        raise DataLoss(
            f"{live.path}: the live version's files differ from its manifest ({', '.join(bad[:3])}); "
            "rebuild with `recsys build`"
        )
    if args.candidate is not None:
        if args.candidate == live.version:
            raise InvalidInput(f"--candidate {args.candidate}: is the live version")
        candidate = Bundle.open(args.bundle, args.candidate)
        interactions = _candidate_interactions(args.interactions, candidate)
        done = judge(live, candidate, interactions, drop, users, args.device)
    else:
        from recsys.app.retrain import retrain_inputs, retrain_options

        options = replace(
            retrain_options(
                live, args.bundle, args.interactions, args.catalog, args.queries, steps, args.device
            ),
            change_log_url=args.change_log,
            change_log_table=args.change_log_table,
        )
        inputs = retrain_inputs(options, live, catalog_given=args.catalog is not None)
        done = retrain(live, options, inputs, drop, users)
        print(warm_start_summary(Bundle.open(args.bundle, done.candidate).manifest))
    for line in done.gate.lines(done.live, done.candidate):
        print(line)
    if done.switched:
        print(f"switched CURRENT {done.live} → {done.candidate}")
        return EXIT_SWITCHED
    print(
        f"kept aside: {args.bundle / done.candidate} ({done.gate.reason}); CURRENT stays "
        f"{done.live}"
    )
    return EXIT_REFUSED


def _candidate_interactions(path: Path, candidate: Any) -> Any:
    """The interactions file, read as the candidate's build read it (its catalog's items)."""
    from recsys.app.ingest import load_interactions
    from recsys.core import bundle as bundle_files
    from retrieval_service.catalog import load_catalog_items

    known = {i.item_id for i in load_catalog_items(candidate.file(bundle_files.CATALOG))}
    return load_interactions(path, known_item_ids=known)[0]
