"""``http_request``: any method, headers, a JSON or text body, a timeout, a body limit
and an optional JSON Schema the response must meet.

Design notes
- The same SSRF guard as ``http_get`` (``builtins``): every URL and redirect target is
  checked by ``netguard.check_url`` and the connection is pinned to the checked address
  (Host header and TLS SNI keep the name); no proxy or .netrc from the environment.
- Credentials are secret references: write ``{{ secrets.NAME }}`` in a header value
  (``Authorization: "Bearer {{ secrets.API_TOKEN }}"``); the tool-runner resolves it just
  before the call and scrubs it from the output. Headers never follow a redirect to
  another origin.
- Redirects: followed for GET and HEAD (at most 5). For other methods a 303 becomes a
  GET without body; a 307/308 is followed only to the same origin (with the body); any
  other redirect is returned as the response (its ``Location`` header says where).
- Size: the body is read up to ``max_bytes`` (default 1,000,000); an output over the
  blob threshold travels by reference (docs/blobs.md), so a big page is never a failure:
  the body is cut, flagged ``truncated``, so that the whole output also fits under the
  tool-runner's output limit (``max_output_bytes``, the largest blob).
- A JSON response (``application/json`` or ``+json``) is parsed into ``json`` (unless
  truncated); ``response_schema`` checks it (``invalid_response`` with the JSON path).
  ``raise_for_status`` turns 4xx into ``http_status`` and 5xx into a retryable
  ``http_status``, so a step's retry policy can act on them.
- Not idempotent (a POST may act): the tool-runner claims the key before the call and
  never runs it twice; the key goes out as ``Idempotency-Key`` unless the caller set one.
"""

from __future__ import annotations

import json as jsonlib
import socket
from typing import Annotated, Literal

import httpx
import msgspec

from loom_core import schemas
from loom_core.contracts import JSON
from loom_services.tools import netguard
from loom_services.tools.builtins import (
    _BAD_VALUE,
    _CROSS_ORIGIN_HEADERS,
    _RESERVED_HEADERS,
    _TOKEN,
    MAX_BODY_BYTES,
    MAX_REDIRECTS,
    REDIRECT_STATUSES,
    _guard,
    _pinned_request,
    _read_body,
    _redirect_target,
    _ssl_context,
    transport_errors,
)
from loom_services.tools.registry import ToolContext, ToolFailure, ToolInput, ToolOutput, tool

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
DEFAULT_MAX_BYTES = 1_000_000
MAX_REQUEST_BODY_BYTES = 10_000_000
USER_AGENT = "agentloom-http-request/0.1"
# what the output needs besides the body (status, url, headers are measured exactly)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class HttpRequestInput(ToolInput):
    url: str
    method: Method = "GET"
    headers: dict[str, str] = {}
    json: JSON | msgspec.UnsetType = msgspec.UNSET  # a JSON body (Content-Type set)
    body: str | None = None  # a text body (give json or body, not both)
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] | None = None
    max_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_BODY_BYTES)] = DEFAULT_MAX_BYTES
    response_schema: dict[str, JSON] | None = None  # JSON Schema for the JSON response
    raise_for_status: bool = False


class HttpRequestOutput(ToolOutput):
    status: int
    headers: dict[str, str]
    body: str
    url: str
    truncated: bool = False
    json: JSON | msgspec.UnsetType = msgspec.UNSET  # the parsed body, when JSON


def _headers(given: dict[str, str]) -> dict[str, str]:
    for name, value in given.items():
        where = f"$.headers.{name}"
        problem = None
        if not _TOKEN.match(name):
            problem = f"header name {name!r} is not a valid HTTP token"
        elif name.lower() in _RESERVED_HEADERS:
            problem = f"header {name!r} is set by http_request itself; remove it"
        elif _BAD_VALUE.search(value):
            problem = f"the value of header {name!r} contains CR, LF or NUL"
        if problem is not None:
            raise ToolFailure("invalid_input", problem, path=where)
    return dict(given)


def _content(inp: HttpRequestInput, headers: dict[str, str]) -> bytes | None:
    has_json = inp.json is not msgspec.UNSET
    if has_json and inp.body is not None:
        raise ToolFailure("invalid_input", "give `json` or `body`, not both", path="$.body")
    if has_json:
        data = msgspec.json.encode(inp.json)
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
    elif inp.body is not None:
        data = inp.body.encode()
    else:
        return None
    if len(data) > MAX_REQUEST_BODY_BYTES:
        raise ToolFailure(
            "invalid_input",
            f"the request body is {len(data)} bytes, over {MAX_REQUEST_BODY_BYTES}",
            path="$.json" if has_json else "$.body",
        )
    return data


def _check_schema(schema: dict[str, JSON] | None) -> dict[str, JSON] | None:
    if schema is None:
        return None
    problem = schemas.schema_problem(schema)
    if problem is not None:
        raise ToolFailure(
            "invalid_input", f"response_schema cannot check anything: {problem}",
            path="$.response_schema",
        )  # fmt: skip
    return schema


def _is_json(response: httpx.Response) -> bool:
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


@tool(
    "http_request",
    "Send an HTTP request (any method, headers, a JSON or text body) to a public URL and "
    "return status, headers, body text and parsed JSON; optional response_schema check. "
    "Private and metadata addresses are refused; use {{ secrets.NAME }} for credentials.",
    idempotent=False,
    timeout_s=330.0,
)
async def http_request(inp: HttpRequestInput, ctx: ToolContext) -> HttpRequestOutput:
    settings = ctx.settings
    allow = tuple(getattr(settings, "http_allow_private", ()))
    resolver = getattr(settings, "resolver", None) or socket.getaddrinfo
    timeout = inp.timeout_s or getattr(settings, "http_timeout_s", 10.0)
    limit = int(getattr(settings, "max_output_bytes", DEFAULT_MAX_BYTES))
    response_schema = _check_schema(inp.response_schema)
    headers = {"User-Agent": USER_AGENT, **_headers(inp.headers)}
    content = _content(inp, headers)
    if inp.method not in _SAFE_METHODS and not any(k.lower() == "idempotency-key" for k in headers):
        headers["Idempotency-Key"] = ctx.idempotency_key

    url, method = inp.url, str(inp.method)  # a redirect may change it (303: GET)
    origin: tuple[str, str, int] | None = None
    async with httpx.AsyncClient(
        trust_env=False, follow_redirects=False, timeout=timeout, verify=_ssl_context()
    ) as client:
        for hop in range(MAX_REDIRECTS + 1):
            target = await _guard(url, allow, resolver, hop)
            here = (target.scheme, target.host, target.port)
            if origin is not None and origin != here:
                headers = {k: v for k, v in headers.items() if k.lower() in _CROSS_ORIGIN_HEADERS}
            first_origin = origin or here
            origin = here
            client.cookies.clear()
            public_url, get = _pinned_request(client, target, headers)
            kept = {k: v for k, v in get.headers.items() if k.lower() != "content-length"}
            request = client.build_request(
                method, get.url, headers=kept, content=content, extensions=get.extensions
            )
            with transport_errors(target):
                response = await client.send(request, stream=True)
                try:
                    location = response.headers.get("location")
                    code = response.status_code
                    if code in REDIRECT_STATUSES and location:
                        nxt = _follow(method, code, first_origin, public_url, location)
                        if nxt is not None:
                            url = nxt
                            method, content = _after_redirect(method, code, content)
                            continue
                    body, truncated = await _read_body(response, inp.max_bytes)
                finally:
                    await response.aclose()
            return _answer(inp, response, body, truncated, str(public_url), response_schema, limit)
    raise ToolFailure(
        "too_many_redirects",
        f"more than {MAX_REDIRECTS} redirects starting at {netguard.redact_url(inp.url)}",
        details={"last_url": netguard.redact_url(url)},
    )


def _follow(
    method: str,
    status: int,
    first_origin: tuple[str, str, int],
    current: httpx.URL,
    location: str,
) -> str | None:
    """The URL to follow, or None to return the redirect response itself."""
    nxt = _redirect_target(current, location)
    if method in ("GET", "HEAD") or status == 303:
        return nxt
    try:
        target = httpx.URL(nxt)
    except httpx.InvalidURL:
        return None
    port = target.port or (443 if target.scheme == "https" else 80)
    same = (target.scheme, target.host.lower(), port) == first_origin
    return nxt if status in (307, 308) and same else None


def _after_redirect(method: str, status: int, content: bytes | None) -> tuple[str, bytes | None]:
    if status == 303 and method != "HEAD":
        return "GET", None
    if status in (301, 302) and method not in ("GET", "HEAD"):
        return "GET", None
    return method, content


def _answer(
    inp: HttpRequestInput,
    response: httpx.Response,
    body: str,
    truncated: bool,
    url: str,
    response_schema: dict[str, JSON] | None,
    limit: int,
) -> HttpRequestOutput:
    status = response.status_code
    if inp.raise_for_status and status >= 400:
        raise ToolFailure(
            "http_status",
            f"{inp.method} {netguard.redact_url(url)} answered HTTP {status}",
            retryable=status >= 500 or status == 429,
            details={"status": status, "url": netguard.redact_url(url), "body": body[:500]},
        )
    parsed: JSON | msgspec.UnsetType = msgspec.UNSET
    if _is_json(response) and not truncated and body:
        try:
            parsed = jsonlib.loads(body)
        except ValueError:
            parsed = msgspec.UNSET
    if response_schema is not None:
        if parsed is msgspec.UNSET:
            raise ToolFailure(
                "invalid_response",
                f"{netguard.redact_url(url)} did not answer JSON"
                + (" (the body was truncated: raise max_bytes)" if truncated else "")
                + "; response_schema needs a JSON response",
                details={"status": status},
            )
        found = schemas.problems(response_schema, parsed)
        if found:
            text = schemas.listed(found)
            raise ToolFailure(
                "invalid_response",
                f"the response of {netguard.redact_url(url)} does not match response_schema: "
                f"{text}",
                path=found[0][0],
                details={"status": status, "problems": [list(p) for p in found]},
            )
    out = HttpRequestOutput(
        status=status,
        headers=dict(response.headers.items()),
        body=body,
        url=url,
        truncated=truncated,
        json=parsed,
    )
    return fit_output(out, limit)


def fit_output(out: HttpRequestOutput, limit: int) -> HttpRequestOutput:
    """``out`` cut (body shortened, parsed JSON dropped, ``truncated``) until its JSON is
    at most ``limit`` bytes: a big response is a truncated answer, never a failure."""
    size = len(msgspec.json.encode(out))
    if size <= limit:
        return out
    out = msgspec.structs.replace(out, json=msgspec.UNSET, truncated=True)
    body = out.body
    for _ in range(20):  # escapes make bytes per character vary: converge in a few steps
        size = len(msgspec.json.encode(out))
        if size <= limit or not body:
            break
        keep = max(0, int(len(body) * (limit / size)) - 64)
        body = body[:keep]
        out = msgspec.structs.replace(out, body=body)
    if len(msgspec.json.encode(out)) > limit:  # headers alone are over: say so
        raise ToolFailure(
            "output_too_large",
            f"the response's headers alone are over the {limit}-byte output limit",
            details={"limit": limit},
        )
    return out
