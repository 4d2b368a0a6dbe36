"""report.json, report.md and PNG charts (methods side by side per metric)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def table(methods: dict[str, dict[str, float]]) -> list[str]:
    metrics = list(next(iter(methods.values())))
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    best = {m: max(v[m] for v in methods.values()) for m in metrics}
    for name, values in methods.items():
        cells = [
            f"**{values[m]:.4f}**" if values[m] == best[m] else f"{values[m]:.4f}" for m in metrics
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def interval(ratio: dict[str, float]) -> str:
    return f"{ratio['ratio']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"


def _bootstrap(boot: dict[str, Any], unit: str) -> list[str]:
    """`full` over each other method, 95% paired bootstrap intervals."""
    draws = boot["full / best other"]["draws"]
    lines = [
        f"### full / others: NDCG@10 ratio, 95% paired bootstrap interval ({unit} resampled, "
        f"{draws} draws)",
        "",
        "| full / | ratio [95% interval] |",
        "|---|---:|",
        f"| best other ({boot['best_other']}) | {interval(boot['full / best other'])} |",
    ]
    lines += [f"| {name} | {interval(r)} |" for name, r in boot["full / each"].items()]
    return [*lines, ""]


def _baselines(tuning: dict[str, Any]) -> list[str]:
    """What each baseline's validation search chose and scored."""
    lines = [
        f"### Baselines: hyper-parameters chosen on validation ({tuning['validation_users']} "
        "users; fitted on train, then refitted on train + validation for test)",
        "",
        "| method | chosen | validation ndcg@10 | searched | refit s |",
        "|---|---|---:|---:|---:|",
    ]
    for name, entry in tuning.items():
        if not isinstance(entry, dict):
            continue
        chosen = dict(entry["chosen"])
        score = chosen.pop("ndcg@10")
        text = ", ".join(f"{k}={v}" for k, v in chosen.items())
        lines.append(
            f"| {name} | {text} | {score:.4f} | {len(entry['validation'])} | "
            f"{entry['refit_seconds']} |"
        )
    return [*lines, ""]


def _cf(cf: dict[str, Any]) -> list[str]:
    """The bundle's ALS values, how its build chose them, and cf / popular on test."""
    values = ", ".join(f"{k}={v}" for k, v in cf["params"].items())
    lines = ["### CF (ALS): the bundle's values", "", f"- ALS: {values}"]
    search = cf.get("search")
    if search and "skipped" in search:
        lines.append(f"- validation search: {search['skipped']}")
    elif search:
        lines.append(
            f"- chosen by the build's validation search: {search['fits']} fits in "
            f"{search['seconds']} s on {search['validation_users']} users; validation "
            f"ndcg@10 {search['start']['ndcg@10']:.4f} with the values it started from → "
            f"{search['chosen']['ndcg@10']:.4f}"
        )
    ratio = cf["cf / popular"]
    lines.append(
        f"- cf / popular, test NDCG@10 (95% paired bootstrap interval, users resampled, "
        f"{ratio['draws']} draws): {interval(ratio)}"
    )
    return [*lines, ""]


def _published(published: dict[str, dict[str, float]]) -> list[str]:
    """Other authors' figures on the same files and protocol: printed, never measured here."""
    lines = [
        "### Published on the same files (the papers' figures, NOT measured here)",
        "",
        "| published method | ndcg@10 | recall@10 |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {name} (published) | {v['ndcg@10']:.4f} | {v['recall@10']:.4f} |"
        for name, v in published.items()
    ]
    return [*lines, ""]


def _ablation(ablation: dict[str, Any]) -> list[str]:
    rows = ablation["rows"]
    plan = (
        "runs the cross-encoder's second pass for recommendations"
        if ablation["cross_encoder_in_plan"]
        else "answers recommendations from the first fusion pass alone (the build found the "
        "cross-encoder's second pass did not pay), so removing the cross-encoder changes nothing"
    )
    lines = [
        "### Ablation: the full pipeline without one component",
        "",
        "As served: the component is dropped at ranking time and the bundle's fusion is kept, "
        "as turning it off in a deployed bundle would. Refitted: the first fusion pass is "
        "fitted again without it on the validation users, as a build without it would (the "
        "cross-encoder's second pass left out of both sides). Validation rows use CF refitted "
        f"on train alone, as when the build fitted fusion. The bundle's plan {plan}.",
        "",
        "| variant | validation ndcg@10 | test ndcg@10 | test full / variant [95%] "
        "| test ndcg@10, refitted | test full / variant, refitted [95%] | what is removed |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        served, refitted = row.get("test full / variant"), row.get("test full / variant refitted")
        lines.append(
            f"| {row['variant']} | {row['validation ndcg@10']:.4f} | {row['test ndcg@10']:.4f} | "
            f"{interval(served) if served else '—'} | {row['test ndcg@10 refitted']:.4f} | "
            f"{interval(refitted) if refitted else '—'} | {row['means']} |"
        )
    return [*lines, ""]


def _unseen(unseen: dict[str, Any]) -> list[str]:
    plan = "runs" if unseen["cross_encoder_in_plan"] else "does not run"
    lines = [
        f"## Unseen users ({unseen['users']} users held out of training)",
        "",
        f"Held out: {unseen['held_out']}. CF, most-popular and short-term CF (window "
        f"{unseen['cf_recent_window']}) are fitted on the other users' "
        f"{unseen['fitted_on_interactions']} visible interactions; each held-out user is "
        "answered from their history alone (CF folds them in). The bundle's fusion weights and "
        "cross-encoder were fitted with every user's training interactions; its plan "
        f"{plan} the cross-encoder for recommendations.",
        "",
        *table(unseen["methods"]),
        "",
    ]
    reference = unseen.get("reference")
    if reference:  # reports from before it was measured have none
        seen = reference["full, users seen at training"]["ndcg@10"]
        lines += [
            "Reference, not a competitor: the bundle itself, whose models were trained with "
            f"these users, answers the same requests with full ndcg@10 {seen:.4f}; full "
            f"unseen / that: {interval(reference['unseen / seen'])} (what being unseen "
            "costs; the rest of the gap to a goal is how these users are).",
            "",
        ]
    return lines + _bootstrap(unseen["bootstrap"], "users")


def _new_items(section: dict[str, Any]) -> list[str]:
    users = section["users"]
    chosen = section["text_knn"]["chosen"]
    lines = [
        f"## New products ({section['products']} of {section['catalog']} held out of the build)",
        "",
        f"Held out: {section['held_out']}: no catalog row, interaction or fusion list of the "
        "build had them. They were then added through the retrieval service's upsert (encoded "
        "from their text), and every test user was answered by the served ranker. text_knn: the "
        f"text-only neighbours over the whole catalog (window {chosen['window']}, decay "
        f"{chosen['decay']}, chosen on validation).",
        "",
    ]
    for group, title in (
        ("new", "whose test item is a new product"),
        ("others", "whose test item the build knew"),
    ):
        lines += [f"### {users[group]} users {title}", "", *table(section["methods"][group]), ""]
    lines += [
        f"- full, new / others: {section['full new / others']}",
        f"- full / text_knn on the new products' users: "
        f"{interval(section['full / text_knn on new'])}",
        "",
    ]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The human report: one table per protocol, the diversity sweep, and the run's facts."""
    lines = ["# Evaluation report", ""]
    meta = report.get("meta", {})
    if meta:
        lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    if "recommend" in report:
        rec = report["recommend"]
        sampled = f"; a seeded sample: {rec['sampled']}" if rec.get("sampled") else ""
        lines += [f"## Recommend ({rec['users']} users{sampled})", "", *table(rec["methods"]), ""]
        if rec.get("cross_encoder_sampled"):
            lines += [
                f"The cross-encoder baselines on a seeded sample: {rec['cross_encoder_sampled']}"
                " (their rows, and full over them, are over those users; every other row over"
                " all).",
                "",
            ]
        if rec.get("published"):
            lines += _published(rec["published"])
        sweep = rec.get("diversity_sweep")
        if sweep:
            lines += [
                "### Diversity (MMR over the full pipeline's ranked pool)",
                "",
                "| diversity | ndcg@10 | diversity@10 |",
                "|---:|---:|---:|",
                *[
                    f"| {row['diversity']:.2f} | {row['ndcg@10']:.4f} | {row['diversity@10']:.4f} |"
                    for row in sweep
                ],
                "",
            ]
        if "cf" in rec:
            lines += _cf(rec["cf"])
        if "baselines" in rec:
            lines += _baselines(rec["baselines"])
        if "bootstrap" in rec:
            lines += _bootstrap(rec["bootstrap"], "users")
        if "ablation" in rec:
            lines += _ablation(rec["ablation"])
    if "unseen" in report:
        lines += _unseen(report["unseen"])
    if "new_items" in report:
        lines += _new_items(report["new_items"])
    if "search" in report:
        search = report["search"]
        lines += [
            f"## Search ({search['queries']} test queries)",
            "",
            *table(search["methods"]),
            "",
        ]
        if "bootstrap" in search:
            lines += _bootstrap(search["bootstrap"], "queries")
    goals = report.get("goals")
    if goals:
        lines += ["## Goals", ""] + [
            f"- {k}: {'met' if v else 'NOT met'}" for k, v in goals.items()
        ]
    return "\n".join(lines) + "\n"


def chart(methods: dict[str, dict[str, float]], title: str, path: Path) -> None:
    """Grouped bars: one group per metric, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = list(next(iter(methods.values())))
    width = 0.8 / len(methods)
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(1.8 * len(metrics) + 3, 4))
    for i, (name, values) in enumerate(methods.items()):
        ax.bar(x + i * width, [values[m] for m in metrics], width, label=name)
    ax.set_xticks(x + width * (len(methods) - 1) / 2, metrics)
    ax.set_title(title)
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Writes report.json, report.md and one PNG per protocol; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "report.md"]
    written[0].write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    written[1].write_text(markdown(report))
    for protocol in ("recommend", "search", "unseen"):
        if protocol in report:
            path = out_dir / f"{protocol}.png"
            chart(report[protocol]["methods"], f"{protocol}: methods side by side", path)
            written.append(path)
    if "new_items" in report:
        path = out_dir / "new_items.png"
        title = "new products: the users whose test item is one of them"
        chart(report["new_items"]["methods"]["new"], title, path)
        written.append(path)
    return written
