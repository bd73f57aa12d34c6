"""``http_request`` against a real local HTTP server (asyncio streams): methods and
bodies, the SSRF guard shared with http_get, redirects, response schemas, status
errors, and big bodies truncated to fit the output limit instead of failing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from loom_services.tools import ToolContext, ToolSettings, default_registry, execute_tool
from loom_services.tools.http_request import DEFAULT_MAX_BYTES

ALLOW = ("127.0.0.1",)


@dataclass
class Server:
    port: int = 0
    seen: list[dict] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _reply(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path = head[0].split(" ")[:2]
            headers = {}
            for line in head[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            state.seen.append({"method": method, "path": path, "headers": headers})
            echo = {"method": method, "path": path, "body": body.decode(), "headers": headers}
            json_type = {"Content-Type": "application/json"}
            replies = {
                "/echo": lambda: _reply(200, json.dumps(echo).encode(), json_type),
                "/user": lambda: _reply(200, b'{"id": 7, "name": "ada"}', json_type),
                "/bad-user": lambda: _reply(200, b'{"id": "seven"}', json_type),
                "/down": lambda: _reply(503, b"try later"),
                "/missing": lambda: _reply(404, b"no"),
                "/big": lambda: _reply(200, b"x" * 3_000_000),
                "/big-json": lambda: _reply(200, b'"' + b"y" * 2_000_000 + b'"', json_type),
                "/see-other": lambda: _reply(303, headers={"Location": "/echo"}),
                "/temp": lambda: _reply(307, headers={"Location": "/echo"}),
                "/elsewhere": lambda: _reply(
                    307, headers={"Location": f"http://localhost:{state.port}/echo"}
                ),
                "/to-metadata": lambda: _reply(
                    302, headers={"Location": "http://169.254.169.254/latest/"}
                ),
            }
            writer.write(replies.get(path, lambda: _reply(404))())
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
        srv.close()
        await srv.wait_closed()


async def call(raw: dict, allow: tuple[str, ...] = ALLOW, max_output: int = 1_000_000):
    settings = ToolSettings(http_allow_private=allow, max_output_bytes=max_output)
    ctx = ToolContext(idempotency_key="run:s:1", run_id="run", step_id="s", attempt=1,
                      settings=settings)  # fmt: skip
    return await execute_tool(default_registry(), "http_request", raw, ctx)


async def test_post_json_and_read_json(server: Server) -> None:
    out = await call(
        {
            "url": server.url("/echo"),
            "method": "POST",
            "json": {"a": [1, 2]},
            "headers": {"Authorization": "Bearer t0ken"},
        }  # fmt: skip
    )
    assert out.ok, out.error
    echo = out.output["json"]
    assert (echo["method"], json.loads(echo["body"])) == ("POST", {"a": [1, 2]})
    assert echo["headers"]["content-type"] == "application/json"
    assert echo["headers"]["authorization"] == "Bearer t0ken"
    # not idempotent: the run's key goes along so the server can dedupe
    assert echo["headers"]["idempotency-key"] == "run:s:1"
    assert out.output["status"] == 200 and out.output["truncated"] is False


async def test_text_body_and_methods(server: Server) -> None:
    out = await call({"url": server.url("/echo"), "method": "PUT", "body": "plain"})
    assert out.output["json"]["body"] == "plain" and out.output["json"]["method"] == "PUT"
    out = await call({"url": server.url("/echo"), "method": "DELETE"})
    assert out.output["json"]["method"] == "DELETE"
    out = await call({"url": server.url("/echo"), "method": "TRACE"})
    assert out.error.code == "invalid_input" and out.error.path == "$.method"
    out = await call({"url": server.url("/echo"), "json": {}, "body": "x"})
    assert out.error.code == "invalid_input" and out.error.path == "$.body"
    out = await call({"url": server.url("/echo"), "headers": {"Host": "evil"}})
    assert out.error.code == "invalid_input" and out.error.path == "$.headers.Host"


async def test_response_schema(server: Server) -> None:
    schema = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
    out = await call({"url": server.url("/user"), "response_schema": schema})
    assert out.ok and out.output["json"] == {"id": 7, "name": "ada"}
    out = await call({"url": server.url("/bad-user"), "response_schema": schema})
    assert out.error.code == "invalid_response" and out.error.path == "$.id"
    out = await call({"url": server.url("/missing"), "response_schema": schema})
    assert out.error.code == "invalid_response"  # not JSON at all
    out = await call({"url": server.url("/user"), "response_schema": {"type": "nope"}})
    assert out.error.code == "invalid_input" and out.error.path == "$.response_schema"


async def test_status_is_data_unless_asked_to_fail(server: Server) -> None:
    out = await call({"url": server.url("/down")})
    assert out.ok and out.output["status"] == 503 and out.output["body"] == "try later"
    out = await call({"url": server.url("/down"), "raise_for_status": True})
    assert out.error.code == "http_status" and out.error.retryable
    out = await call({"url": server.url("/missing"), "raise_for_status": True})
    assert out.error.code == "http_status" and not out.error.retryable


async def test_same_ssrf_guard_as_http_get(server: Server) -> None:
    out = await call({"url": server.url("/echo")}, allow=())
    assert out.error.code == "address_not_allowed" and out.error.path == "$.url"
    out = await call({"url": "http://169.254.169.254/latest/meta-data", "method": "POST"})
    assert out.error.code == "address_not_allowed"
    out = await call({"url": server.url("/to-metadata")})
    assert out.error.code == "address_not_allowed"  # checked at every redirect too
    out = await call({"url": "file:///etc/passwd"})
    assert out.error.code in ("invalid_url", "scheme_not_allowed")


async def test_redirects_by_method(server: Server) -> None:
    out = await call({"url": server.url("/see-other"), "method": "POST", "json": {"k": 1}})
    assert (out.output["json"]["method"], out.output["json"]["body"]) == ("GET", "")
    out = await call({"url": server.url("/temp"), "method": "POST", "json": {"k": 1}})
    assert out.output["json"]["method"] == "POST" and out.output["json"]["body"] == '{"k":1}'
    # a 307 to another origin is not followed with the body: the redirect is the answer
    out = await call(
        {"url": server.url("/elsewhere"), "method": "POST", "json": {"k": 1}},
        allow=("127.0.0.1", "localhost"),
    )
    assert out.output["status"] == 307 and "location" in out.output["headers"]


async def test_big_bodies_are_truncated_to_fit_not_failed(server: Server) -> None:
    assert DEFAULT_MAX_BYTES == 1_000_000
    out = await call({"url": server.url("/big")}, max_output=50_000_000)
    assert out.ok and out.output["truncated"] and len(out.output["body"]) == DEFAULT_MAX_BYTES
    # the output limit is smaller than max_bytes: cut further, still an answer
    out = await call({"url": server.url("/big"), "max_bytes": 3_000_000}, max_output=200_000)
    assert out.ok and out.output["truncated"]
    assert len(json.dumps(out.output)) <= 200_000 < len(out.output["body"]) + 10_000
    # JSON too big to keep whole: the parsed value is dropped, the text is cut
    out = await call({"url": server.url("/big-json"), "max_bytes": 3_000_000}, max_output=100_000)
    assert out.ok and out.output["truncated"] and "json" not in out.output
