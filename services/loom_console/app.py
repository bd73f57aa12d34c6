"""The console's web app: the page (static files, no external asset), a typed JSON API
under ``/api`` and server-sent events for live updates.

Security, for a server that acts as the operator: it binds to 127.0.0.1 by default; a
request whose Host is not an allowed name is refused (DNS rebinding); every POST must
carry the session's CSRF token in ``X-Loom-CSRF``, be JSON and, when the browser says
where it comes from (``Origin``), come from an allowed host; the Content-Security-Policy
allows only the app's own script and styles (the page renders run data as text, never
as HTML)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import secrets as pysecrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import msgspec
from nats.errors import Error as NatsError
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from loom_console import api, plans, views
from loom_console.source import RunSource
from loom_core import codec, schemas, subjects
from loom_core.contracts import (
    TERMINAL_EVENTS,
    ErrorInfo,
    ForkRun,
    PlanIssue,
    RunProgress,
)
from loom_core.limits import DEFAULT_MAX_DEPTH
from loom_core.lineage import diff_runs
from loom_core.replay import replay, state_at, state_view
from loom_core.statuses import RUN_STATUSES
from loom_infra.client import LoomClient, LoomError
from loom_infra.settings import DEFAULT_MAX_PAYLOAD

STATIC = Path(__file__).parent / "static"
CSRF_HEADER = "x-loom-csrf"
DEFAULT_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
PAGE_MAX = 1000  # the most rows one API page holds
NUDGE_FALLBACK_S = 5.0  # progress is a plain NATS nudge: a missed one costs at most this

T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R")
DERIVED_KEPT = 64  # views of runs kept computed (timeline, calls, header), newest used
Handler = Callable[[Request], Awaitable[Response]]

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(code=code, message=message, path=path)


def reply(value: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(value), status, media_type="application/json")


def _error(status: int, info: ErrorInfo) -> Response:
    return reply({"error": msgspec.to_builtins(info)}, status)


def endpoint(handler: Handler) -> Handler:
    """Every API handler's errors become a typed JSON error with a status: what is
    wrong, where, and what to do; never a traceback."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc.status, exc.info)
        except LoomError as exc:
            status = 404 if exc.error.code in ("not_found", "unknown_run") else 400
            return _error(status, exc.error)
        except (TimeoutError, NatsError) as exc:
            return _error(503, ErrorInfo(
                code="unavailable", retryable=True,
                message=f"the stack did not answer ({type(exc).__name__}): is `loom up` "
                "running and are its services healthy?",
            ))  # fmt: skip

    wrapped.__name__ = handler.__name__
    return wrapped


# ------------------------------------------------------------------ request parsing


def int_param(request: Request, name: str, default: int, low: int = 0, high: int = PAGE_MAX) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(
            400, "bad_parameter", f"{name} must be a whole number, got {raw[:40]!r}", name
        ) from None
    if not low <= value <= high:
        raise ApiError(
            400, "bad_parameter", f"{name} must be between {low} and {high}, got {value}", name
        )
    return value


_RELATIVE = re.compile(r"^(\d{1,6})([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def time_param(request: Request, name: str, now: datetime) -> datetime | None:
    """``1h`` / ``30m`` / ``2d`` ago, or an ISO 8601 time (UTC when no zone)."""
    raw = (request.query_params.get(name) or "").strip()
    if not raw:
        return None
    match = _RELATIVE.match(raw)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        wanted = f"{name} must be like 1h, 30m, 2d or an ISO time, got {raw[:40]!r}"
        raise ApiError(400, "bad_parameter", wanted, name) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def text_param(request: Request, name: str, limit: int = 200) -> str | None:
    raw = (request.query_params.get(name) or "").strip()
    if len(raw) > limit:
        raise ApiError(400, "bad_parameter", f"{name} is at most {limit} characters", name)
    return raw or None


async def body(request: Request, kind: type[T]) -> T:
    data = await request.body()
    if len(data) > plans.MAX_TEXT * 2:
        raise ApiError(
            413, "too_large", f"the request body is {len(data)} bytes; at most {plans.MAX_TEXT * 2}"
        )
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_request", str(exc), _where(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"the request body is not JSON: {exc}") from None


_AT = re.compile(r"at `(\$[^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def _where(message: str) -> str | None:
    """The JSON path msgspec names in a validation error (``… - at `$.x` ``); an unknown
    field is named in the message instead, under the object it was found in."""
    at = _AT.search(message)
    base = at.group(1) if at else "$"
    unknown = _UNKNOWN.search(message)
    if unknown:
        return f"{base}.{unknown.group(1)}"
    return base if at else None


# ------------------------------------------------------------------ the console


class Console:
    """The handlers, around one operator connection and its run cache."""

    def __init__(
        self,
        client: LoomClient,
        identity: str = "operator",
        by: str = "console",
        max_json_depth: int = DEFAULT_MAX_DEPTH,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.client = client
        # LOOM_MAX_JSON_DEPTH and LOOM_MAX_PAYLOAD, read at start: a plan's bounds
        self.max_json_depth, self.max_payload = max_json_depth, max_payload
        self.source = RunSource(client)
        self.identity = identity
        self.by = by  # recorded as who resumed, cancelled, paused
        self.csrf = pysecrets.token_urlsafe(32)
        self._derived: OrderedDict[tuple[str, str], tuple[int, object]] = OrderedDict()

    async def derived(self, name: str, records: list[Any], make: Callable[[list[Any]], R]) -> R:
        """``make(records)``, computed once per run and length (events only grow), off
        the event loop: a 10,000-event run's timeline is not folded again per page."""
        key = (name, records[0].run_id)
        known = self._derived.get(key)
        if known is not None and known[0] == len(records):
            self._derived.move_to_end(key)
            return cast(R, known[1])
        snapshot = records[:]  # the cached list grows while a thread reads it
        value = await asyncio.to_thread(make, snapshot)
        self._derived[key] = (len(snapshot), value)
        while len(self._derived) > DERIVED_KEPT:
            self._derived.popitem(last=False)
        return value

    async def records(self, run_id: str) -> list[Any]:
        if not run_id or len(run_id) > 256:
            raise ApiError(400, "bad_run_id", "a run id is 1 to 256 characters", "run_id")
        found = await self.source.events(run_id)
        if not found:
            raise ApiError(404, "not_found", f"no run {run_id!r}: `loom runs` lists them", "run_id")
        return found

    # ---------------------------------------------------------------- reading

    async def session(self, request: Request) -> Response:
        return reply(
            api.Session(csrf_token=self.csrf, identity=self.identity, statuses=RUN_STATUSES)
        )

    async def runs(self, request: Request) -> Response:
        now = datetime.now(UTC)
        limit = int_param(request, "limit", 50, 1, 200)
        status = text_param(request, "status")
        if status is not None and status not in RUN_STATUSES:
            raise ApiError(
                400, "bad_parameter", f"status must be one of {', '.join(RUN_STATUSES)}", "status"
            )
        label = text_param(request, "label")
        want: tuple[str, str] | None = None
        if label is not None:
            key, sep, value = label.partition("=")
            if not sep or not key:
                raise ApiError(400, "bad_parameter", "label must be KEY=VALUE", "label")
            want = (key.strip(), value.strip())
        since, until = time_param(request, "since", now), time_param(request, "until", now)
        tool, model = text_param(request, "tool"), text_param(request, "model")
        error = text_param(request, "error")
        after: str | None = request.query_params.get("after", "")
        rows: list[api.RunRow] = []
        scanned = 0
        # a label filter drops runs: look at a few pages to fill this one (bounded)
        for _ in range(10 if want else 1):
            if after is None:
                break
            found, after = await self.source.runs(
                limit - len(rows), after, status, since, until, tool, model, error
            )
            scanned += len(found)
            for summary in found:
                labels = await self.source.labels(summary.run_id)
                if want and labels.get(want[0]) != want[1]:
                    continue
                rows.append(_run_row(summary, labels))
            if len(rows) >= limit:
                break
        if rows:
            starts = [r.started_at for r in rows if r.started_at]
            since = datetime.fromisoformat(min(starts)) if starts else None
            usage = await self.source.usage_by_run(since)
            for row in rows:
                u = usage.get(row.run_id)
                if u:
                    row.input_tokens, row.output_tokens = u["input_tokens"], u["output_tokens"]
                    row.cost_usd = u["cost_usd"]
        return reply(api.RunsPage(runs=rows, next_after=after, scanned=scanned))

    async def run(self, request: Request) -> Response:
        records = await self.records(request.path_params["run_id"])
        return reply(await self.derived("run", records, views.run_view))

    async def events(self, request: Request) -> Response:
        records = await self.records(request.path_params["run_id"])
        after = int_param(request, "after", 0, 0, 10**9)
        limit = int_param(request, "limit", 100, 1)
        kind = text_param(request, "kind")
        picked = records[after:]  # seqs are 1, 2, 3...: event N is at index N-1
        if kind:
            picked = [r for r in picked if r.kind == kind]
        page = picked[:limit]
        more = len(picked) > limit
        return reply(api.EventPage(
            run_id=records[0].run_id, events=[views.event_row(r) for r in page],
            total=len(records), next_after=page[-1].seq if more and page else None,
        ))  # fmt: skip

    async def timeline(self, request: Request) -> Response:
        records = await self.records(request.path_params["run_id"])
        offset = int_param(request, "offset", 0, 0, 10**9)
        limit = int_param(request, "limit", 200, 1)
        steps = await self.derived("timeline", records, views.timeline)
        return reply(api.Timeline(
            run_id=records[0].run_id, steps=steps[offset : offset + limit], total=len(steps),
            offset=offset, origin=records[0].at.isoformat(),
        ))  # fmt: skip

    async def calls(self, request: Request) -> Response:
        records = await self.records(request.path_params["run_id"])
        offset = int_param(request, "offset", 0, 0, 10**9)
        limit = int_param(request, "limit", 50, 1)
        found = await self.derived("calls", records, views.calls)
        return reply(api.Calls(run_id=records[0].run_id, calls=found[offset : offset + limit],
                               total=len(found), offset=offset))  # fmt: skip

    async def state(self, request: Request) -> Response:
        records = await self.records(request.path_params["run_id"])
        at = int_param(request, "at", len(records), 0, len(records))
        state = await asyncio.to_thread(lambda: views.clean(state_view(state_at(records, at))))
        return reply(api.StateAt(run_id=records[0].run_id, at=at, events=len(records), state=state))

    async def trace(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        await self.records(run_id)
        offset = int_param(request, "offset", 0, 0, 10**9)
        limit = int_param(request, "limit", 300, 1)
        spans = [s async for s in self.client.iter_trace(run_id)]
        return reply(_trace_view(run_id, spans, offset, limit))

    async def diff(self, request: Request) -> Response:
        a, b = request.query_params.get("a", ""), request.query_params.get("b", "")
        ra, rb = await self.records(a), await self.records(b)
        rows = await asyncio.to_thread(diff_runs, ra, rb)
        return reply(api.DiffView(a=a, b=b, steps=[
            api.DiffRow(step_id=d.step_id, changes=[
                api.DiffChange(field=name, a=views.clean(x), b=views.clean(y))
                for name, (x, y) in d.changes.items()
            ]) for d in rows
        ]))  # fmt: skip

    # ---------------------------------------------------------------- live

    async def runs_live(self, request: Request) -> Response:
        """Every run's progress as it happens (the list re-reads what changed)."""
        sub = await self.client.nc.subscribe(subjects.progress("*"))

        async def stream() -> AsyncIterator[dict[str, str]]:
            try:
                async for msg in sub.messages:
                    try:
                        progress = codec.decode(msg.data, RunProgress)
                    except Exception:  # noqa: S112 - not a progress message: not ours to show
                        continue
                    yield {"event": "progress", "data": msgspec.json.encode({
                        "run_id": progress.run_id, "status": progress.status,
                        "steps_done": progress.steps_done, "steps_total": progress.steps_total,
                    }).decode()}  # fmt: skip
            finally:
                await sub.unsubscribe()

        return EventSourceResponse(stream(), ping=15)

    async def run_live(self, request: Request) -> Response:
        """The run's events after ``after`` (or the browser's Last-Event-ID), as they are
        stored, until the run ends. Progress messages say when to read again."""
        run_id = request.path_params["run_id"]
        await self.records(run_id)
        after = int_param(request, "after", 0, 0, 10**9)
        last_id = request.headers.get("last-event-id", "")
        if last_id.isdigit():
            after = max(after, int(last_id))
        nudged = asyncio.Event()

        async def on_progress(_msg: Any) -> None:
            nudged.set()

        sub = await self.client.nc.subscribe(subjects.progress(run_id), cb=on_progress)

        async def stream() -> AsyncIterator[dict[str, str]]:
            last = after
            try:
                while True:
                    nudged.clear()
                    page, more = await self.source.events_page(run_id, last, 500)
                    for record in page:
                        last = record.seq
                        row = views.event_row(record)
                        yield {"event": "run_event", "id": str(record.seq),
                               "data": msgspec.json.encode(row).decode()}  # fmt: skip
                        if isinstance(record.event, TERMINAL_EVENTS):
                            yield {"event": "end", "data": "{}"}
                            return
                    if more is not None:
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(nudged.wait(), NUDGE_FALLBACK_S)
            finally:
                await sub.unsubscribe()

        return EventSourceResponse(stream(), ping=15)

    # ---------------------------------------------------------------- acting

    async def resume(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        answer = await body(request, api.ResumeBody)
        records = await self.records(run_id)
        open_ = {s.suspension_id: s for s in views.open_suspensions(records)}
        wanted = open_.get(answer.suspension_id)
        if wanted is not None and wanted.schema:
            # every field's problem at once; the executor checks again (and decides)
            found = schemas.problems(wanted.schema, answer.data)
            if found:
                issues = [
                    PlanIssue(code="invalid_resume_data", path=p, message=m) for p, m in found
                ]
                error = ErrorInfo(
                    code="invalid_resume_data",
                    message=f"{len(issues)} field(s) do not fit the form's schema",
                )
                refused = api.ActionReply(ok=False, run_id=run_id, issues=issues, error=error)
                return reply(refused, 422)
        result = await self.client.resume(
            run_id, answer.data, suspension_id=answer.suspension_id,
            request_id=answer.request_id or pysecrets.token_hex(16), by=self.by,
        )  # fmt: skip
        if not result.ok:
            issues = []
            if result.error is not None and result.error.path:
                issues = [PlanIssue(code=result.error.code, path=result.error.path,
                                        message=result.error.message)]  # fmt: skip
            return reply(
                api.ActionReply(ok=False, run_id=run_id, error=result.error, issues=issues), 409
            )
        return reply(api.ActionReply(ok=True, run_id=result.answered_run_id or run_id))

    async def control(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        order = await body(request, api.ControlBody)
        if order.action not in ("cancel", "pause", "unpause"):
            raise ApiError(400, "bad_action", "action must be cancel, pause or unpause", "$.action")
        try:
            result = await self.client.control(
                run_id, order.action, by=self.by, reason=order.reason[:500]
            )
        except LoomError as exc:
            return reply(api.ActionReply(ok=False, run_id=run_id, error=exc.error), 409)
        return reply(api.ActionReply(ok=True, run_id=run_id, status=result.status))

    async def replay(self, request: Request) -> Response:
        records = await self.records(request.path_params["run_id"])
        report, _ = await asyncio.to_thread(replay, records)
        d = report.divergence
        if d is None:
            return reply(api.ReplayView(run_id=report.run_id, identical=True, events=report.events))
        return reply(api.ReplayView(
            run_id=report.run_id, identical=False, events=report.events, seq=d.seq,
            message=d.message, recorded=views.clean(d.recorded), decided=views.clean(d.decided),
        ))  # fmt: skip

    async def fork(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        order = await body(request, api.ForkBody)
        await self.records(run_id)
        try:
            accepted = await self.client.fork(ForkRun(
                run_id=run_id, from_step=order.from_step, set_output=order.set_output,
                input=order.input,
            ))  # fmt: skip
        except LoomError as exc:
            return reply(api.ActionReply(ok=False, run_id=run_id, error=exc.error), 409)
        return reply(api.ActionReply(ok=True, run_id=accepted.run_id))

    async def validate(self, request: Request) -> Response:
        order = await body(request, api.PlanBody)
        run, issues = await self._checked(order)
        plan = run.plan if run else None
        return reply(api.ValidateReply(
            ok=not issues, issues=issues, name=plan.name if plan else "",
            steps=len(plan.steps) if plan else 0,
        ))  # fmt: skip

    async def submit(self, request: Request) -> Response:
        order = await body(request, api.PlanBody)
        run, issues = await self._checked(order)
        if run is None or issues:
            return reply(api.ActionReply(ok=False, issues=issues, error=ErrorInfo(
                code="invalid_plan", message=f"{len(issues)} problem(s); nothing was submitted",
            )), 422)  # fmt: skip
        try:
            accepted = await self.client.submit(run)
        except LoomError as exc:
            return reply(api.ActionReply(ok=False, error=exc.error), 409)
        return reply(api.ActionReply(ok=True, run_id=accepted.run_id))

    async def _checked(self, order: api.PlanBody) -> tuple[Any, list[Any]]:
        fmt = order.format if order.format in ("native", "plan-execute") else "native"
        run, issues = plans.parse(
            order.text, order.input, fmt, self.max_json_depth, self.max_payload
        )
        if run is None:
            return None, issues
        from loom_cli.tools import read_catalog  # the catalog as `loom tools` reads it

        catalog = await read_catalog(self.client)
        return run, plans.validate(run, catalog)

    # ---------------------------------------------------------------- the page

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


def _run_row(summary: Any, labels: dict[str, str]) -> api.RunRow:
    waits = sorted(summary.waits, key=lambda w: w.kind != "person")
    waiting = [f"{w.kind}: {w.label or w.ref or w.step_id}" for w in waits]
    return api.RunRow(
        run_id=summary.run_id, status=summary.status, name=summary.name,
        started_at=views.iso(summary.started_at), ended_at=views.iso(summary.ended_at),
        duration_ms=summary.duration_ms, steps_total=summary.steps_total,
        steps_done=summary.steps_done, labels=labels, waiting=waiting,
        forked_from=summary.forked_from,
    )  # fmt: skip


def _trace_view(run_id: str, spans: list[Any], offset: int, limit: int) -> api.TraceView:
    if not spans:
        return api.TraceView(run_id=run_id, spans=[], total_ms=0.0)
    origin = min(s.start for s in spans)
    end = max((s.end or s.start) for s in spans)
    by_id = {s.span_id: s for s in spans}
    depth: dict[str, int] = {}

    def depth_of(span: Any) -> int:
        seen = 0
        cur = span
        while cur.parent_span_id in by_id and seen < 64:
            cur = by_id[cur.parent_span_id]
            seen += 1
        return seen

    # parents before children: a depth-first walk in start order
    children: dict[str | None, list[Any]] = {}
    for s in sorted(spans, key=lambda s: s.start):
        parent = s.parent_span_id if s.parent_span_id in by_id else None
        children.setdefault(parent, []).append(s)
    ordered: list[Any] = []
    stack = list(reversed(children.get(None, [])))
    while stack:
        s = stack.pop()
        ordered.append(s)
        stack.extend(reversed(children.get(s.span_id, [])))
    rows = []
    for s in ordered[offset : offset + limit]:
        depth[s.span_id] = depth_of(s)
        rows.append(api.SpanRow(
            span_id=s.span_id, parent_span_id=s.parent_span_id, depth=depth[s.span_id],
            name=s.name, offset_ms=round((s.start - origin).total_seconds() * 1000, 3),
            duration_ms=round((s.end - s.start).total_seconds() * 1000, 3) if s.end else None,
            status=s.status, status_message=s.status_message,
            attributes=views.clean(s.attributes),
        ))  # fmt: skip
    more = offset + limit < len(ordered)
    return api.TraceView(
        run_id=run_id,
        spans=rows,
        total_ms=round((end - origin).total_seconds() * 1000, 3),
        next_after=str(offset + limit) if more else None,
    )


# ------------------------------------------------------------------ guards


class Guard:
    """Host check on every request, CSRF and origin checks on every POST, and the
    security headers on every answer."""

    def __init__(self, app: ASGIApp, console: Console, hosts: frozenset[str]) -> None:
        self.app = app
        self.console = console
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self.refusal(request)
        if refusal is not None:
            await _error(403, refusal)(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", _CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def refusal(self, request: Request) -> ErrorInfo | None:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].lower()
        if host not in self.hosts:
            return ErrorInfo(code="bad_host", message=f"Host {host!r} is not served here; "
                             "open the console by the address `loom console` printed "
                             "(or add the name with --allow-host)")  # fmt: skip
        if request.method in ("GET", "HEAD"):
            return None
        origin = request.headers.get("origin")
        if origin is not None and (urlsplit(origin).hostname or "").lower() not in self.hosts:
            return ErrorInfo(
                code="bad_origin", message=f"a request from {origin!r} may not act here"
            )
        token = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(token.encode(), self.console.csrf.encode()):
            return ErrorInfo(
                code="bad_csrf",
                message="missing or wrong X-Loom-CSRF token: reload the page (the console's "
                "token changes when it restarts)",
            )
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype != "application/json":
            return ErrorInfo(
                code="bad_content_type", message="POST bodies must be application/json"
            )
        return None


def build_app(
    client: LoomClient,
    *,
    hosts: frozenset[str] = DEFAULT_HOSTS,
    by: str = "console",
    max_json_depth: int = DEFAULT_MAX_DEPTH,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> tuple[Starlette, Console]:
    """The console's ASGI app around a connected operator client."""
    c = Console(client, by=by, max_json_depth=max_json_depth, max_payload=max_payload)
    r = "/api/runs/{run_id:str}"
    routes = [
        Route("/", c.index),
        Route("/api/session", endpoint(c.session)),
        Route("/api/runs", endpoint(c.runs)),
        Route("/api/runs/live", c.runs_live),
        Route("/api/diff", endpoint(c.diff)),
        Route("/api/plans/validate", endpoint(c.validate), methods=["POST"]),
        Route("/api/plans/run", endpoint(c.submit), methods=["POST"]),
        Route(r, endpoint(c.run)),
        Route(r + "/events", endpoint(c.events)),
        Route(r + "/timeline", endpoint(c.timeline)),
        Route(r + "/calls", endpoint(c.calls)),
        Route(r + "/state", endpoint(c.state)),
        Route(r + "/trace", endpoint(c.trace)),
        Route(r + "/live", endpoint(c.run_live)),
        Route(r + "/resume", endpoint(c.resume), methods=["POST"]),
        Route(r + "/control", endpoint(c.control), methods=["POST"]),
        Route(r + "/replay", endpoint(c.replay), methods=["POST"]),
        Route(r + "/fork", endpoint(c.fork), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, console=c, hosts=hosts)])
    return app, c
