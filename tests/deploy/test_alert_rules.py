"""The change log alerts, evaluated by `promtool test rules` on made-up series: they fire on a
replica that stopped applying the log, and not on the local journal (head and applied both 0),
steady writes (replicas a few positions apart at any instant), a pod still loading, or the
other services (which export the same gauges as 0)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import RULES

STEPS = 40  # 15 s samples: 10 minutes


def series(name: str, value: str, namespace: str, pod: str, **labels: str) -> dict[str, str]:
    job = "recsys-ranking" if pod.startswith("ranking") else "recsys-retrieval"
    every = {"namespace": namespace, "pod": pod, "job": job, "instance": f"{pod}:9092", **labels}
    selector = ", ".join(f'{k}="{v}"' for k, v in every.items())
    return {"series": f"{name}{{{selector}}}", "values": value}


def replica(
    namespace: str,
    pod: str,
    head: str,
    applied: str,
    errors: str = f"0x{STEPS}",
    serving: str = f"1x{STEPS}",
    service: str = "retrieval",
) -> list[dict[str, str]]:
    return [
        series("recsys_change_log_head_position", head, namespace, pod),
        series("recsys_change_log_applied_position", applied, namespace, pod),
        series("recsys_change_log_errors_total", errors, namespace, pod),
        series("recsys_serving", serving, namespace, pod, service=service),
    ]


def alert(namespace: str, pod: str, with_job: bool) -> dict[str, Any]:
    labels = {"namespace": namespace, "pod": pod, "severity": "warning"}
    if with_job:
        labels |= {"job": "recsys-retrieval", "instance": f"{pod}:9092"}
    return {"exp_labels": labels}


def without_annotations(rules: dict[str, Any]) -> dict[str, Any]:
    """The rule groups as Prometheus reads them; annotations (templates checked by `promtool
    check rules`) dropped, so the test compares labels only."""
    groups = []
    for group in rules["spec"]["groups"]:
        kept = [{k: v for k, v in rule.items() if k != "annotations"} for rule in group["rules"]]
        groups.append({**group, "rules": kept})
    return {"groups": groups}


def test_change_log_alerts(promtool: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(without_annotations(yaml.safe_load(RULES.read_text()))))
    input_series = [
        # Local journal: nothing to follow, both gauges 0.
        *replica("journal", "retrieval-a", f"0x{STEPS}", f"0x{STEPS}"),
        *replica("journal", "retrieval-b", f"0x{STEPS}", f"0x{STEPS}"),
        # Steady writes: at any instant one replica is a few positions behind the other's head
        # (each pod is scraped at its own moment); a plain max(head) - applied would fire.
        *replica("steady", "retrieval-a", f"100+10x{STEPS}", f"98+10x{STEPS}"),
        *replica("steady", "retrieval-b", f"105+10x{STEPS}", f"103+10x{STEPS}"),
        # One replica follows; the other lost the database at t=0 and stays at position 100.
        *replica("stuck", "retrieval-a", f"100+10x{STEPS}", f"100+10x{STEPS}"),
        *replica("stuck", "retrieval-b", f"100x{STEPS}", f"100x{STEPS}", errors=f"0+15x{STEPS}"),
        # Still loading (not serving yet): its gauges are 0 until it has caught up.
        *replica("stuck", "retrieval-c", f"0x{STEPS}", f"0x{STEPS}", serving=f"0x{STEPS}"),
        # Ranking imports the same metrics module: 0s, and no change log.
        *replica("stuck", "ranking-a", f"0x{STEPS}", f"0x{STEPS}", service="ranking"),
    ]
    lagging = [alert("stuck", "retrieval-b", with_job=True)]
    unreachable = [alert("stuck", "retrieval-b", with_job=False)]
    tests = {
        "rule_files": [rules.name],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": input_series,
                "alert_rule_test": [
                    # One minute behind is not yet lagging; then `for: 2m`.
                    {"eval_time": "2m", "alertname": "RecsysCatalogReplicaLagging"},
                    {
                        "eval_time": "5m",
                        "alertname": "RecsysCatalogReplicaLagging",
                        "exp_alerts": lagging,
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "RecsysChangeLogUnreachable",
                        "exp_alerts": unreachable,
                    },
                ],
            }
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
