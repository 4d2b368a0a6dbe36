"""`recsys demo`: the whole system on the embedded sample catalog, with a readable table."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pandas as pd

from ranking_service.train import RankerTrainConfig
from recsys.core.bundle import CURRENT, Bundle
from recsys.core.settings import Settings
from recsys.rpc.launcher import launched
from recsys.v1 import gateway_pb2, gateway_pb2_grpc

# Fine-tuning steps of the sample bundle's cross-encoder: a CPU minute or two.
DEMO_RANKER_STEPS = 40

STAGE_NAMES = {
    gateway_pb2.STAGE_RETRIEVAL: "retrieval",
    gateway_pb2.STAGE_RANKING: "ranking",
    gateway_pb2.STAGE_DIVERSITY: "diversity",
    gateway_pb2.STAGE_TOTAL: "total",
}


@dataclass(frozen=True)
class DemoCall:
    title: str
    request: gateway_pb2.RecommendRequest


def demo_ranker_config(steps: int = DEMO_RANKER_STEPS) -> RankerTrainConfig:
    """A short fine-tune that still clearly beats the untrained head on the sample (CPU minutes)."""
    return RankerTrainConfig(steps=steps, batch_size=8, max_length=96, validation_users=40)


def ensure_sample_bundle(root: Path, ranker_steps: int) -> None:
    """Builds the sample bundle into root unless a complete one is already there."""
    if (root / CURRENT).is_file():
        print(f"using the sample bundle in {root}")
        return
    from recsys.app.build import BuildOptions, build_bundle
    from recsys.app.sample import sample_paths

    catalog, interactions = sample_paths()
    print(f"building the sample bundle into {root} (first run only; a minute or two on a CPU)")
    build_bundle(
        BuildOptions(
            catalog=catalog,
            interactions=interactions,
            out=root,
            ranker=demo_ranker_config(ranker_steps),
        )
    )


def demo_calls() -> list[DemoCall]:
    """A query alone, a known user with their recent items, and a query with a history."""
    from recsys.app.sample import sample_paths

    log = pd.read_csv(sample_paths()[1], dtype={"user_id": str, "item_id": str})
    user = str(log["user_id"].value_counts().index[0])
    recent = log[log["user_id"] == user].sort_values("timestamp", ascending=False)
    history = [str(i) for i in recent["item_id"].head(5)]
    other = log[log["query"].fillna("") != ""].iloc[0]
    return [
        DemoCall(
            "query 'wireless headphones'",
            gateway_pb2.RecommendRequest(query="wireless headphones", k=5),
        ),
        DemoCall(
            f"known user {user} with their 5 most recent items",
            gateway_pb2.RecommendRequest(user_id=user, history_item_ids=history, k=5),
        ),
        DemoCall(
            f"query {other['query']!r} with a history, diversity 0.3",
            gateway_pb2.RecommendRequest(
                query=str(other["query"]), history_item_ids=history[:2], k=5, diversity=0.3
            ),
        ),
    ]


def _fmt(msg: object, field: str) -> str:
    return f"{getattr(msg, field):7.3f}" if msg.HasField(field) else "      -"  # type: ignore[attr-defined]


def cross_encoder_verdicts(manifest: dict[str, Any]) -> dict[bool, str]:
    """Per request kind (has a query?), what the build found the cross-encoder is worth on
    this catalog: the validation figures its decision rests on."""
    fusion = manifest.get("fusion", {})
    out = {}
    for has_query, kind, name in (
        (True, "query", "searches"),
        (False, "history", "recommendations"),
    ):
        section = fusion.get(kind, {})
        fitted = section.get("fitted_on", {})
        sweep = fitted.get("sweep") or []
        if not manifest.get("cross_encoder"):
            out[has_query] = "this bundle has no cross-encoder"
        elif not sweep:
            out[has_query] = f"too few held-out {name} to measure it ({fitted.get('fallback', '')})"
        else:
            best = max(sweep, key=lambda row: row["ndcg@10"])
            verdict = "pays" if section.get("cross_encoder_pays") else "does not pay"
            out[has_query] = (
                f"on this shop it {verdict} for {name}: validation NDCG@10 "
                f"{fitted['sweep_first_pass_ndcg@10']:.3f} without it, {best['ndcg@10']:.3f} "
                f"reranking the top {best['depth']}"
            )
    return out


def cross_encoder_line(
    call: DemoCall, reply: gateway_pb2.RecommendResponse, verdicts: dict[bool, str]
) -> str:
    """Whether the cross-encoder ran for this answer, and what it changed."""
    verdict = verdicts.get(bool(call.request.query), "")
    if reply.versions.cross_encoder in ("", "skipped"):
        return f"   cross-encoder: skipped ({verdict})"
    moved = [
        f"{item.item_id} {item.scores.first_pass_rank}→{rank}"
        for rank, item in enumerate(reply.items, start=1)
        if item.scores.HasField("first_pass_rank")
        and item.scores.first_pass_rank != rank
        and not item.new_product  # the gateway's slot placed it, not the cross-encoder
    ]
    change = ", ".join(moved) if moved else "the first pass's order kept"
    return f"   cross-encoder: ran ({verdict}); moved: {change}"


def format_reply(
    call: DemoCall, reply: gateway_pb2.RecommendResponse, verdicts: dict[bool, str]
) -> str:
    """A table of items with their score breakdown (`1st`: position in the first pass, before
    the cross-encoder, diversity and the new-product slot; `[new]`: a product the build never
    saw bought), whether the cross-encoder ran, timings and versions."""
    lines = [f"\n== {call.title}"]
    if reply.degraded:
        lines.append(f"   DEGRADED: {', '.join(reply.degraded_reasons)}")
    lines.append(
        f"   {'#':>2} {'1st':>3}  {'item':<8} {'title':<42} {'score':>7} {'x-enc':>7} {'cf':>7} "
        f"{'dense':>7} {'bm25':>7}"
    )
    for rank, item in enumerate(reply.items, start=1):
        s = item.scores
        first = str(s.first_pass_rank) if s.HasField("first_pass_rank") else "-"
        title = ("[new] " if item.new_product else "") + item.title
        lines.append(
            f"   {rank:>2} {first:>3}  {item.item_id:<8} {title[:42]:<42} {item.score:7.3f} "
            f"{_fmt(s, 'cross_encoder')} {_fmt(s, 'cf')} {_fmt(s, 'retrieval')} "
            f"{_fmt(s, 'lexical')}"
        )
    lines.append(cross_encoder_line(call, reply, verdicts))
    timings = ", ".join(
        f"{STAGE_NAMES.get(t.stage, t.stage)} {t.seconds * 1000:.1f} ms" for t in reply.timings
    )
    lines.append(f"   timings: {timings}")
    lines.append(f"   answered by bundle {reply.versions.bundle_version}")
    return "\n".join(lines)


def run_demo(
    root: Path, once: bool, ranker_steps: int = DEMO_RANKER_STEPS, log_level: str = "INFO"
) -> int:
    """Builds if needed, starts the three services, prints answers, serves until interrupted."""
    ensure_sample_bundle(root, ranker_steps)
    # The services log to this terminal too: at the demo's level, not RECSYS_LOG_LEVEL's.
    settings = Settings(bundle=root, host="127.0.0.1", log_level=log_level)
    with launched(settings) as services:
        gateway = services.address("gateway")
        with grpc.insecure_channel(gateway) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            verdicts = cross_encoder_verdicts(Bundle.open(root).manifest)
            for call in demo_calls():
                print(format_reply(call, stub.Recommend(call.request, timeout=30), verdicts))
        print(
            f"\ngateway   {gateway}  (recsys.v1.GatewayService/Recommend; reflection on)\n"
            f"retrieval {services.address('retrieval')}   ranking {services.address('ranking')}\n"
            f"metrics   http://127.0.0.1:{settings.gateway_metrics_port}/metrics "
            f"(:{settings.retrieval_metrics_port}, :{settings.ranking_metrics_port})"
        )
        if once:
            return 0
        print("serving until Ctrl-C")
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # sigwait needs them blocked
        signal.sigwait(stop_signals)
        return 0
