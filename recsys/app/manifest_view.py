"""Bundle manifests as people read them: `recsys bundle info`, `bundle list` and the summary
`recsys retrain` prints of its candidate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recsys.core.bundle import CURRENT, Bundle, rejection, versions
from recsys.core.errors import InvalidInput


def rejection_line(bundle: Bundle) -> str | None:
    """`recsys bundle info`'s line saying why the retrain gate refused the version, if it did."""
    refused = rejection(bundle.root, bundle.version)
    return f"REJECTED      {refused.get('reason')} (vs {refused.get('live')})" if refused else None


def version_lines(root: Path) -> Iterator[str]:
    """`recsys bundle list`: one line per complete version, oldest first: `*` marks CURRENT,
    then its creation, interactions, the version it was warm-started from and any refusal."""
    if not root.is_dir():
        raise InvalidInput(f"{root}: no such directory")
    pointer = root / CURRENT
    current = pointer.read_text().strip() if pointer.is_file() else None
    for version in versions(root):
        m = Bundle.open(root, version).manifest
        warm = (m.get("warm_start") or {}).get("from")
        refused = rejection(root, version)
        yield (
            f"{'*' if version == current else ' '} {version}  {m.get('created_at', '?')}  "
            f"{m.get('counts', {}).get('interactions', 0):,} interactions"
            + (f"  from {warm}" if warm else "")
            + (f"  REJECTED: {refused.get('reason')}" if refused else "")
        )


def warm_start_summary(manifest: dict[str, Any]) -> str:
    """A retrained candidate's reuse of the live version, as `recsys retrain` prints it."""
    embeddings = manifest.get("embeddings", {})
    ce = manifest.get("cross_encoder") or {}
    timings = manifest.get("timings", {})
    return (
        f"candidate {manifest['version']}: reused {embeddings.get('reused', 0):,} of "
        f"{embeddings.get('items', 0):,} item embeddings from {manifest['warm_start']['from']}; "
        + (
            f"cross-encoder fine-tuned {ce.get('steps')} steps from the live one; "
            if ce.get("warm_start")
            else ""
        )
        + f"built in {timings.get('total_seconds', float('nan')):.0f} s"
    )


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
        *_text_sequence_lines(m.get("text_sequence")),
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
        if ce.get("copies"):  # the build made no cheaper copy, and why
            lines.append(f"copies        {ce['copies']}")
        if ce.get("serving_copy"):
            lines.append(f"serving copy  {ce['serving_copy']} (of the validated copies)")
    else:
        lines.append("cross-encoder none (built with --no-ranker)")
    lines.extend(_fusion_lines(m["fusion"]))
    return "\n".join(lines)


def _text_sequence_lines(record: dict[str, Any] | None) -> list[str]:
    """The text sequence model's line; none for bundles from before it."""
    if record is None:
        return []
    if "skipped" in record:
        return [f"text sequence none ({record['skipped']})"]
    return [
        f"text sequence {record['epochs']} epochs over {record['steps']:,} steps in "
        f"{record['seconds']:.0f} s; held-out loss {record['held_out_loss']}"
    ]


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
