"""Per-identity NATS credentials, generated from the route registry (docs/design.md decision 11).

Every identity of ``loom_core.routes`` (the five services, ``client``, ``operator``)
connects as its own nkey user. What it may publish and subscribe to is computed from the
routes alone, so a fact can only be said by the identity the registry names as its owner:

- **publish**: the subjects of the routes it publishes (``Route.publisher_subjects``);
- **subscribe**: the filters of the routes it consumes (``Route.filters``), with the
  consumer's queue group for request routes (``"loom.control executor"``: nobody else can
  join the group that answers a route), plus its *own* reply inbox ``_INBOX.<identity>.>``
  (connections use that inbox prefix, so no identity can read another's replies);
- identities that answer request routes may publish into ``_INBOX.>``: replies go only to
  inboxes. (NATS ``allow_responses`` would instead let a requester pick *any* reply
  subject, e.g. ``loom.run.X.run_completed``, and have an honest service publish its
  reply there: a confused deputy that forges facts. See docs/decisions.md.)
- the JetStream API subjects its routes need: ``$JS.API.INFO``, ``STREAM.INFO`` of the
  streams it touches, full rights over the durable consumers the registry gives it
  (``routes.declared_durables``) and nobody else's, and the reads in ``READS``.

Streams are created and updated only by ``admin``, a provisioning identity that is *not*
a route identity (``loom up``/``LocalStack`` and the Kubernetes provisioning Job use it);
services check that their streams exist and never create them.

Seeds live in ``{directory}/{identity}.nk`` (mode 0600, directory 0700) and are reused
when they exist, so a restart keeps its keys.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nkeys

from loom_core import routes, tenancy
from loom_core.errors import LoomError
from loom_core.routes import ROUTES, Route

ADMIN = "admin"
"""Creates and updates streams and the tool bucket (provisioning); no route identity."""
IDENTITIES: tuple[str, ...] = (*routes.IDENTITIES, ADMIN)
SEED_SUFFIX = ".nk"

JS_API = "$JS.API"

Read = Literal["get", "browse", "object_meta", "upkeep"]
"""``get``: read single messages (``stream_info`` + ``get_msg``/``get_last_msg``, direct
gets); ``browse``: ephemeral ordered consumers (following a run, a KV ``keys()``/watch);
``object_meta``: only an Object Store object's metadata, by a direct get of its meta
subject (a writer checks whether an object is stored without being able to read any);
``upkeep``: list the stream's consumers and delete single messages (the relay, after
nats-server lost the stream's tail: ``loom_infra.relay``)."""

# JetStream reads the routes do not spell out: who reads a stream other than through
# its own durable consumers, and why. Every key is a (route, identity) pair the registry
# declares (the identity publishes or consumes that route; a test checks it), so this
# table cannot hand anyone a stream the registry does not already give them.
READS: dict[tuple[str, str], frozenset[Read]] = {
    # the relay resumes after the last event it published (stream_info + get_msg)
    (routes.RUN_EVENTS.name, "executor"): frozenset({"get", "upkeep"}),
    # a wait that starts after its signal still sees the latest one (get_last_msg)
    (routes.SIGNAL.name, "executor"): frozenset({"get"}),
    # `loom follow`, `loom run`: an ordered consumer over one run's events
    (routes.RUN_EVENTS.name, "operator"): frozenset({"get", "browse"}),
    # inspecting dead letters
    (routes.DEAD_LETTER.name, "operator"): frozenset({"get", "browse"}),
    (routes.REJECTED.name, "operator"): frozenset({"get", "browse"}),
    # the tool catalog is read with kv.keys() (an ordered consumer) and kv.get()
    (routes.TOOL_CATALOG.name, "planner"): frozenset({"get", "browse"}),
    (routes.TOOL_CATALOG.name, "operator"): frozenset({"get", "browse"}),
    # partition leases: a watch (an ordered consumer) and the last value of a key
    (routes.PARTITION_LEASES.name, "executor"): frozenset({"get", "browse"}),
    (routes.PARTITION_LEASES.name, "operator"): frozenset({"get", "browse"}),
    # the tool-runner keeps the tools a down MCP server published before (kv.keys/get)
    (routes.TOOL_CATALOG.name, "toolrunner"): frozenset({"get", "browse"}),
    # a model answer already paid for, by the turn request's digest (kv.get)
    (routes.MODEL_ANSWERS.name, "planner"): frozenset({"get"}),
    # blobs: an object's metadata is a get_last_msg, its chunks an ordered consumer;
    # writers look an object up before writing it (stored once)
    (routes.BLOBS.name, "toolrunner"): frozenset({"get", "browse"}),
    (routes.BLOBS.name, "operator"): frozenset({"get", "browse"}),
    (routes.BLOBS.name, "executor"): frozenset({"get"}),
    # the planner serves a run's blob to whoever may see the run (apiBlob)
    (routes.BLOBS.name, "planner"): frozenset({"get", "browse"}),
    # ... and the dead letters and rejects a caller may see (apiDeadLetters), by
    # sequence (get_msg next_by_subj)
    (routes.DEAD_LETTER.name, "planner"): frozenset({"get"}),
    (routes.REJECTED.name, "planner"): frozenset({"get"}),
    (routes.BLOBS.name, "client"): frozenset({"object_meta"}),
    # schedules: every executor watches the bucket (an ordered consumer) and reads a
    # key before each compare-and-set
    (routes.SCHEDULE_STORE.name, "executor"): frozenset({"get", "browse"}),
    # admission books: every executor watches the bucket and reads a key before each
    # compare-and-set
    (routes.ADMISSION_BOOK.name, "executor"): frozenset({"get", "browse"}),
    (routes.ADMISSION_BOOK.name, "operator"): frozenset({"get", "browse"}),
    # rate buckets: a key is read before each compare-and-set (kv.get)
    (routes.RATE_BUCKETS.name, "executor"): frozenset({"get"}),
    (routes.RATE_BUCKETS.name, "planner"): frozenset({"get"}),
    (routes.RATE_BUCKETS.name, "toolrunner"): frozenset({"get"}),
}


class CredentialsError(LoomError, RuntimeError):
    """A seed file is missing, unreadable or not an nkey user seed."""

    code = "invalid_credentials"


def inbox_prefix(identity: str) -> str:
    """The reply-inbox prefix ``identity`` connects with (and may subscribe under)."""
    return f"_INBOX.{identity}"


@dataclass(frozen=True)
class Permissions:
    """One identity's allow lists (NATS denies everything else)."""

    identity: str
    publish: tuple[str, ...]
    # "subject" or "subject queue" (a queue-group subscription permission)
    subscribe: tuple[str, ...]

    def may_publish(self, subject: str) -> bool:
        return any(covers(allowed, subject) for allowed in self.publish)

    def may_subscribe(self, subject: str, queue: str | None = None) -> bool:
        for entry in self.subscribe:
            allowed, _, allowed_queue = entry.partition(" ")
            if allowed_queue and allowed_queue != queue:
                continue
            if covers(allowed, subject):
                return True
        return False


def covers(pattern: str, subject: str) -> bool:
    """True when every subject ``subject`` can match is matched by ``pattern`` (NATS
    wildcards: ``*`` one token, ``>`` the rest); how the server checks permissions."""
    wanted, given = pattern.split("."), subject.split(".")
    for i, part in enumerate(wanted):
        if part == ">":
            return len(given) > i
        if i >= len(given):
            return False
        if part == "*":
            if given[i] == ">":
                return False
            continue
        if part != given[i]:
            return False
    return len(wanted) == len(given)


def _durable_api(stream: str, durable: str) -> list[str]:
    """Everything a durable consumer's owner does with it: create (every form nats-py
    uses), look up, replace (delete + create when its config changed), fetch, ack."""
    return [
        f"{JS_API}.CONSUMER.CREATE.{stream}.{durable}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.{durable}.>",
        f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
        f"{JS_API}.CONSUMER.INFO.{stream}.{durable}",
        f"{JS_API}.CONSUMER.DELETE.{stream}.{durable}",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def _read_api(stream: str, reads: Iterable[Read]) -> list[str]:
    out: list[str] = []
    if "get" in reads:
        out += [
            f"{JS_API}.STREAM.MSG.GET.{stream}",
            f"{JS_API}.DIRECT.GET.{stream}",
            f"{JS_API}.DIRECT.GET.{stream}.>",
        ]
    if "upkeep" in reads:
        out += [
            f"{JS_API}.CONSUMER.LIST.{stream}",  # positions only (consumers_info)
            f"{JS_API}.STREAM.MSG.DELETE.{stream}",
        ]
    if "object_meta" in reads:
        bucket = stream.removeprefix("OBJ_")
        out.append(f"{JS_API}.DIRECT.GET.{stream}.$O.{bucket}.M.*")
    if "browse" in reads:
        out += [
            f"{JS_API}.STREAM.NAMES",  # js.subscribe finds the stream by subject
            # ephemeral only: the named form (CREATE.<stream>.<name>) could overwrite
            # another identity's durable
            f"{JS_API}.CONSUMER.CREATE.{stream}",
            f"{JS_API}.CONSUMER.INFO.{stream}.*",
            f"$JS.FC.{stream}.>",  # flow-control replies of ordered consumers
        ]
    return out


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def streams_of(identity: str) -> tuple[str, ...]:
    """The JetStream streams ``identity`` publishes into or reads (what it checks for
    at start, and may ask ``STREAM.INFO`` about)."""
    found: list[str] = []
    for route in ROUTES:
        if route.stream is None:
            continue
        consumes = any(c.identity == identity for c in route.consumers)
        if identity in route.publishers or consumes:
            found.append(route.stream)
    return tuple(sorted(set(found)))


def tenant_identities(tenants: Iterable[str]) -> tuple[str, ...]:
    """The NATS users of ``tenants`` (``client@<tenant>``, ``operator@<tenant>``)."""
    return tuple(tenancy.user(role, t) for t in tenants for role in tenancy.ROLES)


def tenant_permissions(identity: str) -> Permissions:
    """A tenant user's allow lists: the twins (``loom.t.<tenant>.…``) of what the plain
    ``client``/``operator`` may do on tenant-scoped routes, health pings, and its own
    reply inbox; no JetStream API at all (a stream read cannot be limited to one tenant's
    runs by subject, so a tenant reads through the services, which scope every answer)."""
    parsed = tenancy.parse_user(identity)
    assert parsed is not None, identity
    role, tenant = parsed
    tenancy.user(role, tenant)  # refuses a bad role or tenant name
    publish: list[str] = []
    subscribe: list[str] = [f"{inbox_prefix(identity)}.>"]
    for route in ROUTES:
        publish += route.tenant_publish(role, tenant)  # type: ignore[arg-type]  # role: checked by tenancy.user above
        for consumer in route.consumers:
            if consumer.identity == role:
                subscribe += route.tenant_filters(consumer, tenant)
    # liveness only: a pong names no tenant's data
    publish += routes.HEALTH.publisher_subjects(role)  # type: ignore[arg-type]  # role: checked by tenancy.user above
    return Permissions(identity, _unique(publish), _unique(subscribe))


def _every_tenants_broadcasts() -> list[str]:
    """The platform's operator hears every tenant's twin of the tenant-scoped broadcasts
    it hears (a tenant's runs' progress and streamed model text): it is the cluster's
    admin and reads every tenant's run events from the stream anyway."""
    return [
        tenancy.twin(subject, "*")
        for route in ROUTES
        if route.tenant_scoped and route.kind == "broadcast"
        for consumer in route.consumers
        if consumer.identity == "operator"
        for subject in route.filters(consumer)
    ]


def permissions(identity: str) -> Permissions:
    """The allow lists of ``identity``, from the route registry only."""
    if tenancy.parse_user(identity) is not None:
        return tenant_permissions(identity)
    if identity == ADMIN:
        # provisioning: the whole JetStream API (streams, the KV bucket), nothing else
        return Permissions(ADMIN, (f"{JS_API}.>",), (f"{inbox_prefix(ADMIN)}.>",))
    if identity not in routes.IDENTITIES:
        raise KeyError(f"unknown identity {identity!r}; known: {', '.join(IDENTITIES)}")
    publish: list[str] = []
    subscribe: list[str] = [f"{inbox_prefix(identity)}.>"]
    serves = False
    for route in ROUTES:
        publish += route.publisher_subjects(identity)  # type: ignore[arg-type]  # identity: a str naming an Identity
    for route, consumer in routes.consumers_of(identity):  # type: ignore[arg-type]  # identity: a str naming an Identity
        queue = f" {consumer.queue}" if consumer.queue else ""
        subscribe += [subject + queue for subject in route.filters(consumer)]
        serves = serves or route.kind == "request"
    if serves:
        publish.append("_INBOX.>")  # replies, and only replies: see the module doc
    streams = streams_of(identity)
    if streams:
        publish.append(f"{JS_API}.INFO")
        publish += [f"{JS_API}.STREAM.INFO.{s}" for s in streams]
    for (stream, durable), (owner, _filters) in sorted(routes.declared_durables(None).items()):
        if owner == identity:
            # a consumer per partition: any name on that stream (its owner is the
            # stream's only consumer), so the grant holds for every LOOM_PARTITIONS
            publish += _durable_api(stream, "*" if "{partition}" in durable else durable)
    for (stream, durable), owner in sorted(routes.replaced_durables().items()):
        if owner == identity:  # taken over: its ack floor read, then deleted
            publish += [
                f"{JS_API}.CONSUMER.INFO.{stream}.{durable}",
                f"{JS_API}.CONSUMER.DELETE.{stream}.{durable}",
            ]
    if identity == "operator":
        subscribe += _every_tenants_broadcasts()
    for (route_name, who), reads in sorted(READS.items()):
        if who == identity:
            read_stream = routes.BY_NAME[route_name].stream
            assert read_stream is not None, route_name
            publish += _read_api(read_stream, sorted(reads))
    return Permissions(identity, _unique(publish), _unique(subscribe))


# ----------------------------------------------------------------------------- seeds


def new_seed() -> bytes:
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)


def public_key_of(seed: bytes) -> str:
    try:
        keypair = nkeys.from_seed(bytearray(seed.strip()))
    except Exception as exc:  # nkeys raises its own error types for every bad input
        raise CredentialsError(f"not an nkey seed ({type(exc).__name__})") from None
    try:
        public = keypair.public_key.decode()
    finally:
        keypair.wipe()
    if not public.startswith("U"):
        raise CredentialsError("not an nkey *user* seed (expected one starting with SU)")
    return public


@dataclass(frozen=True)
class Credentials:
    """The seed files of a set of identities, all in ``directory``."""

    directory: Path
    identities: tuple[str, ...] = IDENTITIES

    def seed_file(self, identity: str) -> Path:
        if identity not in self.identities:
            raise KeyError(f"no credentials for {identity!r} in {self.directory}")
        return self.directory / f"{identity}{SEED_SUFFIX}"

    def public_key(self, identity: str) -> str:
        path = self.seed_file(identity)
        try:
            seed = path.read_bytes()
        except OSError as exc:
            raise CredentialsError(f"cannot read seed {path}: {exc.strerror}") from None
        try:
            return public_key_of(seed)
        except CredentialsError as exc:
            raise CredentialsError(f"{path}: {exc}") from None

    def public_keys(self) -> dict[str, str]:
        return {identity: self.public_key(identity) for identity in self.identities}

    def authorization(self) -> str:
        """The nats-server ``authorization { users = [...] }`` block for these keys."""
        return render_authorization(self.public_keys())


def ensure_credentials(directory: Path, identities: Iterable[str] = IDENTITIES) -> Credentials:
    """Seeds for ``identities`` in ``directory``: existing ones are reused (and checked),
    missing ones are created with mode 0600 (the directory with 0700)."""
    names = tuple(identities)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    creds = Credentials(directory, names)
    for identity in names:
        path = creds.seed_file(identity)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            # keep the key (restart), but never leave it readable by others
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                os.chmod(path, 0o600)
            creds.public_key(identity)  # refuses a file that is not a user seed
            continue
        try:
            os.write(fd, new_seed() + b"\n")
        finally:
            os.close(fd)
    return creds


# ----------------------------------------------------------------------------- rendering


def _list(items: Iterable[str], indent: str) -> str:
    # JSON strings are valid NATS config strings; quoting keeps `$JS...` from being read
    # as a variable reference.
    return "[\n" + "".join(f"{indent}  {json.dumps(i)},\n" for i in items) + f"{indent}]"


def render_authorization(public_keys: Mapping[str, str]) -> str:
    """``authorization { users = [...] }`` with each identity's nkey and permissions.
    Connections without one of these keys are refused."""
    users = []
    for identity, key in public_keys.items():
        perms = permissions(identity)
        pad = "      "
        users.append(
            f"    # {identity}\n"
            f"    {{\n"
            f"      nkey: {json.dumps(key)}\n"
            f"      permissions: {{\n"
            f"        publish: {{ allow: {_list(perms.publish, pad + '  ')} }}\n"
            f"        subscribe: {{ allow: {_list(perms.subscribe, pad + '  ')} }}\n"
            f"      }}\n"
            f"    }}\n"
        )
    return (
        "# Generated by loom_infra.credentials from loom_core/routes.py: do not edit.\n"
        "authorization {\n  users = [\n" + "".join(users) + "  ]\n}\n"
    )


# ----------------------------------------------------------------------------- the matrix


def sample_subject(route: Route, identity: str | None = None) -> str:
    """A concrete subject of ``route`` (for the matrix and the permission tests): an
    own-parameter (``{service}``, ``{via}``) is filled with ``identity``."""
    values = {p: f"x{p}" for p in route.params}
    values.update(run_id="R1", name="n", key="k", tool="echo")
    if "event" in route.params:
        values["event"] = routes.tag_of(route.messages[0])
    for param in ("service", "via"):
        if param in route.params:
            values[param] = identity or route.publishers[0]
    return route.subject(**{p: values[p] for p in route.params})


def _cell(route: Route, identity: str) -> str:
    perms = permissions(identity)
    parts = []
    own = route.own_param is not None
    if any(perms.may_publish(s) for s in route.publisher_subjects(identity)):  # type: ignore[arg-type]  # identity: a str naming an Identity
        parts.append("pub (own)" if own else "pub")
    for consumer in route.consumers:
        if consumer.identity != identity:
            continue
        filters = route.filters(consumer)
        if not all(perms.may_subscribe(f, consumer.queue) for f in filters):
            continue
        how = "sub"
        if consumer.queue:
            how += f" [queue {consumer.queue}]"
        if consumer.durable:
            how += f" [durable {consumer.durable}]"
        if consumer.events:
            how += ": " + ", ".join(routes.tag_of(e) for e in consumer.events)
        parts.append(how)
    return "; ".join(parts) or "—"


def permission_matrix() -> str:
    """Markdown: route × identity → what the generated permissions allow."""
    ids = routes.IDENTITIES
    lines = [
        "| route | subject | " + " | ".join(ids) + " |",
        "|---|---|" + "---|" * len(ids),
    ]
    for route in ROUTES:
        cells = [_cell(route, identity) for identity in ids]
        lines.append(f"| {route.name} | `{route.pattern}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def jetstream_rights() -> str:
    """Markdown: each identity's JetStream API and ack rights (beyond route subjects)."""
    lines = ["| identity | JetStream rights |", "|---|---|"]
    for identity in IDENTITIES:
        js = [s for s in permissions(identity).publish if s.startswith("$JS")]
        lines.append(f"| {identity} | " + "<br>".join(f"`{s}`" for s in js) + " |")
    return "\n".join(lines) + "\n"
