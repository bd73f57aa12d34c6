"""Tool registry and the one function that runs a tool call: :func:`execute_tool`.

Design note
- A tool is an async function ``fn(input_struct, ctx) -> output``. Its input is a msgspec
  Struct (unknown fields are an error when it derives from :class:`ToolInput`), its output
  any msgspec-convertible type. Both become JSON Schemas in the tool's :class:`ToolSpec`.
- ``execute_tool`` never raises for a tool's problem: every failure is an ``ErrorInfo``
  with a stable ``code`` (``unknown_tool``, ``invalid_input``, ``timeout``, ``tool_error``,
  ``invalid_output``, ``output_too_large``, or whatever a tool reports through
  :class:`ToolFailure`). Cancellation (service shutdown) still propagates.
- Messages never include secrets on purpose: inputs and header values are not echoed;
  an unexpected exception contributes only its type and ``str(exc)`` (truncated).
- Idempotency (never running one key twice) is the calling service's job; the key is
  handed to tools in :class:`ToolContext` so tools calling other systems can pass it on.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from loom_core import schemas
from loom_core.contracts import JSON, ErrorInfo, SuspendRequest, ToolSpec
from loom_core.errors import LoomError

logger = logging.getLogger(__name__)

MAX_EXCEPTION_TEXT = 500
TOOL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class ToolInput(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base for tool inputs: a misspelt field is an ``invalid_input`` naming its path."""


class ToolOutput(msgspec.Struct, frozen=True):
    """Base for tool outputs (no extra behaviour; reads as intent)."""


class ToolFailure(LoomError):
    """Raised by a tool for a typed, expected failure; becomes ``ErrorInfo`` as is.

    ``message`` should say how to fix; it must not contain secrets."""

    def __init__(
        self,
        code: str,
        message: str,
        retryable: bool = False,
        *,
        path: str | None = None,
        details: dict[str, JSON] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.path = path
        self.details = details or {}

    def to_error(self) -> ErrorInfo:
        return self.info


@dataclass(frozen=True)
class ToolSettings:
    """What tools may do, set by the operator.

    ``http_allow_private``: hostnames, IPs or CIDRs ``http_get`` may reach although they
    are not public (default: none). ``resolver``: a ``socket.getaddrinfo``-like function
    (tests inject one); None means the system resolver."""

    http_allow_private: tuple[str, ...] = ()
    http_timeout_s: float = 10.0
    max_output_bytes: int = 1_000_000
    resolver: Callable[..., Any] | None = None


@dataclass
class ToolContext:
    idempotency_key: str
    run_id: str
    step_id: str
    attempt: int
    settings: Any = field(default_factory=ToolSettings)
    # A person's answer, when this tool asked to suspend on an earlier attempt.
    resume: JSON = None
    # the tool-runner's NATS connection: tools that ask a service (memory) use it
    nc: Any = None


ToolFn = Callable[[Any, ToolContext], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_type: type[msgspec.Struct]
    output_type: Any
    fn: ToolFn
    idempotent: bool = True
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not TOOL_NAME.match(self.name):
            raise ValueError(
                f"tool name {self.name!r} is invalid: use a letter then letters, digits, "
                "'_' or '-' (at most 64 characters)"
            )
        if not (isinstance(self.input_type, type) and issubclass(self.input_type, msgspec.Struct)):
            raise TypeError(f"tool {self.name!r}: input_type must be a msgspec.Struct subclass")
        if self.timeout_s <= 0:
            raise ValueError(f"tool {self.name!r}: timeout_s must be > 0")

    def spec(self) -> ToolSpec:
        """Self-contained JSON Schemas (``$ref`` into the schema's own ``$defs``)."""
        return ToolSpec(
            name=self.name,
            description=self.description,
            input_schema=msgspec.json.schema(self.input_type),
            output_schema=msgspec.json.schema(self.output_type),
            idempotent=self.idempotent,
            timeout_s=self.timeout_s,
        )


def tool(
    name: str, description: str, *, idempotent: bool = True, timeout_s: float = 30.0
) -> Callable[[ToolFn], Tool]:
    """Decorator: turn ``async def f(inp: SomeStruct, ctx: ToolContext) -> Out`` into a
    :class:`Tool`, reading the input and output types from the annotations."""

    def build(fn: ToolFn) -> Tool:
        return make_tool(
            fn, name=name, description=description, idempotent=idempotent, timeout_s=timeout_s
        )

    return build


def make_tool(
    fn: ToolFn, *, name: str, description: str, idempotent: bool = True, timeout_s: float = 30.0
) -> Tool:
    where = f"tool {name!r} ({getattr(fn, '__qualname__', fn)!s})"
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"{where}: must be an `async def` function")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # unresolvable annotations: say which tool
        raise TypeError(f"{where}: cannot resolve annotations: {exc}") from exc
    params = list(inspect.signature(fn).parameters)
    if not params or params[0] not in hints:
        raise TypeError(f"{where}: annotate the first parameter with its input msgspec.Struct")
    if "return" not in hints:
        raise TypeError(f"{where}: annotate the return type (the tool's output type)")
    output_type = hints["return"]
    return Tool(
        name=name,
        description=description,
        input_type=hints[params[0]],
        output_type=type(None) if output_type is None else output_type,
        fn=fn,
        idempotent=idempotent,
        timeout_s=timeout_s,
    )


class ToolRegistry:
    def __init__(self, tools: typing.Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, tool: Tool) -> Tool:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered; choose another name")
        self._tools[tool.name] = tool
        return tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def specs(self) -> list[ToolSpec]:
        return [self._tools[n].spec() for n in self.names()]

    def tool(
        self, name: str, description: str, *, idempotent: bool = True, timeout_s: float = 30.0
    ) -> Callable[[ToolFn], Tool]:
        """Like module-level :func:`tool`, and registers the result."""

        def build(fn: ToolFn) -> Tool:
            return self.register(
                make_tool(
                    fn,
                    name=name,
                    description=description,
                    idempotent=idempotent,
                    timeout_s=timeout_s,
                )
            )

        return build

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)


# --------------------------------------------------------------------------- execution


@dataclass(frozen=True)
class ToolOutcome:
    ok: bool
    output: JSON = None
    error: ErrorInfo | None = None
    suspend: SuspendRequest | None = None


class ToolSuspend(Exception):  # noqa: N818 - a request, not an error
    """Raised by a tool that needs a person first (e.g. to confirm a payment): the step
    suspends under ``label``; once resumed, the tool runs again with the answer in
    ``ctx.resume``. ``schema`` (JSON Schema) says what the answer must look like."""

    def __init__(self, label: str, payload: JSON = None, schema: dict[str, JSON] | None = None):
        super().__init__(label)
        self.request = SuspendRequest(label=label, payload=payload, schema=schema or {})


_AT_PATH = re.compile(r" - at `(?P<path>\$[^`]*)`$")
_FIELD = re.compile(r"(?:missing required field|unknown field) `(?P<field>[^`]+)`")


def validation_path(message: str) -> tuple[str, str]:
    """Split msgspec's ``"Expected `str`, got `int` - at `$.text`"`` into the message and
    a JSON path; a missing/unknown field's path points at the field itself."""
    path = "$"
    m = _AT_PATH.search(message)
    if m:
        path = m.group("path")
        message = message[: m.start()]
    f = _FIELD.search(message)
    if f:
        path = f"{path}.{f.group('field')}"
    return message, path


@functools.cache
def describe_input(input_type: type[msgspec.Struct]) -> str:
    """A compact description of a tool's input fields (for "how to fix" messages)."""
    schema = msgspec.json.schema(input_type)
    ref = schema.get("$ref", "").rsplit("/", 1)[-1]
    body = schema.get("$defs", {}).get(ref, schema)
    required = set(body.get("required", ()))
    fields = []
    for field_name, prop in body.get("properties", {}).items():
        prop = {k: v for k, v in prop.items() if k != "title"}
        flag = "required" if field_name in required else "optional"
        fields.append(f"{field_name} ({flag}): {msgspec.json.encode(prop).decode()}")
    text = "an object with " + "; ".join(fields) if fields else "an empty object {}"
    return text if len(text) <= 600 else text[:597] + "..."


def _invalid_input(tool_: Tool, raw_input: Any, exc: msgspec.ValidationError) -> ToolOutcome:
    """Every problem of the input, worded as everywhere else (``loom_core.schemas``);
    msgspec's first one when only msgspec knows the rule (the schema cannot say it)."""
    found = schemas.problems(msgspec.json.schema(tool_.input_type), raw_input)
    if not found:
        message, path = validation_path(str(exc))
        found = [(path, message)]
    text = schemas.listed(found)
    return _fail(
        "invalid_input",
        f"invalid input for tool {tool_.name!r}: {text}; "
        f"expected {describe_input(tool_.input_type)}",
        path=found[0][0],
        details={"problems": [list(p) for p in found]},
    )


def _fail(code: str, message: str, **kw: Any) -> ToolOutcome:
    return ToolOutcome(ok=False, error=ErrorInfo(code=code, message=message, **kw))


async def execute_tool(
    registry: ToolRegistry,
    name: str,
    raw_input: dict[str, JSON],
    ctx: ToolContext,
    timeout_s: float | None = None,
) -> ToolOutcome:
    """Validate, run (with a timeout) and validate the output of one tool call."""
    tool_ = registry.get(name)
    if tool_ is None:
        available = registry.names()
        return _fail(
            "unknown_tool",
            f"unknown tool {name!r}; available tools: {', '.join(available) or '(none)'}",
            path="$.tool",
            details={"available": available},
        )

    try:
        inp = msgspec.convert(raw_input, tool_.input_type)
    except msgspec.ValidationError as exc:
        return _invalid_input(tool_, raw_input, exc)

    limit = timeout_s if timeout_s is not None else tool_.timeout_s
    try:
        async with asyncio.timeout(limit) as deadline:
            result = await tool_.fn(inp, ctx)
    except ToolFailure as exc:
        return ToolOutcome(ok=False, error=exc.to_error())
    except ToolSuspend as exc:
        return ToolOutcome(ok=True, suspend=exc.request)
    except TimeoutError as exc:
        if deadline.expired():
            return _fail(
                "timeout",
                f"tool {name!r} did not finish within {limit:g} s; raise the step's "
                "timeout_s if it needs longer",
                retryable=True,
                details={"timeout_s": limit},
            )
        return _tool_error(name, exc, ctx)
    except Exception as exc:  # any tool bug becomes a typed error, not a crash
        return _tool_error(name, exc, ctx)

    try:
        checked = msgspec.convert(msgspec.to_builtins(result), tool_.output_type)
        output = msgspec.to_builtins(checked)
    except (msgspec.ValidationError, TypeError) as exc:
        message, path = validation_path(str(exc))
        return _fail(
            "invalid_output",
            f"tool {name!r} returned output that does not match its declared type at "
            f"{path}: {message}; this is a bug in the tool",
            path=path,
        )

    max_bytes = getattr(ctx.settings, "max_output_bytes", ToolSettings.max_output_bytes)
    size = len(msgspec.json.encode(output))
    if size > max_bytes:
        return _fail(
            "output_too_large",
            f"tool {name!r} returned {size} bytes of JSON, over the {max_bytes}-byte limit; "
            "ask for less (e.g. a smaller max_bytes) or raise max_output_bytes",
            details={"size": size, "limit": max_bytes},
        )
    return ToolOutcome(ok=True, output=output)


def _tool_error(name: str, exc: BaseException, ctx: ToolContext) -> ToolOutcome:
    # Log the type only: str(exc) may quote inputs; the traceback goes to debug.
    logger.warning(
        "tool %r raised %s (run=%s step=%s attempt=%s)",
        name,
        type(exc).__name__,
        ctx.run_id,
        ctx.step_id,
        ctx.attempt,
    )
    logger.debug("tool %r traceback", name, exc_info=exc)
    what = type(exc).__name__
    text = str(exc)[:MAX_EXCEPTION_TEXT]
    if text:
        what = f"{what}: {text}"
    return _fail(
        "tool_error",
        f"tool {name!r} failed: {what}",
        retryable=isinstance(exc, ConnectionError | TimeoutError),
        details={"exception": type(exc).__name__},
    )
