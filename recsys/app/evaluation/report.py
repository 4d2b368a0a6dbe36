"""report.json, report.md and PNG charts (methods side by side per metric)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _table(methods: dict[str, dict[str, float]]) -> list[str]:
    metrics = list(next(iter(methods.values())))
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    best = {m: max(v[m] for v in methods.values()) for m in metrics}
    for name, values in methods.items():
        cells = [
            f"**{values[m]:.4f}**" if values[m] == best[m] else f"{values[m]:.4f}" for m in metrics
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The human report: one table per protocol, the diversity sweep, and the run's facts."""
    lines = ["# Evaluation report", ""]
    meta = report.get("meta", {})
    if meta:
        lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    if "recommend" in report:
        rec = report["recommend"]
        lines += [f"## Recommend ({rec['users']} users)", "", *_table(rec["methods"]), ""]
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
    if "search" in report:
        search = report["search"]
        lines += [
            f"## Search ({search['queries']} test queries)",
            "",
            *_table(search["methods"]),
            "",
        ]
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
    for protocol in ("recommend", "search"):
        if protocol in report:
            path = out_dir / f"{protocol}.png"
            chart(report[protocol]["methods"], f"{protocol}: methods side by side", path)
            written.append(path)
    return written
