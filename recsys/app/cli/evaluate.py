"""`recsys evaluate`: offline metrics of every stage and the full pipeline against baselines."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recsys.app.cli.common import Deferred, add_log_level, resolve
from recsys.core.errors import InvalidInput


def add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="offline metrics of every stage and the full pipeline against baselines",
        description="Evaluate under the protocol of ../shared/data/README.md. DIR comes from "
        "`recsys datasets movielens`, `recsys datasets amazon-scientific` (its dataset.json "
        "selects the leave-one-out protocol; it has no search queries) or `recsys datasets "
        "scifact` (a search protocol). When ROOT holds no bundle, one is built there from the "
        "train split only (MovieLens, Amazon: validation fits fusion and early stopping; "
        "SciFact: a plain search bundle from the training claims); a bundle not built that way "
        "is refused. Writes report.json, report.md (and for recommendations PNG charts) to "
        "REPORT_DIR.",
    )
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    p.add_argument("--bundle", type=Path, required=True, metavar="ROOT")
    p.add_argument(
        "--protocol",
        choices=("recommend", "search", "unseen", "new-items", "all"),
        default="all",
        help="recommend: every method on the test users; search: on the test tags; unseen: "
        "users held out of CF's training, answered from their history; all (default): each "
        "of those (that the data set has); new-items (recommendations only, not in all): one "
        "product in ~20 held out of a build of its own (ROOT: empty, or one built so), added "
        "online after it, and the users whose test item is one of them scored beside the others",
    )
    p.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    p.add_argument(
        "--ranker-steps",
        type=int,
        default=Deferred(_ranker_steps),
        metavar="N",
        help="fine-tuning steps when building, at most: fine-tuning keeps to `recsys build`'s "
        "default time budget (--ranker-seconds) (default %(default)s)",
    )
    p.add_argument(
        "--index-factory", default="Flat", help="FAISS factory string when building (default Flat)"
    )
    p.add_argument(
        "--pool",
        type=int,
        metavar="N",
        help="candidate pool per user or query, for the build and the evaluation (default: "
        "serving's default candidate_pool, or the pool an existing bundle was fitted on); the "
        "cross-encoder's cost grows with it, ~2.5 N pairs per user",
    )
    p.add_argument(
        "--fit-on",
        choices=("protocol", "own-holdout"),
        default="protocol",
        help="what the build fits fusion on: the protocol's validation split and training "
        "queries (default), or, as a plain `recsys build` does, its own hold-out of everything "
        "before test, with the training queries and every held-out interaction relevant",
    )
    p.add_argument(
        "--users",
        type=int,
        metavar="N",
        help="score the recommend protocol on a seeded sample of N test users (default: all; "
        "the cross-encoder methods cost ~100 pairs per user, hours on Amazon Scientific's "
        "8,442 on a CPU); the report says it sampled",
    )
    p.add_argument(
        "--ce-users",
        type=int,
        metavar="N",
        help="score the cross-encoder baselines (dense+ce_base, dense+ce) on a seeded sample "
        "of N of the scored test users, and every other method on all of them (default: all); "
        "the report says it sampled and pairs full with them over the sample",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_log_level(p)
    p.set_defaults(handler=run_evaluate)


def _ranker_steps() -> int:
    """`recsys evaluate`'s fine-tuning steps: the evaluation protocol's."""
    from recsys.app.evaluation.runner import RANKER_STEPS

    return RANKER_STEPS


def run_evaluate(args: argparse.Namespace) -> int:
    from ranking_service.train import RankerTrainConfig
    from recsys.app.build import BuildOptions
    from recsys.app.evaluation.runner import FIT_ON, run_evaluation

    options = BuildOptions(
        catalog=args.data / "catalog.csv",
        interactions=args.data / "interactions.csv",
        out=args.bundle,
        index_factory=args.index_factory,
        ranker=RankerTrainConfig(steps=resolve(args.ranker_steps)),
        device=args.device,
        # The data set's mark and relevance rule replace it (runner.for_dataset).
        split=FIT_ON[args.fit_on],
        **({"candidate_pool": args.pool} if args.pool is not None else {}),
    )
    if args.pool is not None and args.pool < 10:
        raise InvalidInput(f"--pool {args.pool}: must be >= 10 (metrics are at 10)")
    for flag, value in (("--users", args.users), ("--ce-users", args.ce_users)):
        if value is not None and value < 1:
            raise InvalidInput(f"{flag} {value}: must be >= 1")
    report = run_evaluation(
        args.data,
        args.bundle,
        args.protocol,
        args.out,
        options,
        args.pool,
        users=args.users,
        ce_users=args.ce_users,
    )
    sections: dict[str, Any] = {
        p: report[p]["methods"] for p in ("recommend", "search", "unseen") if p in report
    }
    for group, methods in report.get("new_items", {}).get("methods", {}).items():
        sections[f"new-items ({group} users)"] = methods
    for name, methods in sections.items():
        print(
            f"{name}: " + ", ".join(f"{m} ndcg@10={v['ndcg@10']:.4f}" for m, v in methods.items())
        )
    print(f"report: {args.out / 'report.md'}")
    return 0
