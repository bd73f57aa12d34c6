"""Catalog metadata against the run's principal (loom_core.tool_access), and the tools
configuration file's validation (loom_services.tools.config): pure, no servers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom_core.contracts import ForeachStep, Plan, Principal, ToolSpec, ToolStep
from loom_core.tool_access import check_tool_access, tool_refusal
from loom_infra.settings import SettingsError
from loom_services.tools.config import MissingSecret, parse_tools_config, with_secrets

ANON = Principal(user_id="anonymous", via="client", anonymous=True)
ALICE = Principal(user_id="alice", via="client", issuer="https://idp")
ADMIN = Principal(user_id="root", via="client", roles=["admin"], issuer="https://idp")
OPERATOR = Principal(user_id="anonymous", via="operator", anonymous=True)


def spec(name: str = "t", **kw: object) -> ToolSpec:
    return ToolSpec(name=name, description="", input_schema={}, output_schema={}, **kw)


def test_requires_auth_refuses_anonymous_only() -> None:
    s = spec(requires_auth=True)
    assert "authenticated" in tool_refusal(s, ANON)
    assert tool_refusal(s, None) is not None  # runs stored before principals
    assert tool_refusal(s, ALICE) is None


def test_admin_only_needs_the_role_or_the_operator_identity() -> None:
    s = spec(admin_only=True)
    assert "admin" in tool_refusal(s, ALICE)
    assert tool_refusal(s, ADMIN) is None
    assert tool_refusal(s, OPERATOR) is None


def test_category_permissions_narrow_a_token() -> None:
    s = spec(category="network")
    assert tool_refusal(s, ALICE) is None  # no tools: permission: not narrowed
    narrowed = Principal(user_id="bob", via="client", permissions=["tools:time", "runs:read"])
    assert "tools:network" in tool_refusal(s, narrowed)
    wide = Principal(user_id="bob", via="client", permissions=["tools:*"])
    assert tool_refusal(s, wide) is None


def test_every_tool_step_is_checked_nested_ones_too() -> None:
    tools = {"secret": spec("secret", admin_only=True), "ok": spec("ok")}
    plan = Plan(
        steps=[
            ToolStep(id="a", tool="ok"),
            ForeachStep(id="f", items=[1, 2], do=[ToolStep(id="b", tool="secret")]),
            ToolStep(id="c", tool="unknown"),  # validation's issue, not ours
        ]
    )
    issues = check_tool_access(plan, tools, ALICE)
    assert [(i.code, i.path) for i in issues] == [("tool_forbidden", "$.plan.steps[1].do[0].tool")]
    assert check_tool_access(plan, tools, ADMIN) == []


@given(
    requires_auth=st.booleans(),
    admin_only=st.booleans(),
    anonymous=st.booleans(),
    roles=st.lists(st.sampled_from(["admin", "user", "viewer"]), max_size=3),
    via=st.sampled_from(["client", "operator", "executor"]),
)
def test_refusal_matches_the_rules(requires_auth, admin_only, anonymous, roles, via) -> None:
    p = Principal(user_id="u", via=via, roles=roles, anonymous=anonymous)
    refused = tool_refusal(spec(requires_auth=requires_auth, admin_only=admin_only), p)
    allowed = not (requires_auth and anonymous) and not (
        admin_only and "admin" not in roles and via != "operator"
    )
    assert (refused is None) == allowed


def test_config_parses_servers_and_metadata() -> None:
    config = parse_tools_config(
        {
            "mcp_servers": {
                "time": {"command": "mcp-server-time", "args": ["--x"], "timeout_s": 5},
                "web": {"url": "https://x/mcp", "headers": {"A": "Bearer ${secret:TOKEN}"}},
            },
            "tools": {"http_request": {"requires_auth": True, "category": "network"}},
            "breakers": {"threshold": 2, "cooldown_s": 1.5},
        }
    )
    time, web = config.mcp_servers
    assert (time.transport, time.args, time.timeout_s) == ("stdio", ("--x",), 5.0)
    assert web.transport == "http"
    assert config.tools["http_request"].requires_auth
    assert (config.breakers.threshold, config.breakers.cooldown_s) == (2, 1.5)


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ({"mcp_servers": {"a.b": {"command": "x"}}}, "$.mcp_servers.a.b"),
        ({"mcp_servers": {"s": {}}}, "exactly one of"),
        ({"mcp_servers": {"s": {"command": "x", "url": "http://y"}}}, "exactly one of"),
        ({"mcp_servers": {"s": {"url": "file:///etc/passwd"}}}, "$.mcp_servers.s.url"),
        ({"mcp_servers": {"s": {"command": "x", "args": "-v"}}}, "$.mcp_servers.s.args"),
        ({"mcp_servers": {"s": {"command": "x", "comand": 1}}}, "unknown key 'comand'"),
        ({"mcp_servers": {"s": {"command": "x", "env": {"A": 1}}}}, "$.mcp_servers.s.env"),
        ({"tools": {"t": {"admin_only": "yes"}}}, "$.tools.t.admin_only"),
        ({"breakers": {"threshold": 0}}, "$.breakers.threshold"),
        ({"breakers": {"cooldown_s": True}}, "$.breakers.cooldown_s"),
        ([], "expected a mapping"),
    ],
)
def test_config_mistakes_name_their_path(raw: object, where: str) -> None:
    with pytest.raises(SettingsError) as err:
        parse_tools_config(raw)
    assert where in str(err.value)


def test_secret_references_resolve_late_and_say_which_is_missing() -> None:
    values = {"Authorization": "Bearer ${secret:TOKEN}", "X": "plain"}
    assert with_secrets(values, {"TOKEN": "abc"}.get) == {
        "Authorization": "Bearer abc",
        "X": "plain",
    }
    with pytest.raises(MissingSecret) as err:
        with_secrets(values, {}.get)
    assert err.value.name == "TOKEN"
