"""Offline checks of deploy/: the overlays render, validate against the Kubernetes and CRD
schemas, and agree with the code (settings, ports, health names, metrics)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from recsys.core import metrics
from recsys.core.settings import Settings
from tests.deploy.conftest import (
    DASHBOARD,
    DEPLOY,
    EXPORTED_METRICS,
    K8S_VERSION,
    REPO_ROOT,
    RULES,
    SCHEMAS,
    SERVICES,
    alert_expressions,
    alert_rules,
    dashboard_queries,
    exported_series,
    known_labels,
    metric_names,
    selector_labels,
    split_threshold,
)

Objects = tuple[dict[str, Any], ...]
MONITORING_GROUP = "monitoring.coreos.com/"
CERT_MANAGER_GROUP = "cert-manager.io/"
CRD_SCHEMAS = {"PodMonitor": "podmonitor.json", "PrometheusRule": "prometheusrule.json"}
CERT_MANAGER_SCHEMAS = {"Certificate": "certificate.json", "Issuer": "issuer.json"}
GPU = "nvidia.com/gpu"
CHANGE_LOG_SECRET = "recsys-change-log"
MILVUS_SECRET = "recsys-milvus"
POSTGRES_PORT = 5432
MILVUS_PORT = 19530
DNS_PORT = 53


def find(objects: Objects, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(objects: Objects, service: str) -> dict[str, Any]:
    containers = one(objects, "Deployment", service)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(objects: Objects, service: str) -> dict[str, str]:
    """The environment a service's container gets: envFrom ConfigMaps, then env."""
    c = container(objects, service)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def settings_of(objects: Objects, service: str) -> Settings:
    """The Settings a service's container builds from its environment."""
    env = env_of(objects, service)
    return Settings(
        **{k.removeprefix("RECSYS_").lower(): v for k, v in env.items() if "RECSYS_" in k}
    )


def setting_default(name: str) -> Any:
    return Settings.model_fields[name].default


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def secret_env(c: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The container's variables set from Secrets: name -> (Secret, key)."""
    return {
        var["name"]: (ref["name"], ref["key"])
        for var in c.get("env", [])
        if (ref := var.get("valueFrom", {}).get("secretKeyRef"))
    }


def shared_log(objects: Objects) -> bool:
    """Whether retrieval follows the shared change log (its URL comes from a Secret)."""
    return "RECSYS_CHANGE_LOG_URL" in secret_env(container(objects, "retrieval"))


def egress_ports(policy: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Port -> the peers the policy lets its pods reach on it."""
    ports: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"].get("egress", []):
        for port in rule["ports"]:
            ports.setdefault(port["port"], []).extend(rule["to"])
    return ports


def namespaces_of(peers: list[dict[str, Any]]) -> set[str]:
    return {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in peers
    }


# -- rendering and schemas ---------------------------------------------------------------------


def test_overlays_render(objects: Objects) -> None:
    kinds = {o["kind"] for o in objects}
    for kind in ("Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler"):
        assert kind in kinds
    for kind in ("PodDisruptionBudget", "NetworkPolicy", "PodMonitor", "PrometheusRule"):
        assert kind in kinds
    for service in SERVICES:
        one(objects, "Deployment", service)
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert namespaces == {"recsys"}, namespaces


def test_builtin_objects_validate_strictly(objects: Objects) -> None:
    errors = []
    for obj in objects:
        if obj["apiVersion"].startswith((MONITORING_GROUP, CERT_MANAGER_GROUP)):
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_monitoring_objects_validate_against_crd_schemas(objects: Objects) -> None:
    monitoring = [o for o in objects if o["apiVersion"].startswith(MONITORING_GROUP)]
    assert {o["kind"] for o in monitoring} == set(CRD_SCHEMAS)
    for obj in monitoring:
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[obj["kind"]]).read_text())
        jsonschema.Draft7Validator.check_schema(schema)
        jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)


def test_cert_manager_objects_validate_against_crd_schemas(overlay: str, objects: Objects) -> None:
    issued = [o for o in objects if o["apiVersion"].startswith(CERT_MANAGER_GROUP)]
    if overlay != "mtls":
        assert issued == [], "only the mtls overlay needs cert-manager"
        return
    assert {o["kind"] for o in issued} == set(CERT_MANAGER_SCHEMAS)
    for obj in issued:
        schema = json.loads((SCHEMAS / CERT_MANAGER_SCHEMAS[obj["kind"]]).read_text())
        jsonschema.Draft7Validator.check_schema(schema)
        jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)


def test_crd_schemas_reject_a_typo() -> None:
    schema = json.loads((SCHEMAS / "podmonitor.json").read_text())
    bad = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "podMetricsEndpoints": [{"prot": "metrics"}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# -- agreement with the code -------------------------------------------------------------------


def test_configmaps_use_only_real_settings(objects: Objects) -> None:
    fields = set(Settings.model_fields)
    names: set[str] = set()
    for cm in find(objects, "ConfigMap"):
        names |= {k for k in cm.get("data", {}) if k.startswith("RECSYS_")}
    for deployment in find(objects, "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            names |= {v["name"] for v in c.get("env", []) if v["name"].startswith("RECSYS_")}
    unknown = sorted(n for n in names if n.removeprefix("RECSYS_").lower() not in fields)
    assert not unknown, f"not fields of recsys.core.settings.Settings: {unknown}"
    assert names, "no RECSYS_* settings found"


def test_each_service_config_builds_valid_settings(objects: Objects) -> None:
    for service in SERVICES:
        env = env_of(objects, service)
        values = {k.removeprefix("RECSYS_").lower(): v for k, v in env.items() if "RECSYS_" in k}
        settings = Settings(**values)  # raises on a value the code would reject
        facts = SERVICES[service]
        assert getattr(settings, facts.port_setting) == setting_default(facts.port_setting)
        assert getattr(settings, facts.metrics_port_setting) == setting_default(
            facts.metrics_port_setting
        )


def test_ports_probes_and_command(objects: Objects) -> None:
    for service, facts in SERVICES.items():
        c = container(objects, service)
        assert c["name"] == service
        assert c.get("args") == ["serve", service], "one image, the command picks the service"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        grpc_port = setting_default(facts.port_setting)
        expected = {"grpc": grpc_port, "metrics": setting_default(facts.metrics_port_setting)}
        settings = settings_of(objects, service)
        # Kubelet probes speak plaintext only: with TLS on they need the health-only port.
        health_port = settings.health_port(service)
        assert bool(health_port) == settings.tls_enabled()
        if health_port:
            expected["health"] = health_port
        assert ports == expected
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[probe_name]
            assert probe["grpc"]["port"] == (health_port or grpc_port), f"{service} {probe_name}"
        assert c["readinessProbe"]["grpc"]["service"] == facts.health_name
        assert c["startupProbe"]["grpc"]["service"] == facts.health_name
        assert c["livenessProbe"]["grpc"].get("service", "") == ""
        startup = c["startupProbe"]
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        # Loading models takes 10-60 s on CPU, more for big models.
        assert budget >= (120 if service == "gateway" else 600), f"{service} startup {budget}s"


def test_graceful_rollouts(objects: Objects) -> None:
    for service in SERVICES:
        deployment = one(objects, "Deployment", service)
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        pod = deployment["spec"]["template"]["spec"]
        command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        grace = float(env_of(objects, service).get("RECSYS_GRACE_PERIOD_S", 10.0))
        assert pod["terminationGracePeriodSeconds"] > float(command[1]) + grace


def test_security_context(objects: Objects) -> None:
    for service in SERVICES:
        pod = one(objects, "Deployment", service)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        c = pod["containers"][0]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for path in ("/tmp", "/cache"):
            assert "emptyDir" in volumes[mounts[path]["name"]], f"{service}: {path} writable"


def test_bundle_and_state_volumes(objects: Objects) -> None:
    for service in ("retrieval", "ranking"):
        env = env_of(objects, service)
        pod = one(objects, "Deployment", service)["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        bundle = mounts[env["RECSYS_BUNDLE"]]
        assert bundle.get("readOnly") is True
        claim = volumes[bundle["name"]]["persistentVolumeClaim"]
        one(objects, "PersistentVolumeClaim", claim["claimName"])
        if service == "retrieval" and shared_log(objects):
            # The log is the one record of online changes: no per-pod journal to lose.
            assert "RECSYS_STATE_DIR" not in env
            assert "/state" not in mounts and "state" not in volumes
        elif service == "retrieval":
            state = mounts[env["RECSYS_STATE_DIR"]]
            assert not state.get("readOnly", False)
            assert not env["RECSYS_STATE_DIR"].startswith(env["RECSYS_BUNDLE"])
    assert "RECSYS_BUNDLE" not in env_of(objects, "gateway"), "the gateway holds no bundle"


def test_retrain_cronjob_writes_the_bundle_the_services_read(objects: Objects) -> None:
    from recsys.app.cli import build_parser
    from recsys.app.retrain import EXIT_REFUSED

    cron = one(objects, "CronJob", "retrain")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid", "two retrains would race for CURRENT"
    job = cron["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    (c,) = pod["containers"]
    # A valid `recsys retrain` command line; the gate's refusal fails the Job without retries.
    args = build_parser().parse_args(c["args"])
    assert args.command == "retrain"
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and EXIT_REFUSED in rule["onExitCodes"]["values"]
    assert pod["restartPolicy"] == "Never"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    bundle = mounts[str(args.bundle)]
    assert not bundle.get("readOnly", False), "the retrain writes versions and CURRENT"
    served = env_of(objects, "ranking")["RECSYS_BUNDLE"]
    ranking_pod = one(objects, "Deployment", "ranking")["spec"]["template"]["spec"]
    ranking_mount = next(
        m for m in ranking_pod["containers"][0]["volumeMounts"] if m["mountPath"] == served
    )
    ranking_claim = {v["name"]: v for v in ranking_pod["volumes"]}[ranking_mount["name"]]
    assert (
        volumes[bundle["name"]]["persistentVolumeClaim"]["claimName"]
        == ranking_claim["persistentVolumeClaim"]["claimName"]
    )
    data = next(m for path, m in mounts.items() if str(args.interactions).startswith(path + "/"))
    one(
        objects,
        "PersistentVolumeClaim",
        volumes[data["name"]]["persistentVolumeClaim"]["claimName"],
    )
    # The services' hardening, and no network but the change log's database.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    for path in ("/tmp", "/cache"):
        assert "emptyDir" in volumes[mounts[path]["name"]]
    policy = one(objects, "NetworkPolicy", "retrain")
    spec = policy["spec"]
    assert labels_match(spec["podSelector"]["matchLabels"], job["template"]["metadata"]["labels"])
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert not spec.get("ingress")
    if not shared_log(objects):
        assert args.change_log is None
        assert not spec.get("egress")
        return
    # The replicas' log, folded in and its position recorded, read with their credentials.
    retrieval_secrets = secret_env(container(objects, "retrieval"))
    assert args.change_log == "$(RECSYS_CHANGE_LOG_URL)", "kubelet expands it from env"
    assert secret_env(c)["RECSYS_CHANGE_LOG_URL"] == retrieval_secrets["RECSYS_CHANGE_LOG_URL"]
    assert secret_env(c)["PGPASSWORD"] == retrieval_secrets["PGPASSWORD"]
    assert set(egress_ports(policy)) == {POSTGRES_PORT, DNS_PORT}


def test_gateway_dials_headless_services(objects: Objects) -> None:
    env = env_of(objects, "gateway")
    for service in ("retrieval", "ranking"):
        address = env[f"RECSYS_{service.upper()}_ADDRESS"]
        match = re.fullmatch(
            r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", address
        )
        assert match, address
        name, namespace, port = match.groups()
        svc = one(objects, "Service", name)
        assert svc["metadata"]["namespace"] == namespace
        assert svc["spec"]["clusterIP"] == "None", (
            "client-side round robin needs a headless Service"
        )
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
        assert int(port) == setting_default(SERVICES[service].port_setting)
        pod_labels = one(objects, "Deployment", service)["spec"]["template"]["metadata"]["labels"]
        assert labels_match(svc["spec"]["selector"], pod_labels)
    assert float(env_of(objects, "retrieval")["RECSYS_MAX_CONNECTION_AGE_S"]) > 0


def test_services_select_their_pods(objects: Objects) -> None:
    for svc in find(objects, "Service"):
        matched = [
            d["metadata"]["name"]
            for d in find(objects, "Deployment")
            if labels_match(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {matched}"


def test_autoscaling_and_disruption_budgets(objects: Objects) -> None:
    for service in SERVICES:
        pod_labels = one(objects, "Deployment", service)["spec"]["template"]["metadata"]["labels"]
        hpa = one(objects, "HorizontalPodAutoscaler", service)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": service,
        }
        assert hpa["spec"]["minReplicas"] >= 2
        pdb = one(objects, "PodDisruptionBudget", service)
        assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)


def _ingress_sources(policy: dict[str, Any], port: int) -> list[dict[str, Any] | None]:
    """Peers allowed to reach `port` (None: any source)."""
    sources: list[dict[str, Any] | None] = []
    for rule in policy["spec"].get("ingress", []):
        if any(p["port"] == port for p in rule.get("ports", [])):
            sources.extend(rule.get("from") or [None])
    return sources


def test_network_policies(objects: Objects) -> None:
    gateway_labels = one(objects, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    for service, facts in SERVICES.items():
        policy = one(objects, "NetworkPolicy", service)
        pod_labels = one(objects, "Deployment", service)["spec"]["template"]["metadata"]["labels"]
        assert labels_match(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
        grpc = _ingress_sources(policy, setting_default(facts.port_setting))
        if service == "gateway":
            assert grpc == [None], "callers reach the gateway"
        else:
            assert None not in grpc
            assert all("namespaceSelector" not in peer for peer in grpc if peer)
            selectors = [peer["podSelector"]["matchLabels"] for peer in grpc if peer]
            assert any(labels_match(s, gateway_labels) for s in selectors)
            # Besides the gateway, only explicitly labelled catalog writers (retrieval only).
            others = [s for s in selectors if not labels_match(s, gateway_labels)]
            assert others == (
                [{"recsys.io/catalog-writer": "true"}] if service == "retrieval" else []
            )
            _check_egress(objects, service, policy)
        metrics = _ingress_sources(policy, setting_default(facts.metrics_port_setting))
        assert metrics and all(peer and "namespaceSelector" in peer for peer in metrics)


def _check_egress(objects: Objects, service: str, policy: dict[str, Any]) -> None:
    """Retrieval and ranking reach nothing, except retrieval its change log's PostgreSQL and
    its Milvus (each in its own namespace, on its port only) and DNS to find them."""
    expected: set[int] = set()
    if service == "retrieval" and shared_log(objects):
        expected |= {POSTGRES_PORT, DNS_PORT}
    settings = settings_of(objects, service)
    if service == "retrieval" and settings.retrieval_backend == "milvus":
        expected |= {MILVUS_PORT, DNS_PORT}
    ports = egress_ports(policy)
    assert set(ports) == expected, f"{service} egress {sorted(ports)}"
    for port, peers in ports.items():
        # Every rule names its peers: none opens a port to the whole network.
        assert peers and all(set(p) == {"namespaceSelector"} for p in peers), (service, port)
    if DNS_PORT in ports:
        assert namespaces_of(ports[DNS_PORT]) == {"kube-system"}
    if POSTGRES_PORT in ports:
        assert "kube-system" not in namespaces_of(ports[POSTGRES_PORT])
    if MILVUS_PORT in ports:
        uri = urlsplit(settings.milvus_uri)
        assert uri.port == MILVUS_PORT
        host = uri.hostname or ""
        match = re.fullmatch(r"[a-z0-9-]+\.([a-z0-9-]+)\.svc(\.cluster\.local)?", host)
        assert match, f"RECSYS_MILVUS_URI {settings.milvus_uri}: a Service name"
        assert namespaces_of(ports[MILVUS_PORT]) == {match[1]}, "egress reaches Milvus' namespace"


def test_shared_change_log_comes_from_a_secret(overlay: str, objects: Objects) -> None:
    """The log's URL and password from the Secret; no password in the environment or config."""
    assert shared_log(objects) == (overlay in {"shared-log", "milvus"}), overlay
    if not shared_log(objects):
        return
    c = container(objects, "retrieval")
    secrets = secret_env(c)
    assert secrets["RECSYS_CHANGE_LOG_URL"] == (CHANGE_LOG_SECRET, "url")
    assert secrets["PGPASSWORD"] == (CHANGE_LOG_SECRET, "password")
    assert not find(objects, "Secret"), "Secrets are created by hand, never committed"
    env = env_of(objects, "retrieval")
    assert not any("CHANGE_LOG_URL" in k for k in env), "the URL comes from the Secret only"
    assert not any("PASSWORD" in k.upper() for k in env)
    # The HPA may scale retrieval: every replica converges on the same log.
    assert one(objects, "HorizontalPodAutoscaler", "retrieval")["spec"]["maxReplicas"] > 8


def test_milvus_backend_settings_and_token(overlay: str, objects: Objects) -> None:
    settings = settings_of(objects, "retrieval")
    assert (settings.retrieval_backend == "milvus") == (overlay == "milvus"), overlay
    if settings.retrieval_backend != "milvus":
        return
    assert settings.milvus_uri.startswith(("http://", "https://")), "a Milvus server, not Lite"
    assert shared_log(objects), "online writes must reach every version's collection in order"
    # The token is a file from the Secret, mounted as a directory (a subPath mount would never
    # see a rotated Secret), never an environment variable.
    token = settings.milvus_token_file
    assert token is not None
    pod = one(objects, "Deployment", "retrieval")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = mounts[str(token.parent)]
    assert mount.get("readOnly") is True and "subPath" not in mount
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == MILVUS_SECRET
    assert {"key": "token", "path": token.name} in secret["items"]
    assert not any("MILVUS" in name for name in secret_env(pod["containers"][0]))


def test_tls_files_come_from_issued_certificates(overlay: str, objects: Objects) -> None:
    """With TLS on: each service mounts the Secret of a Certificate that names what callers
    dial, and the identities allowed to write hold client certificates from the same CA."""
    certificates = {c["spec"]["secretName"]: c for c in find(objects, "Certificate")}
    issuers = {i["metadata"]["name"] for i in find(objects, "Issuer")}
    for cert in certificates.values():
        assert cert["spec"]["issuerRef"]["name"] in issuers
    gateway_env = env_of(objects, "gateway")
    for service in SERVICES:
        settings = settings_of(objects, service)
        assert settings.tls_enabled() == (overlay == "mtls"), f"{overlay}/{service}"
        if not settings.tls_enabled():
            continue
        pod = one(objects, "Deployment", service)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        secrets = set()
        for path in (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file):
            assert path is not None
            mount = mounts[str(path.parent)]
            # A subPath mount never sees the renewed Secret.
            assert "subPath" not in mount and mount.get("readOnly") is True
            secrets.add(volumes[mount["name"]]["secret"]["secretName"])
        assert len(secrets) == 1, f"{service}: certificate, key and CA from one Secret"
        cert = certificates[secrets.pop()]["spec"]
        usages = set(cert["usages"])
        assert "server auth" in usages
        assert ("client auth" in usages) == (service == "gateway"), "only the gateway dials"
        if service != "gateway":
            host = gateway_env[f"RECSYS_{service.upper()}_ADDRESS"].removeprefix("dns:///")
            assert host.rsplit(":", 1)[0] in cert["dnsNames"]
    writers = settings_of(objects, "retrieval").write_identities
    for name in filter(None, (n.strip() for n in writers.split(","))):
        holders = [c for c in certificates.values() if c["spec"].get("commonName") == name]
        assert holders and "client auth" in holders[0]["spec"]["usages"], name


def test_gpu_only_for_retrieval_and_ranking(overlay: str, objects: Objects) -> None:
    for service in SERVICES:
        limits = container(objects, service)["resources"].get("limits", {})
        wants_gpu = overlay == "gpu" and service != "gateway"
        assert (GPU in limits) == wants_gpu, f"{overlay}/{service}"
        if wants_gpu:
            assert int(limits[GPU]) == 1
            assert env_of(objects, service)["RECSYS_DEVICE"] == "cuda"
            pod = one(objects, "Deployment", service)["spec"]["template"]["spec"]
            assert pod["nodeSelector"] and pod["tolerations"]
            assert container(objects, service)["image"].endswith("-cuda")
        else:
            assert not container(objects, service)["image"].endswith("-cuda")


# -- monitoring --------------------------------------------------------------------------------


def test_podmonitor_scrapes_every_service(objects: Objects) -> None:
    monitor = find(objects, "PodMonitor")[0]
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert all(
        e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["podMetricsEndpoints"]
    )
    for service in SERVICES:
        deployment = one(objects, "Deployment", service)
        assert labels_match(selector, deployment["spec"]["template"]["metadata"]["labels"])
        assert ports & {p["name"] for p in container(objects, service)["ports"]}


def test_grafana_dashboard_configmap(objects: Objects) -> None:
    [cm] = [c for c in find(objects, "ConfigMap") if "recsys-dashboard.json" in c.get("data", {})]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["recsys-dashboard.json"]) == json.loads(DASHBOARD.read_text())


def test_dashboard_uses_datasource_variable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in doc["templating"]["list"]}
    assert "datasource" in names
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


def test_queries_use_only_exported_metrics() -> None:
    known = exported_series()
    queries = dashboard_queries() + [expr for _, expr in alert_expressions()]
    assert len(queries) >= 20
    for query in queries:
        assert "$" not in query, query
        names = metric_names(query)
        assert names, query
        assert names <= known, f"unknown metrics {sorted(names - known)} in {query}"
    used = set().union(*(metric_names(q) for q in queries))
    for family in ("recsys_degraded_responses_total", "recsys_index_items", "recsys_bundle_info"):
        assert family in used


def test_the_metric_list_names_every_family_the_code_defines() -> None:
    """A family missing from EXPORTED_METRICS would be unknown to every check that reads it."""
    defined: dict[str, str] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                # prometheus_client drops a counter's _total from the family name; it is exposed.
                suffix = "_total" if family.type == "counter" else ""
                defined[family.name + suffix] = family.type
    assert defined == EXPORTED_METRICS


def test_selectors_use_exported_labels() -> None:
    for query in dashboard_queries() + [expr for _, expr in alert_expressions()]:
        for series, labels in selector_labels(query):
            unknown = labels - known_labels(series)
            assert not unknown, f"{series} has no labels {sorted(unknown)}: {query}"


def test_alerts_compare_a_query_with_a_threshold() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    required = {
        "RecsysHighErrorRatio",
        "RecsysHighLatencyP99",
        "RecsysDegradedAnswers",
        "RecsysTargetDown",
        "RecsysNotServing",
        "RecsysIndexShrank",
        "RecsysCatalogReplicaLagging",
        "RecsysChangeLogUnreachable",
    }
    assert required <= names
    docs = (REPO_ROOT / "docs" / "operations.md").read_text()
    for rule in rules:
        split_threshold(rule["expr"])
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["runbook"].startswith("docs/operations.md#")
        assert f"### {rule['alert']}" in docs, f"docs/operations.md explains {rule['alert']}"


def test_split_threshold() -> None:
    assert split_threshold("a / b > 0.05") == ("a / b", ">", 0.05)
    assert split_threshold("up{job=~'x'} == 0") == ("up{job=~'x'}", "==", 0.0)
    with pytest.raises(ValueError):
        split_threshold("rate(x[5m])")
    with pytest.raises(ValueError):
        split_threshold("(a > 1)")


def test_promql_parses(promtool: str, tmp_path: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    dashboard = [
        {"record": f"recsys:dashboard_query_{i}", "expr": q}
        for i, q in enumerate(dashboard_queries())
    ]
    stripped = [
        {"record": f"recsys:alert_query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(alert_expressions())
    ]
    path = tmp_path / "rules.yaml"
    groups = [
        *rules,
        {"name": "dashboard", "rules": dashboard},
        {"name": "bare", "rules": stripped},
    ]
    path.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(name: str) -> None:
    text = (DEPLOY / "docker" / name).read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) >= 2, "multi-stage"
    # Every stage on plain Debian (build-and-check.sh can make it without a registry), running
    # Debian's python3: the venv's interpreter symlink must resolve in the runtime stage too.
    assert "ARG BASE_IMAGE=debian:bookworm-slim" in text
    assert set(stages) == {"${BASE_IMAGE}"}
    assert "python3 -m venv /opt/venv" in text
    assert "COPY --from=builder /opt/venv /opt/venv" in text
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    assert 'ENTRYPOINT ["recsys"]' in text
    for package in ("recsys", "retrieval_service", "ranking_service", "gateway"):
        assert f"COPY {package} ./{package}" in text
    # Exactly one FAISS build per image: the cpu extra or the gpu extra, never both.
    extra = "gpu" if name.endswith(".cuda") else "cpu"
    other = "cpu" if extra == "gpu" else "gpu"
    assert f"optional-dependencies']['{extra}']" in text
    assert f"optional-dependencies']['{other}']" not in text
    # Every pip install in the image goes through the lock `make` and CI install through.
    installs = re.findall(r"pip install (.*)", text)
    assert installs and all("-c requirements/lock.txt" in i or "--no-deps ." in i for i in installs)


def test_dockerignore() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "artifacts", "tests", "**/__pycache__"} <= patterns
    for needed in ("pyproject.toml", "README.md", "requirements", "recsys", "gateway"):
        assert needed not in patterns
