"""Secrets (loom_core.secrets, loom_infra.secret_source): references stay references
until the tool-runner resolves the ones the plan wrote; inline values under secret-looking
keys are redacted before anything stores them; resolved values are scrubbed from what a
tool returns and from logs."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core import secrets
from loom_core.contracts import (
    ApprovalStep,
    ErrorInfo,
    EventRecord,
    ForeachStep,
    ParallelStep,
    Plan,
    PlanProposed,
    RunRequest,
    RunRequested,
    SubRunStep,
    SuspendRequest,
    ToolCallRequested,
    ToolStep,
)
from loom_core.executor import Submission, advance, initial_state, request_digest
from loom_core.replay import replay
from loom_core.spans import redact as span_redact
from loom_core.templating import TemplateSyntaxError, render, template_errors
from loom_core.validation import validate_plan
from loom_infra.secret_source import MAX_SECRET_BYTES, LogScrubber, SecretSource
from loom_infra.settings import SecretSettings, secret_settings_from_env
from loom_services.toolrunner import redact_outcome
from loom_services.tools.registry import ToolOutcome

MARKER = secrets.MARKER
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- keys

SECRET_KEYS = [
    "password", "Password", "db_password", "newpassword", "passwd", "passphrase", "db_pass",
    "pwd", "secret", "client_secret", "clientSecret", "secret_key", "token", "access_token",
    "accessToken", "githubtoken", "refresh_token_value", "x-amz-security-token", "api_key",
    "apiKey", "API_KEY", "APIKey", "X-Api-Key", "api-key", "apikey", "Authorization",
    "Proxy-Authorization", "authorization", "access_key", "AccessKey", "private_key",
    "X-Private_Key", "ssh_key", "signing_key", "cookie", "Cookie", "Set-Cookie", "cookies",
    "credential", "credentials", "basic_auth", "auth", "bearer",
]  # fmt: skip
PLAIN_KEYS = [
    "key", "id", "jwt", "name", "text", "url", "headers", "max_tokens", "input_tokens",
    "tokens", "token_count", "token_type", "token_url", "secret_name", "auth_mode",
    "author", "oauth", "tokenizer", "pass_rate", "keyboard", "idempotency_key", "monkey",
    "passage", "compass",
]  # fmt: skip


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_looking_keys(key: str) -> None:
    assert secrets.is_secret_key(key)


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_plain_keys(key: str) -> None:
    assert not secrets.is_secret_key(key)


def test_non_string_keys_are_not_secret() -> None:
    assert not secrets.is_secret_key(3)
    assert not secrets.is_secret_key(None)


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call with Bearer abcdefgh12345 now", f"call with Bearer {MARKER} now"),
        ("Basic dXNlcjpwYXNzd29yZA==", f"Basic {MARKER}"),
        ("token ABCDEFGHIJKLMNOPQRSTUV", f"token {MARKER}"),
        ("explain bearer authentication", "explain bearer authentication"),
        ("Bearer {{ secrets.TOKEN }}", "Bearer {{ secrets.TOKEN }}"),
        ("key sk-proj-abcdefghijklmnopqrstuv", f"key sk-{MARKER}"),
        ("sk-short", "sk-short"),
        ("https://ada:s3cr3t@example.com/x", f"https://ada:{MARKER}@example.com/x"),
        ("https://ada:{{secrets.PW}}@example.com/x", "https://ada:{{secrets.PW}}@example.com/x"),
        ("AKIAIOSFODNN7EXAMPLE", MARKER),
        ("ghp_" + "a" * 36, MARKER),
        ("xoxb-1234567890-abcdef", MARKER),
        (
            "k: -----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY----- ok",
            f"k: {MARKER} ok",
        ),
        ("cut -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqh", f"cut {MARKER}"),
        ("plain words, nothing here", "plain words, nothing here"),
    ],
)
def test_scrub_text(text: str, expected: str) -> None:
    assert secrets.scrub_text(text) == expected
    assert secrets.scrub_text(expected) == expected  # idempotent


def test_scrub_raw_text_catches_pairs_in_text_that_is_not_json() -> None:
    raw = '{"input": {"api_key": "c4n4ry", "headers": {"Authorization": "Bearer c4n4ry'
    out = secrets.scrub_raw_text(raw)
    assert "c4n4ry" not in out
    assert out.startswith('{"input": {"api_key": "[redacted]"')
    assert secrets.scrub_raw_text("password=hunter2&user=ada") == f"password={MARKER}&user=ada"
    assert secrets.scrub_raw_text("token: abc, n: 1") == f"token: {MARKER}, n: 1"
    assert secrets.scrub_raw_text('{"name": "ada"}') == '{"name": "ada"}'


# --------------------------------------------------------------------------- values


def test_redact_value_replaces_strings_under_secret_keys_at_any_depth() -> None:
    value = {
        "api_key": "k-123",
        "headers": {"Authorization": "Bearer abc", "Accept": "json"},
        "auth": {"user": "ada", "scopes": ["a", "b"], "n": 3},
        "nested": [{"password": ""}, {"token": None}, {"cookie": MARKER}],
        "ref": {"api_key": "{{ secrets.KEY }}", "Authorization": "Bearer {{ secrets.T }}"},
        "mixed": {"password": "hunter2 {{ secrets.P }}"},
        "max_tokens": 100,
        "text": "hello",
    }
    before = msgspec.json.encode(value)
    out, paths = secrets.redact_value(value, "$.input")
    assert msgspec.json.encode(value) == before  # never mutated
    assert out == {
        "api_key": MARKER,
        "headers": {"Authorization": MARKER, "Accept": "json"},
        "auth": {"user": MARKER, "scopes": [MARKER, MARKER], "n": 3},
        "nested": [{"password": ""}, {"token": None}, {"cookie": MARKER}],
        "ref": {"api_key": "{{ secrets.KEY }}", "Authorization": "Bearer {{ secrets.T }}"},
        "mixed": {"password": MARKER},
        "max_tokens": 100,
        "text": "hello",
    }
    assert paths == [
        "$.input.api_key",
        "$.input.headers.Authorization",
        "$.input.auth.user",
        "$.input.auth.scopes[0]",
        "$.input.auth.scopes[1]",
        "$.input.mixed.password",
    ]
    assert out["text"] is value["text"] and out["nested"] is value["nested"]  # shared


def test_redact_value_returns_the_value_itself_when_nothing_changes() -> None:
    value = {"a": [1, {"b": "c"}], "token_count": 5}
    out, paths = secrets.redact_value(value)
    assert out is value and paths == []


def test_redact_value_on_deep_nesting_does_not_recurse() -> None:
    value: Any = "Bearer abcdefgh12345"
    for _ in range(5000):
        value = [value]
    out, paths = secrets.redact_value(value)
    for _ in range(5000):
        out = out[0]
    assert out == f"Bearer {MARKER}" and len(paths) == 1


def test_reports_are_bounded() -> None:
    _, paths = secrets.redact_value({"cookies": ["x"] * 500})
    request, reported = secrets.redact_request(
        RunRequest(request="r", input={"cookies": ["x"] * 500})
    )
    assert len(paths) == 500
    assert len(reported) == secrets.MAX_REPORTED + 1 and reported[-1] == "... and 400 more"
    assert request.input == {"cookies": [MARKER] * 500}


def test_spans_use_the_same_lists() -> None:
    # spans mask a secret key's whole value (display), with the same key list
    assert span_redact({"X-Api-Key": {"v": 1}, "token_count": 3}) == {
        "X-Api-Key": MARKER,
        "token_count": 3,
    }


# --------------------------------------------------------------------------- requests


def _tool(sid: str, **inp: Any) -> ToolStep:
    return ToolStep(id=sid, tool="echo", input=inp)


def test_redact_request_covers_input_labels_text_and_the_plans_data() -> None:
    plan = Plan(
        steps=[
            _tool("a", api_key="k-1", q="{{ input.q }}"),
            ForeachStep(
                id="fe",
                items=["x"],
                do=[
                    ToolStep(
                        id="b",
                        tool="echo",
                        input={"password": "p-2"},
                        on_error="fallback",
                        fallback=_tool("b2", token="t-3"),
                    )
                ],
            ),
            ParallelStep(id="par", branches={"left": [_tool("c", secret="s-4")]}),
            SubRunStep(id="sub", plan=Plan(steps=[_tool("d", cookie="c-5")]), input={}),
            ApprovalStep(
                id="ok",
                label="approve",
                payload={"credentials": "c-6"},
                schema={"properties": {"password": {"type": "string"}}},
            ),
        ],
        output={"Authorization": "Bearer t-7"},
    )
    request = RunRequest(
        plan=plan,
        input={"q": "hi", "headers": {"Authorization": "Bearer t-8"}},
        labels={"team": "a", "api_key": "k-9"},
    )
    out, paths = secrets.redact_request(request)
    assert isinstance(out, RunRequest)
    text = msgspec.json.encode(out).decode()
    for n in range(1, 10):
        assert f"-{n}" not in text, n
    assert set(paths) == {
        "$.input.headers.Authorization",
        "$.labels.api_key",
        "$.plan.output.Authorization",
        "$.plan.steps[0].input.api_key",
        "$.plan.steps[1].do[0].input.password",
        "$.plan.steps[1].do[0].fallback.input.token",
        "$.plan.steps[2].branches.left[0].input.secret",
        "$.plan.steps[3].plan.steps[0].input.cookie",
        "$.plan.steps[4].payload.credentials",
    }
    # structure is not data: the approval's answer schema stays a schema
    assert out.plan is not None
    approval = out.plan.steps[4]
    assert isinstance(approval, ApprovalStep)
    assert approval.schema == {"properties": {"password": {"type": "string"}}}
    assert out.input["q"] == "hi" and out.labels["team"] == "a"
    assert out.plan is not None and validate_plan(out.plan) == []


def test_redact_request_without_secrets_is_the_request_itself() -> None:
    request = RunRequest(plan=Plan(steps=[_tool("a", q="{{ secrets.K }}")]), input={"x": 1})
    out, paths = secrets.redact_request(request)
    assert out is request and paths == ()


def test_redact_request_scrubs_the_natural_language_request() -> None:
    out, paths = secrets.redact_request(RunRequest(request="use key sk-abcdefghijklmnopqrstu"))
    assert out.request == f"use key sk-{MARKER}" and paths == ("$.request",)


# --------------------------------------------------------------------------- templates


def test_templating_leaves_secret_references_verbatim() -> None:
    value = {
        "whole": "{{ secrets.TOKEN }}",
        "spaced": "  {{secrets.TOKEN}} ",
        "inside": "Bearer {{ secrets.TOKEN }}",
        "mixed": "{{ input.user }}:{{ secrets.PASS }}",
    }
    out = render(value, {"input": {"user": "ada"}})
    assert out == {
        "whole": "{{ secrets.TOKEN }}",
        "spaced": "  {{secrets.TOKEN}} ",
        "inside": "Bearer {{ secrets.TOKEN }}",
        "mixed": "ada:{{ secrets.PASS }}",
    }
    assert render(out, {"input": {}}) == out  # rendering again changes nothing


@pytest.mark.parametrize(
    "bad",
    ["{{ secrets }}", "{{ secrets.a.b }}", "{{ secrets.my-key }}", '{{ secrets["K"] }}',
     "{{ secrets.1abc }}", "{{ secrets." + "a" * 65 + " }}", "{{ secrets[0] }}"],
)  # fmt: skip
def test_malformed_secret_references_are_syntax_errors_with_their_path(bad: str) -> None:
    errors = template_errors({"input": {"h": ["ok", bad]}})
    assert [(e.code, e.path) for e in errors] == [("invalid_template", "$.input.h[1]")]
    assert "secrets.NAME" in errors[0].message
    with pytest.raises(TemplateSyntaxError):
        render(bad, {})


def test_validation_accepts_references_wherever_a_template_may_be() -> None:
    plan = Plan(
        steps=[
            _tool("a", h={"Authorization": "Bearer {{ secrets.T }}"}, k="{{ secrets.K }}"),
            ApprovalStep(id="ok", label="x", payload={"note": "{{ secrets.N }}"}),
        ],
        output="{{ secrets.O }}",
    )
    assert validate_plan(plan, run_input={}) == []
    broken = Plan(steps=[_tool("a", h={"Authorization": "Bearer {{ secrets.bad-name }}"})])
    issues = validate_plan(broken)
    assert [(i.code, i.path) for i in issues] == [
        ("invalid_template", "$.plan.steps[0].input.h.Authorization")
    ]


# --------------------------------------------------------------------------- the executor


def _run(request: RunRequest, redacted: tuple[str, ...] = ()) -> list[Any]:
    state = initial_state("r1")
    events = list(advance(state, Submission(request, None, redacted), T0))
    digest = request_digest("r1", events[0])
    assert request.plan is not None
    events += advance(
        state, PlanProposed(run_id="r1", plan=request.plan, request_digest=digest), T0
    )
    return events


def test_executor_records_references_and_where_the_plan_wrote_them() -> None:
    plan = Plan(
        steps=[
            _tool(
                "a",
                headers={"Authorization": "Bearer {{ secrets.TOKEN }}"},
                q="{{ input.q }}",
                both="{{ secrets.U }}:{{ secrets.P }}",
            )
        ]
    )
    events = _run(RunRequest(plan=plan, input={"q": "{{ secrets.TOKEN }}"}))
    call = next(e for e in events if isinstance(e, ToolCallRequested))
    assert call.input == {
        "headers": {"Authorization": "Bearer {{ secrets.TOKEN }}"},
        "q": "{{ secrets.TOKEN }}",  # data: arrives as text, never resolved
        "both": "{{ secrets.U }}:{{ secrets.P }}",
    }
    assert call.secret_refs == {"$.headers.Authorization": ["TOKEN"], "$.both": ["U", "P"]}


def test_run_requested_says_what_was_redacted_and_replays() -> None:
    request, redacted = secrets.redact_request(
        RunRequest(plan=Plan(steps=[_tool("a", q="x")]), input={"api_key": "k-1"})
    )
    events = _run(request, redacted)
    first = events[0]
    assert isinstance(first, RunRequested)
    assert first.redacted == ["$.input.api_key"] and first.input == {"api_key": MARKER}
    records = [EventRecord(run_id="r1", seq=i + 1, at=T0, event=e) for i, e in enumerate(events)]
    report, _ = replay(records)
    assert report.identical, report.divergence


# --------------------------------------------------------------------------- resolution


def test_resolve_substitutes_only_where_the_plan_wrote_references() -> None:
    sites = {"$.h.Authorization": ["TOKEN"], "$.q": ["K"]}
    rendered = {
        "h": {"Authorization": "Bearer {{ secrets.TOKEN }}"},
        "q": "hello {{ secrets.K }}!",
        "data": "{{ secrets.K }}",
    }
    values = {"TOKEN": "tok-1234", "K": "kval"}
    out, used = secrets.resolve(rendered, sites, values.get, "a")
    assert out == {
        "h": {"Authorization": "Bearer tok-1234"},
        "q": "hello kval!",
        "data": "{{ secrets.K }}",
    }
    assert sorted(used) == ["kval", "tok-1234"]
    assert rendered["q"] == "hello {{ secrets.K }}!"  # not mutated
    same, none = secrets.resolve(rendered, {}, values.get)
    assert same is rendered and none == []


def test_a_missing_secret_fails_naming_it_and_where_never_a_value() -> None:
    with pytest.raises(secrets.SecretReferenceError) as caught:
        secrets.resolve({"h": "Bearer {{ secrets.GONE }}"}, {"$.h": ["GONE"]}, {}.get, "call")
    error = caught.value.error
    assert error.code == "secret_not_found" and error.path == "$.h"
    assert error.details == {"secret": "GONE"} and not error.retryable
    assert "'GONE'" in error.message and "step 'call'" in error.message


def test_references_injected_as_data_are_refused() -> None:
    # the plan wrote "{{ input.x }} {{ secrets.K }}"; input.x brought another reference
    rendered = {"q": "{{ secrets.OTHER }} {{ secrets.K }}"}
    with pytest.raises(secrets.SecretReferenceError) as caught:
        secrets.resolve(rendered, {"$.q": ["K"]}, {"K": "v", "OTHER": "w"}.get)
    assert caught.value.error.code == "untrusted_secret_reference"
    assert caught.value.error.details == {"expected": ["K"], "found": ["OTHER", "K"]}


# --------------------------------------------------------------------------- scrubbing


def test_scrub_values_masks_keys_values_and_url_encoded_forms() -> None:
    forms = secrets.scrub_forms(["s3cr3t/value x", "ab"])
    assert "ab" not in forms  # too short to scrub
    out = secrets.scrub_values(
        {
            "text": "got s3cr3t/value x back",
            "s3cr3t/value x": 1,
            "url": "https://h/?k=s3cr3t%2Fvalue%20x",
            "form": "k=s3cr3t%2Fvalue+x",
            "n": 2,
        },
        forms,
    )
    assert out == {
        "text": f"got {MARKER} back",
        MARKER: 1,
        "url": f"https://h/?k={MARKER}",
        "form": f"k={MARKER}",
        "n": 2,
    }


def test_redact_outcome_scrubs_output_error_and_suspension() -> None:
    forms = secrets.scrub_forms(["v4lue-canary"])
    outcome = ToolOutcome(
        ok=False,
        output={"text": "echo v4lue-canary", "token": "t"},
        error=ErrorInfo(code="x", message="bad v4lue-canary", details={"seen": "v4lue-canary"}),
        suspend=SuspendRequest(label="l v4lue-canary", payload={"password": "p"}),
    )
    out = redact_outcome(outcome, forms)
    text = msgspec.json.encode([out.output, out.error, out.suspend]).decode()
    assert "v4lue-canary" not in text
    assert out.output == {"text": f"echo {MARKER}", "token": MARKER}
    assert out.suspend is not None and out.suspend.payload == {"password": MARKER}


# --------------------------------------------------------------------------- the source


def test_secret_settings_from_env_keeps_values_exact_and_out_of_repr() -> None:
    settings = secret_settings_from_env(
        {"LOOM_SECRET_A": " spaced ", "LOOM_SECRETS_DIR": "/run/s", "OTHER": "x"}
    )
    assert settings.env == {"A": " spaced "} and settings.dir == Path("/run/s")
    assert "spaced" not in repr(settings) and "A" in repr(settings)


def test_secret_source_reads_env_then_files(tmp_path: Path) -> None:
    (tmp_path / "FILE").write_text("from-file\n")
    (tmp_path / "BOTH").write_text("file-loses")
    (tmp_path / "BIG").write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    (tmp_path / "BIN").write_bytes(b"\xff\xfe")
    source = SecretSource(
        SecretSettings(dir=tmp_path, env={"ENV": "from-env", "BOTH": "env-wins"}),
        LogScrubber(),
    )
    assert source.get("ENV") == "from-env"
    assert source.get("FILE") == "from-file"  # one trailing newline dropped
    assert source.get("BOTH") == "env-wins"
    assert source.get("NOPE") is None
    assert source.get("../FILE") is None and source.get("..data") is None
    for name in ("BIG", "BIN"):
        with pytest.raises(secrets.SecretReferenceError) as caught:
            source.get(name)
        assert caught.value.error.code == "secret_unreadable"
        assert caught.value.error.details == {"secret": name}
    assert SecretSource(SecretSettings(), LogScrubber()).get("ENV") is None


def test_log_records_never_show_a_value_the_source_handed_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scrubber = LogScrubber()
    source = SecretSource(SecretSettings(env={"K": "l0g-canary-value"}), scrubber)
    scrubber.install()  # twice is harmless
    value = source.get("K")
    log = logging.getLogger("loom.test.secrets")
    with caplog.at_level(logging.DEBUG):
        log.debug("resolved %s for %r", value, "K")
        try:
            raise RuntimeError(f"failed with {value}")
        except RuntimeError:
            log.exception("boom")
    assert "l0g-canary-value" not in caplog.text
    assert f"resolved {MARKER} for 'K'" in caplog.text and "RuntimeError" in caplog.text


# --------------------------------------------------------------------------- properties

_SAFE_TEXT = st.text(alphabet="acdefghijlmnqvwxyz 0123456789.", max_size=12)
_PLAIN_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
    lambda k: not secrets.is_secret_key(k)
)
_SECRET_KEY = st.sampled_from(SECRET_KEYS)
_ANY_TEXT = st.text(max_size=24)


def _json(keys: st.SearchStrategy[str], text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers() | text
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=20,
    )


@settings(max_examples=300, deadline=None)
@given(_json(_PLAIN_KEY | _SECRET_KEY, _ANY_TEXT | st.sampled_from(["Bearer abcdefgh1234"])))
def test_redaction_is_idempotent(value: Any) -> None:
    once, _ = secrets.redact_value(value)
    twice, paths = secrets.redact_value(once)
    assert twice == once and paths == []


@settings(max_examples=300, deadline=None)
@given(_json(_PLAIN_KEY, _SAFE_TEXT))
def test_redaction_never_touches_plain_keys_and_plain_text(value: Any) -> None:
    out, paths = secrets.redact_value(value)
    assert out is value and paths == []


@settings(max_examples=300, deadline=None)
@given(
    value=_json(_PLAIN_KEY | _SECRET_KEY, _ANY_TEXT),
    key=_SECRET_KEY,
    wrap=st.sampled_from(["plain", "list", "dict", "deep"]),
    where=st.lists(st.integers(min_value=0, max_value=10), max_size=6),
    canary=st.text(alphabet="0123456789abcdef", min_size=16, max_size=32),
)
def test_a_canary_under_a_secret_key_never_survives(
    value: Any, key: str, wrap: str, where: list[int], canary: str
) -> None:
    canary = "cAnArY" + canary
    inner: Any = {
        "plain": canary,
        "list": [1, canary],
        "dict": {"x": canary},
        "deep": {"a": [{"b": [canary]}]},
    }[wrap]
    # walk into the value along `where`, and put {key: inner} in the first object met
    holder = {"v": value}
    node: Any = holder
    for step in where:
        children = list(node.values()) if isinstance(node, dict) else node
        containers = [c for c in children if isinstance(c, dict | list)]
        if not containers:
            break
        node = containers[step % len(containers)]
    if isinstance(node, list):
        node.append({key: inner})
    else:
        node[key] = inner
    out, paths = secrets.redact_value(holder)
    assert canary not in msgspec.json.encode(out).decode()
    assert paths  # and the run says so
    # keys and shapes are kept
    assert _shape(out) == _shape(holder)


def _shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


@settings(max_examples=300, deadline=None)
@given(
    value=_json(_ANY_TEXT, _ANY_TEXT),
    secret=st.text(min_size=secrets.MIN_SCRUB_LENGTH, max_size=24).filter(
        lambda s: MARKER not in s and s not in MARKER
    ),
    prefix=_ANY_TEXT,
    as_key=st.booleans(),
)
def test_scrubbed_output_never_contains_a_resolved_value(
    value: Any, secret: str, prefix: str, as_key: bool
) -> None:
    planted = {f"{prefix}{secret}": 1} if as_key else {"text": f"{prefix}{secret}!"}
    out = secrets.scrub_values([value, planted], secrets.scrub_forms([secret]))
    assert secret not in msgspec.json.encode(out).decode("utf-8") or out == MARKER
    assert not _contains(out, secret)


def _contains(value: Any, needle: str) -> bool:
    if isinstance(value, str):
        return needle in value
    if isinstance(value, dict):
        return any(_contains(k, needle) or _contains(v, needle) for k, v in value.items())
    if isinstance(value, list):
        return any(_contains(v, needle) for v in value)
    return False


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,63}", fullmatch=True), min_size=1),
    text=_SAFE_TEXT,
)
def test_references_round_trip_through_render_and_resolve(names: list[str], text: str) -> None:
    template = text.join("{{ secrets.%s }}" % n for n in names)  # noqa: UP031
    step_input = {"h": template}
    assert render(step_input, {}) == step_input
    sites = secrets.reference_sites(step_input)
    assert sites == {"$.h": names}
    values = {n: hashlib.sha256(n.encode()).hexdigest() for n in names}
    out, used = secrets.resolve(step_input, sites, values.get)
    assert out == {"h": text.join(values[n] for n in names)}
    assert sorted(used) == sorted(values[n] for n in names)
