"""Schedules that submit runs, fired by the executor.

The schedules live in the JetStream key-value bucket ``loom_schedules`` (one key per
schedule, ``<scope>.<name>``, ``scope_of``): the bucket is the truth, so a restart, or another
executor replica, picks up exactly where the last one was. Every replica watches the
bucket, and when a schedule is due it

1. submits each due firing straight to its own run host, with the run id derived from
   the schedule and the fire time (``loom_core.schedules.run_id_for``): a firing that
   two replicas (or a replica before and after a crash) both submit is one run, the
   second answered ``existing`` by the store;
2. then moves the schedule's ``next_at`` on with a compare-and-set on the key's
   revision. A crash between the two submits the same run id again: never a lost and
   never a double firing.

Why the executor: a firing must act for the principal that created the schedule, and
only the executor may make a run act for a principal without a token at hand (as it does
for sub-runs and forks, ``auth.inherit``). A request over the bus would need a body field
naming the principal, which no client may ever fill.

Requests (``loom.schedule.{via}``, and a tenant's twin ``loom.t.<tenant>.schedule.{via}``)
are answered here too; the caller's principal comes from the subject and the
``Authorization`` header exactly as on submit (``tenants.bind``: a tenant user's is its
tenant's, verified), and a schedule is seen and changed only within the caller's scope.
A firing keeps its creator's principal, ``tenant_verified`` included, so a tenant's
schedule submits that tenant's runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)

from loom_core import codec, limits, routes, secrets, shape, subjects, tenancy, validation
from loom_core import schedules as sched
from loom_core.contracts import (
    ErrorInfo,
    Principal,
    RunRequest,
    Schedule,
    ScheduleControl,
    ScheduleCreate,
    ScheduleMessage,
    ScheduleReply,
    ScheduleSpec,
    SchedulesQuery,
)
from loom_core.errors import LoomError
from loom_core.executor import Submission
from loom_infra import auth, bus, endpoints
from loom_infra.ownership import NotOwner
from loom_infra.settings import Settings
from loom_infra.store import ConcurrencyConflict
from loom_services import tenants

if TYPE_CHECKING:
    from loom_services.admission import AdmissionControl

log = logging.getLogger("loom.schedules")

LABEL = "schedule"  # the label every run a schedule submits carries: its name
MAX_IDLE_S = 30.0  # a due time is looked at again at least this often (clock jumps)
MAX_PAGE = 200
RESYNC_S = 300.0  # the index is checked against the bucket's keys this often
FIRE_CONCURRENCY = 64  # schedules fired at once (each: a get, its runs, a compare-and-set)


class ScheduleRefused(LoomError):
    def __init__(
        self, code: str, message: str, path: str | None = None, retryable: bool = False,
        **details: Any,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path
        self.retryable = retryable
        self.details = details


async def ensure_bucket(js: JetStreamContext, replicas: int = 1) -> Any:
    """The schedules bucket (created by provisioning, with the admin key; ``replicas``:
    LOOM_STREAM_REPLICAS)."""
    return await bus.ensure_kv(js, routes.SCHEDULES_BUCKET, replicas)


VERIFIED_SCOPE = "t-"  # a tenant user's scope: never the start of a hex digest


def tenant_token(tenant: str) -> str:
    """A token claim's key prefix: a claim may hold any character, a key token may not."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


def scope_of(principal: Principal) -> str:
    """The key prefix of the schedules ``principal`` sees and makes.

    A tenant's users (a verified tenant, ``tenancy.run_tenant``) have ``t-<tenant>`` (a
    tenant name is a valid key token). The platform's callers have, as before tenants,
    the digest of their token's tenant claim: those schedules submit platform runs, so a
    tenant must neither see nor trigger them, even one whose name the claim repeats. The
    two never meet: 16 hex digits never start with ``t-``."""
    if principal.tenant_verified:
        return VERIFIED_SCOPE + tenancy.check_tenant(principal.tenant)
    return tenant_token(principal.tenant)


def key_of(principal: Principal, name: str) -> str:
    return f"{scope_of(principal)}.{name}"


def when_of(spec: ScheduleSpec, anchor: datetime, path: str = "$.when") -> sched.When:
    """The compiled fire rule of ``spec`` (ScheduleError naming the field)."""
    given = [n for n in ("cron", "every", "at") if getattr(spec, n) is not None]
    if len(given) != 1:
        raise sched.ScheduleError(
            "invalid_schedule",
            "give exactly one of `cron`, `every` or `at`"
            + (f" (got {', '.join(given)})" if given else ""),
            path,
        )
    tz = sched.zone(spec.tz, f"{path}.tz")
    if spec.cron is not None:
        rule: sched.Cron | sched.Every | sched.At = sched.parse_cron(spec.cron, f"{path}.cron")
    elif spec.every is not None:
        rule = sched.Every(sched.parse_every(spec.every, f"{path}.every"), anchor)
    else:
        assert spec.at is not None
        if spec.at.tzinfo is None:
            raise sched.ScheduleError(
                "invalid_schedule", "`at` needs a time zone (e.g. 2026-12-05T09:00Z)",
                f"{path}.at",
            )  # fmt: skip
        rule = sched.At(spec.at.astimezone(anchor.tzinfo))
    return sched.When(rule, tz)


def firing_request(schedule: Schedule, fire_at: datetime) -> RunRequest:
    assert schedule.run is not None
    labels = {**schedule.run.labels, LABEL: schedule.name}
    return msgspec.structs.replace(
        schedule.run, run_id=sched.run_id_for(schedule.schedule_id, fire_at), labels=labels
    )


@dataclass
class Firing:
    run_id: str
    existing: bool


ELSEWHERE_RECHECK_S = 0.2  # how soon a firing left to another replica is looked at again


class FiringElsewhere(LoomError):
    """A due firing belongs to a partition another executor replica owns and is not
    stored yet: that replica submits it; this one looks again shortly."""

    code = "partition_moving"
    retryable = True


class Scheduler:
    """The schedules of one executor process: the bucket's watcher, the firer, and the
    request handler. ``submit(run_id, submission)`` is the run host's (it returns the
    events it stored: none when the run existed); ``check(request, data)`` refuses a run
    request as submit would (None: fine)."""

    def __init__(
        self,
        settings: Settings,
        submit: Callable[[str, Submission], Awaitable[list[Any]]],
        principals: auth.PrincipalResolver,
        check: Callable[[RunRequest, bytes], Awaitable[ErrorInfo | None]],
        clock: Callable[[], datetime] = bus.now,
        exists: Callable[[str], Awaitable[bool]] | None = None,
        admission: AdmissionControl | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.schedules
        self.submit = submit
        self.principals = principals
        self.check = check
        self.now = clock
        # whether a run is stored (the shared store, any partition); with executor
        # replicas, a firing outside this replica's partitions is submitted by its owner
        self.exists = exists
        # the executor's quotas: a firing takes a slot of its tenant's concurrent runs
        # (stored queued when there is none), as a submission does
        self.admission = admission
        self.known: dict[str, tuple[int, Schedule]] = {}  # key -> (revision, schedule)
        self.changed = asyncio.Event()
        self.fired = 0  # firings this process submitted (new or existing runs)

    async def start(self, ctx: Any) -> None:
        self.js = ctx.js
        self.kv = await self.js.key_value(routes.SCHEDULES_BUCKET)
        # the bucket as it is now, before anything is fired
        watcher = await bus.watch_from_now(self.kv, self._learn, timeout=30.0)
        ctx.spawn(self._watch(watcher, ctx.stop), "executor-schedules-watch")
        ctx.spawn(self._fire_loop(ctx.stop), "executor-schedules")
        await endpoints.listen(ctx.nc, routes.SCHEDULE, "executor", self.on_request)

    # ------------------------------------------------------------------ watching

    def _learn(self, entry: Any) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self.known.pop(entry.key, None)
        else:
            try:
                schedule = codec.decode(entry.value, Schedule)
            except Exception as exc:  # not ours to fire; never blocks the others
                log.error("schedule %s is unreadable and is not fired: %r", entry.key, exc)
                self.known.pop(entry.key, None)
                return
            current = self.known.get(entry.key)
            if current is None or current[0] <= entry.revision:
                self.known[entry.key] = (entry.revision, schedule)
        self.changed.set()

    async def _watch(self, watcher: Any, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=MAX_IDLE_S)
                except NatsTimeoutError:  # nothing changed
                    entry = None
                if entry is not None:
                    self._learn(entry)
        finally:
            with contextlib.suppress(Exception):  # the connection is closing
                await watcher.stop()

    # ------------------------------------------------------------------ firing

    async def resync(self) -> None:
        """Bring the index back to the bucket's keys: the watcher is the fast path, this
        makes a watcher that stopped (a long NATS outage) harmless."""
        try:
            keys = set(await self.kv.keys())
        except NoKeysError:
            keys = set()
        for key in set(self.known) - keys:
            self.known.pop(key, None)
        for key in keys - set(self.known):
            try:
                entry = await self.kv.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                continue
            self._learn(entry)

    async def _fire_loop(self, stop: asyncio.Event) -> None:
        synced = asyncio.get_running_loop().time()
        while not stop.is_set():
            self.changed.clear()
            if asyncio.get_running_loop().time() - synced > RESYNC_S:
                synced = asyncio.get_running_loop().time()
                try:
                    await self.resync()
                except Exception as exc:  # the bus is down: the next pass tries again
                    log.warning("schedules not resynced: %r", exc)
            now = self.now()
            wait = MAX_IDLE_S
            due: list[str] = []
            for key, (_, schedule) in list(self.known.items()):
                if schedule.paused or schedule.next_at is None:
                    continue
                if schedule.next_at <= now:
                    due.append(key)
                else:
                    wait = min(wait, (schedule.next_at - now).total_seconds())
            # schedules due together fire together: their submissions share the run
            # host's batches (one commit) instead of queueing one after another
            for start in range(0, len(due), FIRE_CONCURRENCY):
                chunk = due[start : start + FIRE_CONCURRENCY]
                results = await asyncio.gather(*(self.fire_due(k) for k in chunk),
                                               return_exceptions=True)  # fmt: skip
                for key, result in zip(chunk, results, strict=True):
                    if isinstance(result, FiringElsewhere):
                        log.debug("schedule %s: %s", key, result)
                        wait = min(wait, ELSEWHERE_RECHECK_S)
                    elif isinstance(result, BaseException):  # the bus or store is down
                        log.warning("schedule %s not fired yet: %r", key, result)
                        wait = min(wait, 1.0)
            if stop.is_set():
                return
            waiting = asyncio.ensure_future(self.changed.wait())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiting, stopping}, timeout=max(wait, 0.001),
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                waiting.cancel()
                stopping.cancel()

    async def fire_due(self, key: str) -> list[Firing]:
        """Submit what ``key``'s schedule has due now, then move it on (compare-and-set:
        if another firer or a request changed it first, this one's move is dropped and
        the schedule is looked at again as it now is)."""
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            self.known.pop(key, None)
            return []
        schedule = codec.decode(entry.value, Schedule)
        now = self.now()
        if schedule.paused or schedule.next_at is None or schedule.next_at > now:
            self.known[key] = (entry.revision, schedule)
            return []
        try:
            when = when_of(schedule.when, schedule.anchor)
        except sched.ScheduleError as exc:
            # it compiled when it was created: the tz data changed under it. Paused with
            # the reason (describe shows it), never retried in a loop
            log.error("schedule %s paused: %s", key, exc.info.message)
            await self._put(key, msgspec.structs.replace(schedule, paused=True, error=exc.info),
                            entry.revision)  # fmt: skip
            return []
        due = sched.due(
            when, schedule.next_at, now, schedule.when.catch_up,
            grace=timedelta(seconds=self.limits.grace_s), max_catch_up=self.limits.max_catch_up,
        )  # fmt: skip
        submitted = [await self._submit(schedule, at) for at in due.fires]
        firings = [f for f in submitted if f is not None]
        if len(firings) < len(submitted):  # the others' owners submit them; moved then
            self.known[key] = (entry.revision, schedule)
            raise FiringElsewhere(f"{len(submitted) - len(firings)} firing(s) of {key}")
        moved = msgspec.structs.replace(
            schedule,
            next_at=due.next_at,
            fired=schedule.fired + len(firings),
            last_fire_at=due.fires[-1] if due.fires else schedule.last_fire_at,
            last_run_id=firings[-1].run_id if firings else schedule.last_run_id,
            dropped=schedule.dropped + int(due.dropped),
        )
        await self._put(key, moved, entry.revision)
        return firings

    async def _put(self, key: str, schedule: Schedule, revision: int) -> bool:
        try:
            new = await self.kv.update(key, codec.encode(schedule), last=revision)
        except KeyWrongLastSequenceError:
            return False
        self.known[key] = (new, schedule)
        return True

    async def _submit(self, schedule: Schedule, fire_at: datetime) -> Firing | None:
        """The firing at ``fire_at`` submitted (or found stored); None when another
        replica owns its run's partition and has not stored it yet."""
        request = firing_request(schedule, fire_at)
        assert request.run_id is not None
        # the creator's user, roles and tenant (verified or not), submitted by the engine
        principal = auth.inherit(schedule.principal)
        run_id = request.run_id
        booked = queued = False
        admission = self.admission
        if admission is not None and admission.applies(principal, request):
            # booked as on submit (by the partition's owner); undone if not created here
            if not admission.owns(run_id):
                if self.exists is None or not await self.exists(run_id):
                    return None
                return Firing(run_id, existing=True)
            queued, booked = await admission.book(run_id, principal, request)
        submission = Submission(request, principal, tuple(schedule.redacted), queued=queued)
        try:
            produced = await self.submit(run_id, submission)
        except ConcurrencyConflict:
            produced = []  # another replica stored this firing at the same moment
        except NotOwner:
            if booked:
                await self._unbook(run_id, principal)
            # every replica watches every schedule; the owner of this run's partition
            # submits it (its run id is the same everywhere)
            if self.exists is None or not await self.exists(run_id):
                return None
            return Firing(run_id, existing=True)
        except BaseException:
            if booked:
                await self._unbook(run_id, principal)
            raise
        if booked and not produced:
            await self._unbook(run_id, principal)
        elif queued:
            await admission.after_stored(run_id)  # type: ignore[union-attr]  # queued is set only by admission.book, so admission is not None here
        self.fired += 1
        if produced:
            log.info("schedule %s fired run %s (%s)", schedule.name, request.run_id, fire_at)
        return Firing(request.run_id, existing=not produced)

    async def _unbook(self, run_id: str, principal: Any) -> None:
        assert self.admission is not None
        await self.admission.unbook(run_id, principal)

    # ------------------------------------------------------------------ requests

    async def on_request(self, msg: Msg) -> None:
        try:
            reply = await self._answer(msg)
        except LoomError as exc:
            reply = ScheduleReply(error=exc.info)
        except Exception as exc:
            log.exception("schedule request failed")
            reply = ScheduleReply(error=ErrorInfo(
                code="unavailable", retryable=True,
                message=f"the schedule could not be read or stored now "
                f"({type(exc).__name__}); retry",
            ))  # fmt: skip
        if msg.reply:
            await msg.respond(codec.encode(reply))

    async def _answer(self, msg: Msg) -> ScheduleReply:
        limit = self.settings.max_payload
        if len(msg.data) > limit:
            raise ScheduleRefused(
                "payload_too_large",
                f"the schedule request is {len(msg.data)} bytes; the limit is {limit} "
                "(LOOM_MAX_PAYLOAD). Pass large data by reference (loom blob put).",
            )
        principal = self._principal(msg)
        request = self._decode(msg.data)
        if isinstance(request, ScheduleCreate):
            return await self.create(request, principal, msg.data)
        platform = tenancy.split(msg.subject)[0] is None
        if isinstance(request, SchedulesQuery):
            if request.every_tenant:
                return self.every_listing(request, platform)
            return self.listing(request, principal)
        if request.tenant:
            return await self.describe_of(request, principal, platform)
        return await self.control(request, principal)

    def _principal(self, msg: Msg) -> Principal:
        # the tenant, as submit reads it: the server let only its users publish here
        tenant, plain = tenancy.split(msg.subject)
        via = plain.rpartition(".")[2]
        if plain != routes.SCHEDULE.subject(via=via) or via not in routes.SCHEDULE.publishers:
            raise ScheduleRefused(
                "not_authorized",
                f"schedules are managed on {routes.SCHEDULE.subject(via='operator')} "
                "(the operator's identity, or its tenant's twin)",
            )
        # the same rules as a submission's (the subject's identity and tenant, the token)
        return tenants.bind(self.principals.resolve(subjects.submit(via), msg.headers), tenant)

    def _decode(self, data: bytes) -> ScheduleMessage:
        depth = self.settings.max_json_depth
        document: object = None
        try:
            document = msgspec.json.decode(data)
            error = limits.check_json(document, max_depth=depth)
            if error is None:
                return codec.decode(data, ScheduleMessage)  # type: ignore[arg-type]  # a union alias is no type[T] to mypy; msgspec decodes it
        except RecursionError:
            error = limits.too_deep("$", max_depth=depth)
        except Exception as exc:
            error = shape.with_issues(bus.decode_error_info(exc), document, ScheduleMessage)
        raise ScheduleRefused(error.code, error.message, error.path, **error.details)

    async def create(
        self, request: ScheduleCreate, principal: Principal, data: bytes
    ) -> ScheduleReply:
        name = sched.check_name(request.name)
        now = self.now()
        anchor = now.replace(microsecond=0)
        when = when_of(request.when, anchor)
        if isinstance(when.rule, sched.At) and when.rule.instant <= now:
            raise sched.ScheduleError(
                "invalid_schedule", f"`at` {when.rule.instant.isoformat()} is in the past",
                "$.when.at",
            )  # fmt: skip
        run = request.run
        if run.run_id is not None:
            raise ScheduleRefused(
                "invalid_schedule", "each firing's run id is derived from the schedule and "
                "its fire time: leave `run_id` out", "$.run.run_id",
            )  # fmt: skip
        if LABEL in run.labels:
            raise ScheduleRefused(
                "invalid_schedule", f"the label `{LABEL}` is set by the schedule (its name)",
                f"$.run.labels.{LABEL}",
            )  # fmt: skip
        error = await self.check(run, data)
        if error is not None:
            path = error.path or "$"
            raise ScheduleRefused(
                error.code, error.message, "$.run" + path[1:] if path.startswith("$") else path,
                **error.details,
            )  # fmt: skip
        if run.plan is not None:
            issues = validation.validate_plan(
                run.plan, run_input=run.input, path="$.run.plan", caps=self.settings.caps
            )
            if issues:
                raise ScheduleRefused(
                    issues[0].code, f"{len(issues)} problem(s) in the plan; first: "
                    f"{issues[0].message}", issues[0].path,
                    issues=[msgspec.to_builtins(i) for i in issues[:50]],
                )  # fmt: skip
        tenant = principal.tenant
        scope = scope_of(principal)
        count = sum(1 for key in self.known if key.startswith(scope + "."))
        if count >= self.limits.max_per_tenant:
            raise ScheduleRefused(
                "too_many_schedules",
                f"tenant {tenant!r} has {count} schedules, the most allowed "
                "(LOOM_SCHEDULES_MAX): delete one first",
                "$.name", limit=self.limits.max_per_tenant,
            )  # fmt: skip
        run, redacted = secrets.redact_request(run)  # never stored in clear
        schedule = Schedule(
            schedule_id=uuid.uuid4().hex[:12],
            name=name,
            tenant=tenant,
            when=request.when,
            created_at=now,
            anchor=anchor,
            principal=principal,
            run=run,
            redacted=list(redacted),
            next_at=sched.next_fire(when, now),
            paused=request.paused,
        )
        key = key_of(principal, name)
        try:
            revision = await self.kv.create(key, codec.encode(schedule))
        except KeyWrongLastSequenceError:
            raise ScheduleRefused(
                "schedule_exists",
                f"a schedule named {name!r} exists: delete it first, or choose another name",
                "$.name",
            ) from None
        self.known[key] = (revision, schedule)
        self.changed.set()
        return ScheduleReply(schedule=schedule)

    def listing(self, query: SchedulesQuery, principal: Principal) -> ScheduleReply:
        if not 1 <= query.limit <= 10_000:
            raise ScheduleRefused("invalid_query", "limit must be 1-10000", "$.limit")
        scope = scope_of(principal) + "."
        mine = sorted(
            (s for key, (_, s) in self.known.items() if key.startswith(scope)),
            key=lambda s: s.name,
        )
        page = [s for s in mine if s.name > query.after][: min(query.limit, MAX_PAGE)]
        more = len(page) == min(query.limit, MAX_PAGE) and page[-1].name != mine[-1].name
        return ScheduleReply(
            schedules=[msgspec.structs.replace(s, run=None) for s in page],
            next_after=page[-1].name if more else None,
        )

    def every_listing(self, query: SchedulesQuery, platform: bool) -> ScheduleReply:
        """Every scope's schedules (the platform's operator only), by tenant then name;
        ``after`` and ``next_after`` are ``<tenant>/<name>``. Each shows its tenant
        (``Schedule.tenant``; a platform schedule's is its token's claim, with
        ``principal.tenant_verified`` false)."""
        if not platform:
            raise ScheduleRefused(
                "not_authorized", "only the platform's operator lists every tenant's "
                "schedules; a tenant's operator lists its own (leave every_tenant out)",
                "$.every_tenant",
            )  # fmt: skip
        if not 1 <= query.limit <= 10_000:
            raise ScheduleRefused("invalid_query", "limit must be 1-10000", "$.limit")

        def place(s: Schedule) -> str:
            return f"{s.tenant}/{s.name}"

        every = sorted((s for _, s in self.known.values()), key=place)
        page = [s for s in every if place(s) > query.after][: min(query.limit, MAX_PAGE)]
        more = bool(page) and place(page[-1]) != place(every[-1])
        more = more and len(page) == min(query.limit, MAX_PAGE)
        return ScheduleReply(
            schedules=[msgspec.structs.replace(s, run=None) for s in page],
            next_after=place(page[-1]) if more else None,
        )

    async def describe_of(
        self, request: ScheduleControl, principal: Principal, platform: bool
    ) -> ScheduleReply:
        """A tenant's schedule described by the platform's operator (``tenant`` named);
        changing it takes that tenant's credentials (a tenant's schedules are its own).
        A tenant's operator may name only its own tenant (as if it named none)."""
        tenant = tenancy.check_tenant(request.tenant)
        if not platform:
            if principal.tenant_verified and principal.tenant == tenant:
                return await self.control(request, principal)
            raise ScheduleRefused(
                "not_authorized", "a tenant's operator acts only on its own schedules: "
                "leave `tenant` out", "$.tenant",
            )  # fmt: skip
        if request.action != "describe":
            raise ScheduleRefused(
                "not_authorized", f"the platform's operator may describe tenant {tenant!r}'s "
                f"schedules, not {request.action} them: use that tenant's credentials "
                f"(LOOM_TENANT={tenant})", "$.action",
            )  # fmt: skip
        name = sched.check_name(request.name)
        try:
            entry = await self.kv.get(f"{VERIFIED_SCOPE}{tenant}.{name}")
        except (KeyNotFoundError, KeyDeletedError):
            raise ScheduleRefused(
                "schedule_not_found", f"no schedule named {name!r} of tenant {tenant!r} "
                "(loom schedule list --every-tenant)", "$.name",
            ) from None  # fmt: skip
        return ScheduleReply(schedule=codec.decode(entry.value, Schedule))

    async def control(self, request: ScheduleControl, principal: Principal) -> ScheduleReply:
        name = sched.check_name(request.name)
        key = key_of(principal, name)
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            raise ScheduleRefused(
                "schedule_not_found", f"no schedule named {name!r} (loom schedule list)",
                "$.name",
            ) from None  # fmt: skip
        schedule = codec.decode(entry.value, Schedule)
        action = request.action
        if action == "describe":
            return ScheduleReply(schedule=schedule)
        if action == "delete":
            await self.kv.delete(key)
            self.known.pop(key, None)
            return ScheduleReply(schedule=schedule)
        if action == "trigger":
            firing = await self._submit(schedule, self.now())
            if firing is None:  # its run's partition is another executor replica's
                raise ScheduleRefused(
                    "partition_moving",
                    "another executor replica owns this firing's partition: trigger again",
                    retryable=True,
                )
            moved = msgspec.structs.replace(
                schedule, fired=schedule.fired + 1, last_run_id=firing.run_id
            )
            await self._put(key, moved, entry.revision)  # a count: lost to a race, no harm
            return ScheduleReply(schedule=moved, run_id=firing.run_id, existing=firing.existing)
        now = self.now()
        if action == "pause":
            changed = msgspec.structs.replace(schedule, paused=True)
        else:  # resume: what was missed while paused is not caught up
            when = when_of(schedule.when, schedule.anchor)
            changed = msgspec.structs.replace(
                schedule, paused=False, error=None,
                next_at=sched.next_fire(when, now) if schedule.next_at is not None else None,
            )  # fmt: skip
        if not await self._put(key, changed, entry.revision):
            raise ScheduleRefused(
                "unavailable", "the schedule changed meanwhile (it fired); retry", retryable=True
            )
        self.changed.set()
        return ScheduleReply(schedule=changed)
