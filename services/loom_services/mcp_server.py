"""agentloom as an MCP server: other agents submit runs, read their status, output and
trace, list them, resume a suspension, cancel and fork, through MCP tools.

Two transports, one server (:func:`build_server`):
- ``loom mcp`` speaks MCP over stdio. It is a local client of the stack like the ``loom``
  CLI: it connects to NATS with the identity and seed the CLI uses (operator by default;
  ``client`` for submit-only), and submits runs for the user of ``LOOM_TOKEN``.
- ``loom mcp --http PORT`` serves streamable HTTP (``/mcp``). Every HTTP request must
  carry ``Authorization: Bearer <JWT>`` verified exactly as the executor verifies a
  submission (``loom_infra.auth``: issuer keys from the configuration, no network), or
  none when the stack allows anonymous runs. The token goes along with each submission,
  so the run's principal is the caller; reads and controls are limited to the caller's
  own runs unless the token has the ``admin`` role.

Every tool returns structured JSON; a refusal is an MCP error result whose text says
what was wrong and what to do (no traceback). Bounds: list and trace sizes are capped,
``wait_s`` at most 300 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from loom_core import codec
from loom_core.contracts import (
    TERMINAL_EVENTS,
    EventRecord,
    ForkRun,
    PlanRejected,
    Principal,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunRequest,
    RunRequested,
)
from loom_core.stats import family_stats
from loom_infra.auth import AuthError, PrincipalResolver, anonymous, bearer_token
from loom_infra.client import LoomClient, LoomError

log = logging.getLogger("loom.mcp_server")

MAX_WAIT_S = 300.0
MAX_LIST = 200
MAX_SPANS = 2_000
STATE_KEY = "loom_caller"  # where the HTTP gate leaves the verified caller


@dataclass(frozen=True)
class Caller:
    """Who is calling: the verified principal and the token to pass on (HTTP), or the
    local user of a stdio server (``local``: the process's own NATS identity decides)."""

    principal: Principal | None
    token: str | None
    local: bool = False

    def owns(self, owner: Principal | None) -> bool:
        if self.local:
            return True
        p = self.principal
        if p is None:
            return False
        if "admin" in p.roles:
            return True
        if owner is None:
            return False
        if p.anonymous or owner.anonymous:
            return p.anonymous and owner.anonymous
        return (p.user_id, p.issuer, p.tenant) == (owner.user_id, owner.issuer, owner.tenant)


Connect = Callable[[], Awaitable[LoomClient]]


def build_server(connect: Connect, local_token: str | None = None) -> MCPServer:
    """The MCP server; ``connect`` gives the (shared) LoomClient. ``local_token``: the
    stdio user's bearer token (LOOM_TOKEN), passed on with submissions."""
    app = MCPServer(
        "agentloom",
        instructions="Run AI-agent plans on agentloom: submit_run (an explicit plan or a "
        "natural-language request), then get_run for status and output; list_runs, "
        "describe_run, run_trace, resume_run, cancel_run, fork_run.",
    )

    def caller(ctx: Context) -> Caller:
        request = getattr(ctx.request_context, "request", None)
        if request is None:  # stdio: the local user
            return Caller(principal=None, token=local_token, local=True)
        found = request.scope.get("state", {}).get(STATE_KEY)
        if not isinstance(found, Caller):  # the gate always sets it; never trust absence
            raise ToolError("not_authenticated: this endpoint needs a bearer token")
        return found

    async def owned(client: LoomClient, who: Caller, run_id: str) -> list[EventRecord]:
        try:
            records = await client.events(run_id)
        except LoomError as exc:
            raise _tool_error(exc) from None
        if not records:
            raise ToolError(f"not_found: no run {run_id!r}; list_runs shows yours")
        owner = records[0].event.principal if isinstance(records[0].event, RunRequested) else None
        if not who.owns(owner):
            # the same answer as for a run that does not exist: no probing of run ids
            raise ToolError(f"not_found: no run {run_id!r}; list_runs shows yours")
        return records

    @app.tool(description="Submit a run: give `plan` (an explicit plan, see proto/) or "
              "`request` (natural language; needs a model). `input` is the run's input; "
              "`run_id` makes the submission idempotent. With `wait_s` > 0, waits up to "
              "that long and returns the status and output.")  # fmt: skip
    async def submit_run(
        ctx: Context,
        plan: dict[str, Any] | None = None,
        request: str | None = None,
        input: dict[str, Any] | None = None,  # noqa: A002 - the run's input, as in RunRequest
        run_id: str | None = None,
        wait_s: float = 0.0,
    ) -> dict[str, Any]:
        who = caller(ctx)
        raw: dict[str, Any] = {"input": input or {}}
        for key, value in (("plan", plan), ("request", request), ("run_id", run_id)):
            if value is not None:
                raw[key] = value
        try:
            run_request = msgspec.convert(raw, RunRequest)
        except msgspec.ValidationError as exc:
            raise ToolError(f"invalid_request: {exc}; see proto/schemas/run_request.json") from None
        client = await connect()
        try:
            accepted = await client.submit(run_request, token=who.token)
        except LoomError as exc:
            raise _tool_error(exc) from None
        answer: dict[str, Any] = {"run_id": accepted.run_id, "existing": accepted.existing}
        if wait_s > 0:
            answer.update(await _wait(client, accepted.run_id, min(wait_s, MAX_WAIT_S)))
        else:
            answer["status"] = "submitted"
        return answer

    @app.tool(description="A run's status and, once it has ended, its output or error "
              "(a big output is a blob reference: {\"$blob\": ...}).")  # fmt: skip
    async def get_run(ctx: Context, run_id: str) -> dict[str, Any]:
        client = await connect()
        records = await owned(client, caller(ctx), run_id)
        return _status(run_id, records)

    @app.tool(description="Runs, newest first, with status and duration (yours only over "
              "HTTP unless you are an admin). `status` filters, `limit` <= 200.")  # fmt: skip
    async def list_runs(ctx: Context, limit: int = 20, status: str | None = None) -> dict[str, Any]:
        who = caller(ctx)
        client = await connect()
        limit = max(1, min(limit, MAX_LIST))
        try:
            runs = await client.runs(limit=limit, status=status)
        except LoomError as exc:
            raise _tool_error(exc) from None
        if not who.local:
            runs = [r for r in runs if who.owns(await _owner(client, r.run_id))]
        return {"runs": [_builtins(r) for r in runs]}

    @app.tool(description="A run's statistics: status, time running / waiting / queued, "
              "step counts, what it waits on.")  # fmt: skip
    async def describe_run(ctx: Context, run_id: str) -> dict[str, Any]:
        client = await connect()
        records = await owned(client, caller(ctx), run_id)

        async def events_of(rid: str) -> list[EventRecord]:
            if rid == run_id:
                return records
            try:
                return await client.events(rid)
            except LoomError:
                return []

        stats = await family_stats(run_id, events_of, as_of=datetime.now(UTC))
        return {"run_id": run_id, "stats": _builtins(stats)}

    @app.tool(description="Answer a suspended run (an approval or a tool asking a "
              "person): `data` must match the suspension's schema; `label` picks one when "
              "several wait.")  # fmt: skip
    async def resume_run(
        ctx: Context, run_id: str, data: Any = None, label: str | None = None
    ) -> dict[str, Any]:
        who = caller(ctx)
        client = await connect()
        await owned(client, who, run_id)
        by = _by(who)
        reply = await client.resume(run_id, data, label=label, by=by)
        if not reply.ok:
            why = reply.error.message if reply.error else "already resumed"
            code = reply.error.code if reply.error else "already_resumed"
            raise ToolError(f"{code}: {why}")
        return {"run_id": run_id, "resumed": True, "suspension_id": reply.suspension_id}

    @app.tool(description="Cancel a run: calls in flight are told to stop, no step "
              "starts again.")  # fmt: skip
    async def cancel_run(ctx: Context, run_id: str, reason: str = "") -> dict[str, Any]:
        who = caller(ctx)
        client = await connect()
        await owned(client, who, run_id)
        try:
            reply = await client.control(run_id, "cancel", by=_by(who), reason=reason[:500])
        except LoomError as exc:
            raise _tool_error(exc) from None
        return {"run_id": run_id, "status": reply.status}

    @app.tool(description="Fork a run from a step: a new run reusing every result that "
              "does not depend on `from_step` (an instance path like `b` or `each/2/ok`); "
              "`input` replaces the run input, `set_output` edits recorded outputs.")  # fmt: skip
    async def fork_run(
        ctx: Context,
        run_id: str,
        from_step: str,
        input: dict[str, Any] | None = None,  # noqa: A002 - as in ForkRun
        set_output: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        who = caller(ctx)
        client = await connect()
        await owned(client, who, run_id)
        try:
            request = msgspec.convert(
                {"run_id": run_id, "from_step": from_step, "input": input,
                 "set_output": set_output or {}},
                ForkRun,
            )  # fmt: skip
            reply = await client.fork(request)
        except msgspec.ValidationError as exc:
            raise ToolError(f"invalid_fork: {exc}") from None
        except LoomError as exc:
            raise _tool_error(exc) from None
        return {"run_id": reply.run_id, "forked_from": run_id, "existing": reply.existing}

    @app.tool(description="A run's trace: its spans (name, parent, start, end, status, "
              "attributes, events), rebuilt from its events; at most `limit` spans.")  # fmt: skip
    async def run_trace(ctx: Context, run_id: str, limit: int = 500) -> dict[str, Any]:
        client = await connect()
        await owned(client, caller(ctx), run_id)
        limit = max(1, min(limit, MAX_SPANS))
        spans = []
        try:
            async for span in client.iter_trace(run_id):
                spans.append(_builtins(span))
                if len(spans) >= limit:
                    break
        except LoomError as exc:
            raise _tool_error(exc) from None
        return {"run_id": run_id, "spans": spans, "truncated": len(spans) >= limit}

    return app


# --------------------------------------------------------------------------- helpers


def _builtins(value: Any) -> Any:
    return codec.to_builtins(value)


def _by(who: Caller) -> str:
    if who.local or who.principal is None:
        return "mcp"
    return f"mcp:{who.principal.user_id}"[:128]


def _tool_error(exc: LoomError) -> ToolError:
    return ToolError(f"{exc.error.code}: {exc.error.message}")


async def _owner(client: LoomClient, run_id: str) -> Principal | None:
    try:
        async for record in client.iter_events(run_id, page=1):
            event = record.event
            return event.principal if isinstance(event, RunRequested) else None
    except LoomError:
        return None
    return None


def _status(run_id: str, records: list[EventRecord]) -> dict[str, Any]:
    last = records[-1].event
    answer: dict[str, Any] = {"run_id": run_id, "events": len(records)}
    match last:
        case RunCompleted(output=output):
            answer.update(status="completed", output=output)
        case RunFailed(error=error):
            answer.update(status="failed", error=_builtins(error))
        case RunCancelled(by=by, reason=reason):
            answer.update(status="cancelled", by=by, reason=reason)
        case PlanRejected(issues=issues):
            answer.update(status="rejected", issues=_builtins(issues))
        case _:
            answer.update(status="running", last_event=records[-1].kind)
    return answer


async def _wait(client: LoomClient, run_id: str, wait_s: float) -> dict[str, Any]:
    records: list[EventRecord] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            async for record in client.follow(run_id, timeout=wait_s):
                records.append(record)
                if isinstance(record.event, TERMINAL_EVENTS):
                    break
    if not records:
        return {"status": "submitted"}
    return _status(run_id, records)


# --------------------------------------------------------------------------- HTTP gate


class BearerGate:
    """ASGI middleware in front of the streamable-HTTP app: verifies the bearer token of
    every request (401 with the reason otherwise) and leaves the :class:`Caller` in the
    request's state for the tools."""

    def __init__(self, app: ASGIApp, resolver: PrincipalResolver) -> None:
        self.app = app
        self.resolver = resolver

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            who = self.authenticate(headers)
        except AuthError as exc:
            response = JSONResponse(
                {"error": exc.error.code, "message": exc.error.message},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="agentloom"'},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[STATE_KEY] = who
        await self.app(scope, receive, send)

    def authenticate(self, headers: dict[str, str]) -> Caller:
        token = bearer_token({k.lower(): v for k, v in headers.items()})
        if token is None:
            if not self.resolver.settings.allow_anonymous:
                raise AuthError(
                    "not_authenticated",
                    "this endpoint needs `Authorization: Bearer <JWT>` with a token of the "
                    "stack's issuer",
                )
            return Caller(principal=anonymous("client"), token=None)
        if not self.resolver.settings.enabled:
            raise AuthError(
                "token_invalid", "this stack verifies no tokens (LOOM_AUTH_ISSUER is not set)"
            )
        return Caller(principal=self.resolver.verify(token, "client"), token=token)


def http_app(server: MCPServer, resolver: PrincipalResolver, host: str = "127.0.0.1") -> ASGIApp:
    app = server.streamable_http_app(json_response=True, host=host)
    return BearerGate(app, resolver)


class SharedClient:
    """One LoomClient for the server's life, connected on first use."""

    def __init__(self, factory: Connect) -> None:
        self.factory = factory
        self.client: LoomClient | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> LoomClient:
        async with self._lock:
            if self.client is None:
                self.client = await self.factory()
            return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None


@contextlib.asynccontextmanager
async def serving(factory: Connect) -> AsyncIterator[SharedClient]:
    shared = SharedClient(factory)
    try:
        yield shared
    finally:
        await shared.close()
