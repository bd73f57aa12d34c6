"""Built-in tools: echo, noop, text, concat, sleep, flaky, math, http_get.

``http_get`` design note (SSRF)
- Every URL, including each redirect target, goes through :func:`netguard.check_url`
  before any byte is sent. Redirects are followed by hand (at most 5), never by httpx.
- The connection is pinned to the address the guard checked: the request is sent to
  ``scheme://<checked-ip>:port/...`` with the original ``Host`` header, and for https the
  original name as TLS SNI (httpcore's ``sni_hostname`` extension), so the certificate is
  still verified against the name. httpx never resolves the name itself, so a DNS answer
  that changes between check and connect (DNS rebinding) cannot redirect the request.
- ``trust_env=False``: no proxy from the environment (a proxy would make the checked
  address meaningless) and no ``.netrc`` credentials. CA bundle: certifi, or
  ``SSL_CERT_FILE``/``SSL_CERT_DIR`` when set.
- Request headers are forwarded to the first origin only; on a redirect to another
  origin only Accept, Accept-Language and User-Agent are kept, so credentials never
  travel to a host the caller did not name. Header values are never logged.
- Cookies are not kept between hops. The body is read up to ``max_bytes`` (after
  content decoding, which also bounds decompression bombs) and flagged ``truncated``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math as _math
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import httpx
import msgspec

from loom_core.contracts import JSON
from loom_services.tools import netguard
from loom_services.tools.registry import Tool, ToolContext, ToolFailure, ToolInput, ToolOutput, tool

# --------------------------------------------------------------------------- simple tools


class EchoInput(ToolInput):
    message: JSON


class EchoOutput(ToolOutput):
    message: JSON


@tool("echo", "Return the given message unchanged.")
async def echo(inp: EchoInput, ctx: ToolContext) -> EchoOutput:
    return EchoOutput(message=inp.message)


class NoopInput(ToolInput):
    pass


class NoopOutput(ToolOutput):
    pass


@tool("noop", "Do nothing and return {} (used by benchmarks).")
async def noop(inp: NoopInput, ctx: ToolContext) -> NoopOutput:
    return NoopOutput()


TextOp = Literal["upper", "lower", "title", "reverse", "word_count", "length", "strip"]


class TextInput(ToolInput):
    text: str
    op: TextOp


class TextOutput(ToolOutput):
    result: str | int


_TEXT_OPS: dict[str, Callable[[str], Any]] = {
    "upper": str.upper,
    "lower": str.lower,
    "title": str.title,
    "reverse": lambda s: s[::-1],
    "word_count": lambda s: len(s.split()),
    "length": len,  # in Unicode code points
    "strip": str.strip,
}


@tool(
    "text",
    "Transform or measure text: upper, lower, title, reverse, strip (result is text), "
    "word_count, length (result is an integer).",
)
async def text(inp: TextInput, ctx: ToolContext) -> TextOutput:
    return TextOutput(result=_TEXT_OPS[inp.op](inp.text))


class ConcatInput(ToolInput):
    parts: list[str]
    sep: str = ""


class ConcatOutput(ToolOutput):
    text: str


@tool("concat", "Join text parts with a separator (default: none).")
async def concat(inp: ConcatInput, ctx: ToolContext) -> ConcatOutput:
    return ConcatOutput(text=inp.sep.join(inp.parts))


MAX_SLEEP_S = 3600.0


class SleepInput(ToolInput):
    seconds: Annotated[float, msgspec.Meta(ge=0, le=MAX_SLEEP_S)]


class SleepOutput(ToolOutput):
    slept: float


# Its own timeout exceeds the longest allowed sleep; a step's timeout_s still applies.
@tool("sleep", "Wait the given number of seconds (0..3600).", timeout_s=MAX_SLEEP_S + 60)
async def sleep(inp: SleepInput, ctx: ToolContext) -> SleepOutput:
    await asyncio.sleep(inp.seconds)
    return SleepOutput(slept=inp.seconds)


# --------------------------------------------------------------------------- demo tools
# Deterministic helpers for examples and tests of the plan language (retries, loops,
# reductions): no clock, no randomness, the same input gives the same outcome.

MAX_FLAKY_FAILURES = 10


class FlakyInput(ToolInput):
    fail_times: Annotated[int, msgspec.Meta(ge=0, le=MAX_FLAKY_FAILURES)]
    value: JSON = None
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "flaky"


class FlakyOutput(ToolOutput):
    value: JSON
    attempt: int


@tool(
    "flaky",
    "Fail (a retryable error with the given code) while the step's attempt number is "
    "at most fail_times, then return {value, attempt}. Deterministic: for retry demos.",
)
async def flaky(inp: FlakyInput, ctx: ToolContext) -> FlakyOutput:
    # The attempt comes from the executor (it is part of the idempotency key), so a
    # redelivered request of one attempt gets the same answer.
    if ctx.attempt <= inp.fail_times:
        raise ToolFailure(
            inp.code,
            f"planned failure: attempt {ctx.attempt} of the first {inp.fail_times} fails; "
            f"retry the step (e.g. retry.max_attempts > {inp.fail_times}) to get past it",
            retryable=True,
            details={"attempt": ctx.attempt, "fail_times": inp.fail_times},
        )
    return FlakyOutput(value=inp.value, attempt=ctx.attempt)


MathOp = Literal["add", "sub", "mul", "max", "min"]
# Integers beyond 64 bits cannot be encoded to JSON by msgspec (and lose precision in
# most JSON readers anyway): refused with a typed error instead of a crash.
_INT_LIMIT = 2**63 - 1

_MATH_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "max": max,
    "min": min,
}


class MathInput(ToolInput):
    op: MathOp
    a: int | float
    b: int | float


class MathOutput(ToolOutput):
    result: int | float


@tool(
    "math",
    "Arithmetic on two numbers: add, sub, mul, max, min. The result is an integer when "
    "both operands are integers, else a float.",
)
async def math(inp: MathInput, ctx: ToolContext) -> MathOutput:
    result = _MATH_OPS[inp.op](inp.a, inp.b)
    if isinstance(inp.a, float) or isinstance(inp.b, float):
        result = float(result)  # max(2, 1.5) is the int 2 in Python; keep one rule
        if not _math.isfinite(result):
            raise ToolFailure(
                "out_of_range",
                f"{inp.op}({inp.a}, {inp.b}) is not a finite number; use smaller operands",
            )
    elif abs(result) > _INT_LIMIT:
        raise ToolFailure(
            "out_of_range",
            f"{inp.op}({inp.a}, {inp.b}) does not fit in a 64-bit integer; "
            "pass floats for approximate results",
        )
    return MathOutput(result=result)


# --------------------------------------------------------------------------- http_get

MAX_REDIRECTS = 5
MAX_BODY_BYTES = 10_000_000
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "agentloom-http-get/0.1"
# Set by the tool itself; a caller overriding them could break framing or pinning.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_CROSS_ORIGIN_HEADERS = frozenset({"accept", "accept-language", "user-agent"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(r"[\r\n\x00]")


class HttpGetInput(ToolInput):
    url: str
    headers: dict[str, str] = {}
    max_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_BODY_BYTES)] = 1_000_000


class HttpGetOutput(ToolOutput):
    status: int
    headers: dict[str, str]
    body: str
    url: str
    truncated: bool = False


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Built once: loading the CA bundle costs milliseconds per client otherwise.
    return httpx.create_ssl_context()


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not _TOKEN.match(name):
            raise ToolFailure(
                "invalid_input",
                f"header name {name!r} is not a valid HTTP token",
                path=f"$.headers.{name}",
            )
        if name.lower() in _RESERVED_HEADERS:
            raise ToolFailure(
                "invalid_input",
                f"header {name!r} is set by http_get itself; remove it",
                path=f"$.headers.{name}",
            )
        if _BAD_VALUE.search(value):
            raise ToolFailure(
                "invalid_input",
                f"the value of header {name!r} contains CR, LF or NUL",
                path=f"$.headers.{name}",
            )
    return dict(headers)


async def _guard(url: str, allow: tuple[str, ...], resolver, hop: int) -> netguard.ResolvedTarget:
    try:
        # Resolution blocks: keep it off the event loop.
        return await asyncio.to_thread(netguard.check_url, url, allow, resolver)
    except netguard.UrlRefused as exc:
        where = f"redirect #{hop} to " if hop else ""
        raise ToolFailure(
            exc.code,
            f"refused to fetch {where}{netguard.redact_url(url)}: {exc.reason}",
            retryable=exc.retryable,
            path=None if hop else "$.url",
            details={
                "url": netguard.redact_url(url),
                "address": exc.address,
                "reason": exc.reason,
                "redirects": hop,
            },
        ) from None


def _pinned_request(
    client: httpx.AsyncClient, target: netguard.ResolvedTarget, headers: dict[str, str]
) -> tuple[httpx.URL, httpx.Request]:
    """Build a request to the checked address carrying the original Host (and SNI)."""
    try:
        url = httpx.URL(target.url)
    except httpx.InvalidURL as exc:
        raise ToolFailure("invalid_url", f"invalid URL: {exc}", path="$.url") from None
    default_port = 443 if url.scheme == "https" else 80
    # Both parsers must agree on where this goes, or the check proved nothing.
    if (url.scheme, url.host.lower(), url.port or default_port) != (
        target.scheme,
        target.host,
        target.port,
    ):
        raise ToolFailure(
            "invalid_url",
            f"ambiguous URL {netguard.redact_url(target.url)}: it parses to different hosts; "
            "write it without backslashes, control characters or unusual escapes",
            path="$.url",
        )
    pinned = url.copy_with(host=target.address)
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    request = client.build_request(
        "GET",
        pinned,
        headers={**headers, "Host": url.netloc.decode("ascii")},
        extensions=extensions,
    )
    return url, request


async def _read_body(response: httpx.Response, max_bytes: int) -> tuple[str, bool]:
    chunks: list[bytes] = []
    size = 0
    truncated = False
    async for chunk in response.aiter_bytes():
        if size + len(chunk) > max_bytes:
            chunks.append(chunk[: max_bytes - size])
            truncated = True
            break
        chunks.append(chunk)
        size += len(chunk)
    data = b"".join(chunks)
    try:
        return data.decode(response.encoding or "utf-8", errors="replace"), truncated
    except LookupError:  # unknown charset in Content-Type
        return data.decode("utf-8", errors="replace"), truncated


@tool(
    "http_get",
    "Fetch a public http(s) URL with GET and return status, headers and body text. "
    "Follows up to 5 redirects; private and metadata addresses are refused.",
)
async def http_get(inp: HttpGetInput, ctx: ToolContext) -> HttpGetOutput:
    settings = ctx.settings
    allow = tuple(getattr(settings, "http_allow_private", ()))
    resolver = getattr(settings, "resolver", None) or socket.getaddrinfo
    timeout = getattr(settings, "http_timeout_s", 10.0)
    headers = {"User-Agent": USER_AGENT, **_check_headers(inp.headers)}

    url = inp.url
    origin: tuple[str, str, int] | None = None
    async with httpx.AsyncClient(
        trust_env=False, follow_redirects=False, timeout=timeout, verify=_ssl_context()
    ) as client:
        for hop in range(MAX_REDIRECTS + 1):
            target = await _guard(url, allow, resolver, hop)
            if origin is not None and origin != (target.scheme, target.host, target.port):
                headers = {k: v for k, v in headers.items() if k.lower() in _CROSS_ORIGIN_HEADERS}
            origin = (target.scheme, target.host, target.port)
            client.cookies.clear()  # no state carried between hops
            public_url, request = _pinned_request(client, target, headers)
            with transport_errors(target):
                response = await client.send(request, stream=True)
                try:
                    location = response.headers.get("location")
                    if response.status_code in REDIRECT_STATUSES and location:
                        url = _redirect_target(public_url, location)
                        continue
                    body, truncated = await _read_body(response, inp.max_bytes)
                finally:
                    await response.aclose()
            return HttpGetOutput(
                status=response.status_code,
                headers=dict(response.headers.items()),
                body=body,
                url=str(public_url),
                truncated=truncated,
            )
    raise ToolFailure(
        "too_many_redirects",
        f"more than {MAX_REDIRECTS} redirects starting at {netguard.redact_url(inp.url)}",
        details={"last_url": netguard.redact_url(url)},
    )


def _redirect_target(current: httpx.URL, location: str) -> str:
    try:
        return str(current.join(location))
    except httpx.InvalidURL as exc:
        raise ToolFailure(
            "invalid_redirect",
            f"{netguard.redact_url(str(current))} redirected to an invalid URL: {exc}",
        ) from None


@contextlib.contextmanager
def transport_errors(target: netguard.ResolvedTarget) -> Iterator[None]:
    """httpx's failures (transport, protocol or content decoding) as typed tool
    failures naming the target: one mapping for every HTTP tool."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise _transport_failure("http_timeout", target, exc) from None
    except httpx.ConnectError as exc:
        raise _transport_failure("connection_failed", target, exc) from None
    except httpx.RequestError as exc:
        raise _transport_failure("http_error", target, exc) from None


def _transport_failure(code: str, target: netguard.ResolvedTarget, exc: Exception) -> ToolFailure:
    text = str(exc)[:300] or type(exc).__name__
    return ToolFailure(
        code,
        f"GET {netguard.redact_url(target.url)} ({target.address}) failed: "
        f"{type(exc).__name__}: {text}",
        retryable=True,
        details={"url": netguard.redact_url(target.url), "address": target.address},
    )


BUILTIN_TOOLS: tuple[Tool, ...] = (echo, noop, text, concat, sleep, flaky, math, http_get)
