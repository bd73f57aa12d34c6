"""Tool registry, built-in tools and execute_tool's typed errors.

The http_get tests talk only to a server on 127.0.0.1 started here; every other
address is refused before any connection (asserted by recording connects)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field

import httpcore
import httpx
import msgspec
import pytest

from loom_core.contracts import ToolSpec
from loom_services.tools import (
    Tool,
    ToolContext,
    ToolFailure,
    ToolInput,
    ToolOutcome,
    ToolRegistry,
    ToolSettings,
    default_registry,
    execute_tool,
    make_tool,
    tool,
)
from loom_services.tools.builtins import _pinned_request
from loom_services.tools.netguard import ResolvedTarget, check_url


def ctx(**settings) -> ToolContext:
    return ToolContext(
        idempotency_key="run-1:step-a:1",
        run_id="run-1",
        step_id="step-a",
        attempt=1,
        settings=ToolSettings(**settings),
    )


@pytest.fixture
def registry() -> ToolRegistry:
    return default_registry()


async def run(registry: ToolRegistry, name: str, raw: dict, **kw) -> ToolOutcome:
    settings = kw.pop("settings", {})
    return await execute_tool(registry, name, raw, ctx(**settings), **kw)


# --------------------------------------------------------------------------- built-ins


def test_default_registry_has_every_builtin(registry: ToolRegistry) -> None:
    assert registry.names() == [
        "concat", "echo", "flaky", "http_get", "http_request", "math", "noop", "sleep", "text"
    ]  # fmt: skip


async def test_echo_returns_any_json_unchanged(registry: ToolRegistry) -> None:
    message = {"a": [1, 2.5, None, True], "b": {"c": "ü"}}
    outcome = await run(registry, "echo", {"message": message})
    assert outcome == ToolOutcome(ok=True, output={"message": message})
    assert (await run(registry, "echo", {"message": None})).output == {"message": None}


async def test_noop_returns_empty_object(registry: ToolRegistry) -> None:
    assert await run(registry, "noop", {}) == ToolOutcome(ok=True, output={})


@pytest.mark.parametrize(
    "op, text, result",
    [
        ("upper", "Hello wörld", "HELLO WÖRLD"),
        ("lower", "Hello World", "hello world"),
        ("title", "hello big world", "Hello Big World"),
        ("reverse", "abc", "cba"),
        ("word_count", "  one two\tthree\nfour ", 4),
        ("word_count", "", 0),
        ("length", "héllo", 5),
        ("strip", "  x y  ", "x y"),
    ],
)
async def test_text_ops(registry: ToolRegistry, op: str, text: str, result) -> None:
    outcome = await run(registry, "text", {"text": text, "op": op})
    assert outcome.ok, outcome.error
    assert outcome.output == {"result": result}
    assert type(outcome.output["result"]) is type(result)


async def test_concat(registry: ToolRegistry) -> None:
    assert (await run(registry, "concat", {"parts": ["a", "b", "c"]})).output == {"text": "abc"}
    out = await run(registry, "concat", {"parts": ["a", "b"], "sep": ", "})
    assert out.output == {"text": "a, b"}
    assert (await run(registry, "concat", {"parts": []})).output == {"text": ""}


async def test_sleep_sleeps(registry: ToolRegistry) -> None:
    start = time.monotonic()
    outcome = await run(registry, "sleep", {"seconds": 0.02})
    assert outcome == ToolOutcome(ok=True, output={"slept": 0.02})
    assert time.monotonic() - start >= 0.02


def attempt_ctx(attempt: int) -> ToolContext:
    return ToolContext(
        idempotency_key=f"run-1:step-a:{attempt}", run_id="run-1", step_id="step-a", attempt=attempt
    )


async def test_flaky_fails_the_first_attempts_then_returns_value_and_attempt(
    registry: ToolRegistry,
) -> None:
    raw = {"fail_times": 2, "value": {"v": [1, "x"]}}
    outcomes = [await execute_tool(registry, "flaky", raw, attempt_ctx(n)) for n in (1, 2, 3, 4)]
    for n, failed in zip((1, 2), outcomes[:2], strict=True):
        assert not failed.ok
        assert failed.error.code == "flaky" and failed.error.retryable
        assert failed.error.details == {"attempt": n, "fail_times": 2}
        assert "retry.max_attempts > 2" in failed.error.message
    assert outcomes[2] == ToolOutcome(ok=True, output={"value": {"v": [1, "x"]}, "attempt": 3})
    assert outcomes[3].output == {"value": {"v": [1, "x"]}, "attempt": 4}
    # deterministic: the same attempt always gets the same answer
    again = await execute_tool(registry, "flaky", raw, attempt_ctx(2))
    assert again == outcomes[1]


async def test_flaky_defaults_and_custom_code(registry: ToolRegistry) -> None:
    assert (await run(registry, "flaky", {"fail_times": 0})).output == {"value": None, "attempt": 1}
    outcome = await run(registry, "flaky", {"fail_times": 1, "code": "upstream_down"})
    assert (outcome.error.code, outcome.error.retryable) == ("upstream_down", True)
    spec = registry.get("flaky").spec()
    assert spec.idempotent
    assert spec.input_schema["$defs"]["FlakyInput"]["required"] == ["fail_times"]


@pytest.mark.parametrize(
    "raw, path",
    [
        ({"fail_times": 11}, "$.fail_times"),
        ({"fail_times": -1}, "$.fail_times"),
        ({"fail_times": 1.5}, "$.fail_times"),
        ({"fail_times": 1, "code": ""}, "$.code"),
        ({"value": 1}, "$.fail_times"),
        ({"fail_times": 1, "times": 2}, "$.times"),
    ],
)
async def test_flaky_rejects_bad_input(registry: ToolRegistry, raw: dict, path: str) -> None:
    outcome = await run(registry, "flaky", raw)
    assert (outcome.error.code, outcome.error.path) == ("invalid_input", path)


@pytest.mark.parametrize(
    "op, a, b, result",
    [
        ("add", 2, 3, 5),
        ("sub", 2, 3, -1),
        ("mul", 4, -3, -12),
        ("max", 2, 7, 7),
        ("min", 2, 7, 2),
        ("add", 0.5, 0.25, 0.75),
        ("add", 1, 0.5, 1.5),
        ("mul", 2, 2.0, 4.0),
        ("max", 2, 1.5, 2.0),  # mixed operands give a float even when the int wins
        ("min", -1.5, 3, -1.5),
    ],
)
async def test_math_ops(registry: ToolRegistry, op: str, a, b, result) -> None:
    outcome = await run(registry, "math", {"op": op, "a": a, "b": b})
    assert outcome == ToolOutcome(ok=True, output={"result": result})
    assert type(outcome.output["result"]) is type(result)  # ints stay ints


@pytest.mark.parametrize(
    "raw, code, path",
    [
        ({"op": "div", "a": 1, "b": 2}, "invalid_input", "$.op"),
        ({"op": "add", "a": "1", "b": 2}, "invalid_input", "$.a"),
        ({"op": "add", "a": True, "b": 2}, "invalid_input", "$.a"),  # JSON: true is no number
        ({"op": "add", "a": 1}, "invalid_input", "$.b"),
        ({"op": "mul", "a": 1e308, "b": 10.0}, "out_of_range", None),
        ({"op": "mul", "a": 2**62, "b": 4}, "out_of_range", None),
    ],
)
async def test_math_errors(registry: ToolRegistry, raw: dict, code: str, path) -> None:
    outcome = await run(registry, "math", raw)
    assert (outcome.error.code, outcome.error.path) == (code, path)
    assert not outcome.error.retryable


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "name, raw, path, fragment",
    [
        ("text", {"text": 3, "op": "upper"}, "$.text", "expected a string, got an integer 3"),
        ("text", {"op": "upper"}, "$.text", "missing required field 'text' (a string)"),
        ("text", {"text": "x", "op": "shout"}, "$.op", 'got "shout"'),
        ("text", {"text": "x", "op": "upper", "opp": 1}, "$.opp",
         "unknown field 'opp'; did you mean 'op'?"),
        ("concat", {"parts": ["a", 2]}, "$.parts[1]", "expected a string, got an integer 2"),
        ("sleep", {"seconds": -1}, "$.seconds", "must be >= 0, got -1"),
        ("sleep", {"seconds": 99999}, "$.seconds", "<= 3600"),
        ("echo", {}, "$.message", "missing required field 'message'"),
        ("noop", {"x": 1}, "$.x", "unknown field 'x'"),
    ],
)  # fmt: skip
async def test_invalid_input_names_path_and_expectation(
    registry: ToolRegistry, name: str, raw: dict, path: str, fragment: str
) -> None:
    outcome = await run(registry, name, raw)
    assert not outcome.ok
    error = outcome.error
    assert error is not None
    assert (error.code, error.path, error.retryable) == ("invalid_input", path, False)
    assert fragment in error.message
    assert "expected an" in error.message  # describes the input fields


async def test_invalid_input_lists_allowed_values(registry: ToolRegistry) -> None:
    outcome = await run(registry, "text", {"text": "x", "op": "shout"})
    assert "word_count" in outcome.error.message and "text (required)" in outcome.error.message


async def test_input_that_is_not_an_object(registry: ToolRegistry) -> None:
    outcome = await run(registry, "echo", ["not", "an", "object"])  # type: ignore[arg-type]
    assert (outcome.error.code, outcome.error.path) == ("invalid_input", "$")


async def test_unknown_tool_lists_available_tools(registry: ToolRegistry) -> None:
    outcome = await run(registry, "ecko", {})
    error = outcome.error
    assert error.code == "unknown_tool"
    assert "'ecko'" in error.message
    for name in registry.names():
        assert name in error.message
    assert error.details["available"] == registry.names()


# --------------------------------------------------------------------------- timeouts, failures


async def test_step_timeout_returns_timeout_quickly(registry: ToolRegistry) -> None:
    start = time.monotonic()
    outcome = await run(registry, "sleep", {"seconds": 30}, timeout_s=0.05)
    elapsed = time.monotonic() - start
    assert outcome.error.code == "timeout"
    assert outcome.error.retryable
    assert outcome.error.details["timeout_s"] == 0.05
    assert elapsed < 2


class Empty(ToolInput):
    pass


class Answer(msgspec.Struct):
    value: int


def custom_registry() -> ToolRegistry:
    reg = ToolRegistry()

    @reg.tool("slow", "sleeps past its own timeout", timeout_s=0.05)
    async def slow(inp: Empty, ctx: ToolContext) -> Answer:
        await asyncio.sleep(30)
        return Answer(1)

    @reg.tool("boom", "raises")
    async def boom(inp: Empty, ctx: ToolContext) -> Answer:
        raise ValueError("bad thing " + "x" * 2000)

    @reg.tool("inner_timeout", "raises TimeoutError on its own")
    async def inner_timeout(inp: Empty, ctx: ToolContext) -> Answer:
        raise TimeoutError("upstream took too long")

    @reg.tool("typed", "raises a typed failure")
    async def typed(inp: Empty, ctx: ToolContext) -> Answer:
        raise ToolFailure("quota_exceeded", "try again later", retryable=True)

    @reg.tool("liar", "returns the wrong type")
    async def liar(inp: Empty, ctx: ToolContext) -> Answer:
        return {"value": "not an int"}  # type: ignore[return-value]

    @reg.tool("weird", "returns something not JSON")
    async def weird(inp: Empty, ctx: ToolContext) -> Answer:
        return object()  # type: ignore[return-value]

    @reg.tool("ctx_echo", "returns its context")
    async def ctx_echo(inp: Empty, ctx: ToolContext) -> dict[str, str]:
        return {"key": ctx.idempotency_key, "run": ctx.run_id, "step": ctx.step_id}

    return reg


async def test_tool_own_timeout_applies_without_step_timeout() -> None:
    start = time.monotonic()
    outcome = await run(custom_registry(), "slow", {})
    assert outcome.error.code == "timeout"
    assert time.monotonic() - start < 2


async def test_step_timeout_overrides_tool_timeout() -> None:
    outcome = await run(custom_registry(), "slow", {}, timeout_s=0.01)
    assert outcome.error.details["timeout_s"] == 0.01


async def test_exception_becomes_tool_error_with_type_and_truncated_text() -> None:
    outcome = await run(custom_registry(), "boom", {})
    error = outcome.error
    assert error.code == "tool_error"
    assert "ValueError: bad thing" in error.message
    assert error.message.count("x") <= 500
    assert not error.retryable


async def test_tools_own_timeout_error_is_a_tool_error_not_a_step_timeout() -> None:
    outcome = await run(custom_registry(), "inner_timeout", {})
    assert outcome.error.code == "tool_error"
    assert "TimeoutError: upstream took too long" in outcome.error.message
    assert outcome.error.retryable


async def test_tool_failure_is_reported_as_typed() -> None:
    outcome = await run(custom_registry(), "typed", {})
    assert (outcome.error.code, outcome.error.message) == ("quota_exceeded", "try again later")
    assert outcome.error.retryable


@pytest.mark.parametrize("name", ["liar", "weird"])
async def test_output_not_matching_declared_type_is_invalid_output(name: str) -> None:
    outcome = await run(custom_registry(), name, {})
    assert outcome.error.code == "invalid_output"


async def test_context_reaches_the_tool() -> None:
    outcome = await run(custom_registry(), "ctx_echo", {})
    assert outcome.output == {"key": "run-1:step-a:1", "run": "run-1", "step": "step-a"}


async def test_output_too_large(registry: ToolRegistry) -> None:
    outcome = await run(
        registry, "echo", {"message": "x" * 500}, settings={"max_output_bytes": 100}
    )
    assert outcome.error.code == "output_too_large"
    assert outcome.error.details == {"size": 514, "limit": 100}


async def test_cancellation_propagates(registry: ToolRegistry) -> None:
    task = asyncio.create_task(run(registry, "sleep", {"seconds": 30}))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------------- registry


def test_specs_have_self_contained_schemas(registry: ToolRegistry) -> None:
    specs = registry.specs()
    assert [s.name for s in specs] == registry.names()
    for spec in specs:
        for schema in (spec.input_schema, spec.output_schema):
            ref = schema["$ref"].removeprefix("#/$defs/")
            assert ref in schema["$defs"]
        # round-trips through the wire format
        assert msgspec.json.decode(msgspec.json.encode(spec), type=ToolSpec) == spec
    text_spec = registry.get("text").spec()
    text_input = text_spec.input_schema["$defs"]["TextInput"]
    assert text_input["required"] == ["text", "op"]
    assert text_input["additionalProperties"] is False
    assert registry.get("sleep").spec().timeout_s > 3600
    assert registry.get("http_get").spec().idempotent


def test_decorator_reads_types_from_annotations() -> None:
    @tool("answer", "the answer", idempotent=False, timeout_s=5)
    async def answer(inp: Empty, ctx: ToolContext) -> Answer:
        return Answer(42)

    assert isinstance(answer, Tool)
    assert (answer.input_type, answer.output_type) == (Empty, Answer)
    assert (answer.idempotent, answer.timeout_s) == (False, 5)
    assert answer.spec().output_schema["$defs"]["Answer"]["required"] == ["value"]


def test_decorator_rejects_bad_tools() -> None:
    async def no_annotations(inp, ctx):
        return {}

    def not_async(inp: Empty, ctx: ToolContext) -> Answer:
        return Answer(1)

    async def no_return(inp: Empty, ctx: ToolContext):
        return {}

    async def not_a_struct(inp: dict, ctx: ToolContext) -> Answer:
        return Answer(1)

    with pytest.raises(TypeError, match="annotate the first parameter"):
        make_tool(no_annotations, name="a", description="")
    with pytest.raises(TypeError, match="async def"):
        make_tool(not_async, name="a", description="")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="return type"):
        make_tool(no_return, name="a", description="")
    with pytest.raises(TypeError, match="msgspec.Struct"):
        make_tool(not_a_struct, name="a", description="")
    with pytest.raises(ValueError, match="tool name"):
        make_tool(noop_fn, name="has space", description="")


async def noop_fn(inp: Empty, ctx: ToolContext) -> Answer:
    return Answer(0)


def test_duplicate_registration_is_refused(registry: ToolRegistry) -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register(make_tool(noop_fn, name="echo", description=""))
    assert registry.get("nope") is None
    assert "echo" in registry and len(registry) == 9


# --------------------------------------------------------------------------- http_get


@dataclass
class LocalServer:
    port: int
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _response(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.fixture
async def server():
    state = LocalServer(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            state.requests.append((path, headers))
            if path == "/hello":
                reply = _response(
                    200, b"hello world", {"Content-Type": "text/plain; charset=utf-8", "X-T": "1"}
                )
            elif path == "/headers":
                reply = _response(200, json.dumps(headers).encode())
            elif path == "/big":
                reply = _response(200, b"a" * 5000)
            elif path == "/to-hello":
                reply = _response(302, headers={"Location": "/hello"})
            elif path == "/to-metadata":
                reply = _response(302, headers={"Location": "http://169.254.169.254/latest/"})
            elif path == "/to-other-origin":
                location = state.url("/headers", host="other.test")
                reply = _response(307, headers={"Location": location})
            elif path == "/loop":
                reply = _response(301, headers={"Location": "/loop"})
            elif path == "/stall":
                await state.release.wait()
                reply = _response(200)
            else:
                reply = _response(404, b"not found")
            writer.write(reply)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = srv.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        state.release.set()
        srv.close()
        await srv.wait_closed()


@pytest.fixture
def connects(monkeypatch) -> list[tuple[str, int]]:
    """Every TCP connect httpx makes (host, port), recorded before it happens."""
    seen: list[tuple[str, int]] = []
    original = httpcore.AnyIOBackend.connect_tcp

    async def recording(self, host, port, *args, **kwargs):
        seen.append((host, port))
        return await original(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", recording)
    return seen


def resolver_for(table: dict[str, str]):
    def resolve(host, port, family=0, type=0, proto=0, flags=0):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (table[host], port))]

    return resolve


async def test_http_get_fetches_from_allowed_local_server(registry, server, connects) -> None:
    outcome = await run(
        registry,
        "http_get",
        {"url": server.url("/hello")},
        settings={"http_allow_private": ("127.0.0.1",)},
    )
    assert outcome.ok, outcome.error
    out = outcome.output
    assert (out["status"], out["body"], out["url"]) == (200, "hello world", server.url("/hello"))
    assert out["headers"]["x-t"] == "1"
    assert out["truncated"] is False
    assert connects == [("127.0.0.1", server.port)]
    path, headers = server.requests[0]
    assert path == "/hello"
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["user-agent"].startswith("agentloom")


async def test_http_get_refuses_local_server_by_default(registry, server, connects) -> None:
    outcome = await run(registry, "http_get", {"url": server.url("/hello") + "?token=s3cret"})
    error = outcome.error
    assert (error.code, error.path) == ("address_not_allowed", "$.url")
    assert error.details["address"] == "127.0.0.1"
    assert "s3cret" not in error.message and "s3cret" not in json.dumps(error.details)
    assert connects == [] and server.requests == []


async def test_http_get_refuses_redirect_to_metadata_without_connecting(
    registry, server, connects
) -> None:
    outcome = await run(
        registry,
        "http_get",
        {"url": server.url("/to-metadata")},
        settings={"http_allow_private": ("127.0.0.1", "169.254.0.0/16")},
    )
    error = outcome.error
    assert error.code == "address_not_allowed"
    assert error.details["address"] == "169.254.169.254"
    assert error.details["redirects"] == 1
    assert "redirect" in error.message
    assert connects == [("127.0.0.1", server.port)]  # never tried 169.254.169.254


async def test_http_get_follows_allowed_redirect(registry, server) -> None:
    outcome = await run(
        registry,
        "http_get",
        {"url": server.url("/to-hello")},
        settings={"http_allow_private": ("127.0.0.0/8",)},
    )
    assert outcome.ok, outcome.error
    assert outcome.output["body"] == "hello world"
    assert outcome.output["url"] == server.url("/hello")
    assert [p for p, _ in server.requests] == ["/to-hello", "/hello"]


async def test_http_get_stops_after_five_redirects(registry, server) -> None:
    outcome = await run(
        registry,
        "http_get",
        {"url": server.url("/loop")},
        settings={"http_allow_private": ("127.0.0.1",)},
    )
    assert outcome.error.code == "too_many_redirects"
    assert len(server.requests) == 6  # the first request and five redirects


async def test_http_get_pins_connection_to_the_checked_address(registry, server, connects):
    # "pinned.test" exists only in the injected resolver: httpx could not resolve it, so
    # success proves the request went to the checked address with the original Host.
    calls: list[str] = []
    table = resolver_for({"pinned.test": "127.0.0.1"})

    def resolve(host, *args, **kwargs):
        calls.append(host)
        return table(host, *args, **kwargs)

    outcome = await run(
        registry,
        "http_get",
        {"url": server.url("/headers", host="pinned.test")},
        settings={"http_allow_private": ("pinned.test",), "resolver": resolve},
    )
    assert outcome.ok, outcome.error
    assert json.loads(outcome.output["body"])["host"] == f"pinned.test:{server.port}"
    assert outcome.output["url"] == server.url("/headers", host="pinned.test")
    assert connects == [("127.0.0.1", server.port)]
    assert calls == ["pinned.test"]  # resolved once, by the guard


async def test_http_get_drops_credentials_on_cross_origin_redirect(registry, server) -> None:
    outcome = await run(
        registry,
        "http_get",
        {
            "url": server.url("/to-other-origin"),
            "headers": {"Authorization": "Bearer s3cret", "X-Api-Key": "k", "Accept": "a/b"},
        },
        settings={
            "http_allow_private": ("127.0.0.1", "other.test"),
            "resolver": resolver_for({"other.test": "127.0.0.1"}),
        },
    )
    assert outcome.ok, outcome.error
    first, second = server.requests
    assert first[1]["authorization"] == "Bearer s3cret" and first[1]["x-api-key"] == "k"
    assert "authorization" not in second[1] and "x-api-key" not in second[1]
    assert second[1]["accept"] == "a/b"
    assert second[1]["host"] == f"other.test:{server.port}"


async def test_http_get_truncates_body_at_max_bytes(registry, server) -> None:
    outcome = await run(
        registry,
        "http_get",
        {"url": server.url("/big"), "max_bytes": 100},
        settings={"http_allow_private": ("127.0.0.1",)},
    )
    assert outcome.output["body"] == "a" * 100
    assert outcome.output["truncated"] is True


async def test_http_get_timeout_is_retryable(registry, server) -> None:
    outcome = await run(
        registry,
        "http_get",
        {"url": server.url("/stall")},
        settings={"http_allow_private": ("127.0.0.1",), "http_timeout_s": 0.1},
    )
    assert outcome.error.code == "http_timeout"
    assert outcome.error.retryable


async def test_http_get_connection_refused_is_retryable(registry) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcome = await run(
        registry,
        "http_get",
        {"url": f"http://127.0.0.1:{port}/"},
        settings={"http_allow_private": ("127.0.0.1",)},
    )
    assert outcome.error.code == "connection_failed"
    assert outcome.error.retryable


@pytest.mark.parametrize(
    "headers, fragment",
    [
        ({"Host": "evil"}, "set by http_get"),
        ({"X-A": "a\r\nInjected: 1"}, "CR, LF"),
        ({"bad name": "x"}, "not a valid HTTP token"),
    ],
)
async def test_http_get_rejects_bad_headers(registry, connects, headers, fragment) -> None:
    outcome = await run(
        registry,
        "http_get",
        {"url": "http://127.0.0.1:9/", "headers": headers},
        settings={"http_allow_private": ("127.0.0.1",)},
    )
    assert outcome.error.code == "invalid_input"
    assert outcome.error.path.startswith("$.headers.")
    assert fragment in outcome.error.message
    assert "evil" not in outcome.error.message and "Injected" not in outcome.error.message
    assert connects == []


@pytest.mark.parametrize(
    "url, code",
    [
        ("file:///etc/passwd", "invalid_url"),
        ("http://2130706433/", "address_not_allowed"),
        ("http://[::ffff:127.0.0.1]/", "address_not_allowed"),
        ("http://metadata.google.internal/", "address_not_allowed"),
    ],
)
async def test_http_get_refuses_before_connecting(registry, connects, url, code) -> None:
    outcome = await run(registry, "http_get", {"url": url})
    assert outcome.error.code == code
    assert connects == []


@pytest.mark.parametrize(
    "url, host_header, sni",
    [
        ("https://example.com/x?q=1", "example.com", "example.com"),
        ("https://example.com:8443/x", "example.com:8443", "example.com"),
        ("https://bücher.de/", "xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("http://example.com/", "example.com", None),
    ],
)
async def test_pinned_request_targets_checked_ip_with_original_host_and_sni(
    url: str, host_header: str, sni: str | None
) -> None:
    names = {"example.com": "93.184.215.14", "bücher.de": "93.184.215.15"}
    target = check_url(url, resolve=resolver_for(names))
    async with httpx.AsyncClient() as client:
        public, request = _pinned_request(client, target, {"Accept": "*/*"})
    assert request.url.host == target.address
    assert request.url.path == httpx.URL(url).path and request.url.query == httpx.URL(url).query
    assert request.headers["host"] == host_header
    assert request.extensions.get("sni_hostname") == sni
    assert str(public) == str(httpx.URL(url))


async def test_pinned_request_refuses_when_parsers_disagree() -> None:
    # As if the guard had read another host than httpx does: never send it.
    target = ResolvedTarget(
        url="http://public.example/",
        scheme="http",
        host="other.example",
        port=80,
        address="93.184.215.14",
        addresses=("93.184.215.14",),
    )
    async with httpx.AsyncClient() as client:
        with pytest.raises(ToolFailure) as info:
            _pinned_request(client, target, {})
    assert info.value.code == "invalid_url"
