"""Tenancy without servers: twin subjects, tenant users' generated permissions (each
reaches only its own tenant's twins), and the tenant bound to a submission (the
subject's, cross-checked against the token's tenant claim)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_auth import pem, resolver, token  # type: ignore[import-not-found]

from loom_core import routes, subjects, tenancy
from loom_core.routes import ROUTES
from loom_infra import auth
from loom_infra.credentials import covers, permissions, render_authorization, tenant_identities
from loom_services import tenants

TENANT = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True).filter(lambda t: t != "default")
PLAIN = st.sampled_from(
    [subjects.CONTROL, subjects.API_RUNS, subjects.submit("client"), subjects.progress("r1"),
     subjects.signal("payment", "A-17")]
)  # fmt: skip


@given(TENANT, PLAIN)
def test_a_twin_splits_back_into_its_tenant_and_plain_subject(tenant: str, plain: str) -> None:
    assert tenancy.split(tenancy.scoped(plain, tenant)) == (tenant, plain)
    assert tenancy.split(plain) == (None, plain)
    assert tenancy.scoped(plain, None) == tenancy.scoped(plain, "default") == plain


@pytest.mark.parametrize("name", ["", "Acme", "a.b", "a*", "a>", "-x", "default", "x" * 41])
def test_a_tenant_name_must_be_a_safe_token(name: str) -> None:
    with pytest.raises(tenancy.TenantError) as refused:
        tenancy.check_tenant(name)
    assert refused.value.info.code == "invalid_tenant"


def test_tenant_users_and_their_names() -> None:
    assert tenant_identities(["acme"]) == ("client@acme", "operator@acme")
    assert tenancy.parse_user("operator@acme") == ("operator", "acme")
    assert tenancy.parse_user("operator") is None
    with pytest.raises(tenancy.TenantError):
        tenancy.user("executor", "acme")  # a tenant has no service identities


def _concrete(route: routes.Route, tenant: str) -> list[str]:
    values = {p: "x" for p in route.params}
    values.update(run_id="R1", name="n", key="k", service="executor", via="operator")
    plain = route.subject(**{p: values[p] for p in route.params})
    if not plain.startswith(f"{subjects.PREFIX}."):
        return [plain]  # a bucket's subject ($KV, $O): no twin
    return [plain, tenancy.twin(plain, tenant)]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_a_tenant_user_reaches_only_its_own_tenants_twins(route: routes.Route) -> None:
    for role in tenancy.ROLES:
        mine = permissions(tenancy.user(role, "acme"))
        for subject in _concrete(route, "globex") + _concrete(route, "acme")[:1]:
            if route is routes.HEALTH:
                continue  # liveness pings: plain, no tenant's data
            assert not mine.may_publish(subject), (role, subject)
            assert not mine.may_subscribe(subject), (role, subject)
        # no JetStream API at all, no other identity's inbox
        assert not any(p.startswith("$JS") for p in mine.publish)
        assert all(s.startswith("_INBOX.") is False or s == f"_INBOX.{role}@acme.>"
                   for s in mine.subscribe)  # fmt: skip


def test_what_a_tenant_operator_may_do_is_the_twin_of_the_plain_operators() -> None:
    acme = permissions("operator@acme")
    plain = permissions("operator")
    for route in ROUTES:
        if not route.tenant_scoped:
            continue
        for subject in route.publisher_subjects("operator"):
            assert acme.may_publish(tenancy.twin(subject, "acme"))
            assert plain.may_publish(subject) and not plain.may_publish(
                tenancy.twin(subject, "acme")
            )
    # and the services serve every tenant's twin of what they serve
    executor = permissions("executor")
    assert executor.may_subscribe("loom.t.acme.control", "executor")
    assert covers("loom.t.*.progress.*", "loom.t.acme.progress.R1")
    assert executor.may_publish("loom.t.acme.progress.R1")


def test_the_server_config_names_the_tenant_users() -> None:
    text = render_authorization({"operator@acme": "UKEY", "client@acme": "UKEY2"})
    assert "# operator@acme" in text and '"loom.t.acme.control"' in text
    assert '"$JS.API' not in text


@dataclass
class _Msg:
    subject: str
    headers: dict[str, str] | None = None


def test_a_tenants_submission_is_bound_to_its_tenant(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = tmp_path / "issuer.pem"
    issuer.write_bytes(pem(key))
    r = resolver(public_key_file=issuer, anonymous=True)
    twin = tenancy.scoped(subjects.submit("client"), "acme")
    # anonymous (the stack allows it) or a token without a tenant: the subject's tenant
    assert tenants.submitter(r, _Msg(twin)).tenant == "acme"  # type: ignore[arg-type]
    no_claim = {"Authorization": f"Bearer {token(key, tenant=None)}"}
    assert tenants.submitter(r, _Msg(twin, no_claim)).tenant == "acme"  # type: ignore[arg-type]
    same = {"Authorization": f"Bearer {token(key, tenant='acme')}"}
    principal = tenants.submitter(r, _Msg(twin, same))  # type: ignore[arg-type]
    assert (principal.tenant, principal.user_id, principal.via) == ("acme", "alice", "client")
    other = {"Authorization": f"Bearer {token(key, tenant='globex')}"}
    with pytest.raises(auth.AuthError) as refused:
        tenants.submitter(r, _Msg(twin, other))  # type: ignore[arg-type]
    assert refused.value.error.code == "tenant_mismatch"
    # the platform's plain subject: the token's tenant, as before tenants
    plain = tenants.submitter(r, _Msg(subjects.submit("client"), other))  # type: ignore[arg-type]
    assert plain.tenant == "globex"


def test_loom_creds_generate_issues_a_tenants_client_and_operator(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loom_cli.app import app

    runner = CliRunner()
    done = runner.invoke(app, ["creds", "generate", "--out", str(tmp_path), "--tenant", "acme"])
    assert done.exit_code == 0, done.output
    for name in ("client@acme.nk", "operator@acme.nk", "operator.nk", "executor.nk"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    conf = (tmp_path / "nats-auth.conf").read_text()
    assert "# operator@acme" in conf and '"loom.t.acme.submit.client"' in conf
    # a tenant's seeds are handed to the tenant, never mounted into the services' pods
    assert "acme" not in (tmp_path / "secrets.yaml").read_text().replace("nats.conf", "")
    bad = runner.invoke(app, ["creds", "generate", "--out", str(tmp_path), "--tenant", "A.B"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


RUN_ID = st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)


@given(TENANT, PLAIN)
def test_a_letter_sent_on_a_tenants_twin_is_that_tenants(tenant: str, plain: str) -> None:
    assert tenancy.letter_owner(tenancy.twin(plain, tenant)) == (tenant, None)


@given(RUN_ID, st.sampled_from(["tool", "plan", "model", "timer"]), st.integers(0, 1023))
def test_a_letter_about_a_run_names_the_run(run_id: str, source: str, partition: int) -> None:
    # the run's tenant is then looked up: a letter is its run's tenant's
    assert tenancy.letter_owner(subjects.inbox(run_id, source)) == (None, run_id)
    stored = f"{subjects.PREFIX}.inbox.{partition}.{run_id}.{source}"
    assert tenancy.letter_owner(stored) == (None, run_id)
    assert tenancy.letter_owner(subjects.run_events_of(run_id).replace(">", "run_completed")) == (
        None, run_id,
    )  # fmt: skip


@pytest.mark.parametrize(
    "subject",
    ["loom.submit.client", "loom.control", "loom.signal.payment.A-17", "loom.run..x",
     "loom.inbox.R1", "other.run.R1.x", "loom.stream.R1", "", "loom.inbox.x.R1.tool"],
)  # fmt: skip
def test_a_platform_letter_is_nobodys_but_the_platforms(subject: str) -> None:
    assert tenancy.letter_owner(subject) == (None, None)


def test_a_tenant_operator_reads_tools_blobs_and_dead_letters_only_on_its_twins() -> None:
    acme = permissions("operator@acme")
    for plain in (subjects.API_TOOLS, subjects.API_BLOB, subjects.API_DEAD_LETTERS):
        assert acme.may_publish(tenancy.twin(plain, "acme"))
        assert not acme.may_publish(plain) and not acme.may_publish(tenancy.twin(plain, "globex"))
        assert not permissions("client@acme").may_publish(tenancy.twin(plain, "acme"))
    # its runs' streamed model text: its own twin only
    assert acme.may_subscribe("loom.t.acme.stream.R1")
    assert not acme.may_subscribe("loom.stream.R1") and not acme.may_subscribe("loom.t.*.stream.R1")
    assert permissions("planner").may_publish("loom.t.acme.stream.R1")
    # the platform's operator (the cluster's admin) hears every tenant's, as it reads
    # every tenant's run events; it publishes on no twin
    platform = permissions("operator")
    assert platform.may_subscribe("loom.t.acme.stream.R1")
    assert platform.may_subscribe("loom.t.globex.progress.R1")
    assert not platform.may_publish("loom.t.acme.stream.R1")
    assert not platform.may_subscribe("loom.t.acme.api.runs")


def test_a_tenant_sees_that_a_tool_is_unavailable_but_not_the_platforms_reason() -> None:
    from loom_core.contracts import ToolSpec
    from loom_services.tenant_reads import _for_tenants

    reason = "connect to http://10.0.0.7:9000 failed"
    down = ToolSpec(name="time.now", description="", input_schema={}, output_schema={},
                    available=False, unavailable_reason=reason)  # fmt: skip
    shown = _for_tenants(down)
    assert not shown.available and "10.0.0.7" not in shown.unavailable_reason
    assert shown.unavailable_reason and shown.name == down.name
    up = msgspec.structs.replace(down, available=True, unavailable_reason="")
    assert _for_tenants(up) is up
