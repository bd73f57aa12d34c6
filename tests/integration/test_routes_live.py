"""Drift check on a running stack: every subscription and every durable consumer that
the five services actually create is declared in ``loom_core.routes``, and everything
declared there exists. A service that starts listening to a subject nobody declared
fails here (and, with credentials on, is refused by the server too)."""

from __future__ import annotations

from typing import Any

import pytest
import waiting  # type: ignore[import-not-found]  # tests/integration on sys.path

from loom_core import codec, routes
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration


def _plain_subscriptions(nc: Any) -> set[tuple[str, str]]:
    # Replies, JetStream acks and pull fetches all use the connection's _INBOX.
    return {
        (sub.subject, sub._queue or "")
        for sub in nc._subs.values()
        if not sub.subject.startswith("_INBOX.")
    }


async def _durables(js: Any) -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for stream in {r.stream for r in routes.ROUTES if r.stream and r.kind == "stream"}:
        for info in await js.consumers_info(stream):
            config = info.config
            filters = set(config.filter_subjects or []) | (
                {config.filter_subject} if config.filter_subject else set()
            )
            found[(stream, config.durable_name)] = filters
    return found


def undeclared(
    actual: dict[str, set[tuple[str, str]]], durables: dict[tuple[str, str], set[str]]
) -> list[str]:
    """Every difference between what runs and what the registry declares, in words."""
    problems = []
    for identity, subs in actual.items():
        declared = routes.declared_subscriptions(identity)  # type: ignore[arg-type]
        problems += [f"{identity} subscribes to undeclared {s}" for s in sorted(subs - declared)]
        problems += [f"{identity} never subscribes to declared {s}" for s in declared - subs]
    declared_durables = {k: v[1] for k, v in routes.declared_durables().items()}
    for key in sorted(set(durables) | set(declared_durables)):
        if key not in declared_durables:
            problems.append(f"durable {key} with {sorted(durables[key])} is not declared")
        elif key not in durables:
            problems.append(f"declared durable {key} was never created")
        elif durables[key] != declared_durables[key]:
            problems.append(
                f"durable {key} filters {sorted(durables[key])}, "
                f"declared {sorted(declared_durables[key])}"
            )
    return problems


async def _observe(stack: LocalStack) -> tuple[dict[str, set[tuple[str, str]]], Any]:
    """What runs, once every consumer task has created its consumer (bounded wait: the
    services create durables in their own tasks right after start)."""
    assert stack.stack is not None
    async with await stack.client("admin") as admin:  # listing consumers: admin's right
        js = admin.js
        expected = set(routes.declared_durables())

        async def all_created() -> Any:
            durables = await _durables(js)
            return durables if expected <= set(durables) else None

        durables = await waiting.eventually(all_created, "every declared durable", 15, 0.05)
    actual = {
        service.name: _plain_subscriptions(ctx.nc)
        for service, ctx in zip(stack.stack.services, stack.stack.contexts, strict=True)
    }
    return actual, durables


async def test_every_live_subscription_and_consumer_is_declared(stack: LocalStack) -> None:
    actual, durables = await _observe(stack)
    assert set(actual) == set(routes.SERVICES)
    assert undeclared(actual, durables) == []


async def test_an_undeclared_subscription_is_reported(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    actual, durables = await _observe(stack)
    actual["planner"].add(("loom.secret.plans", ""))
    durables[("LOOM_RUNS", "rogue")] = {"loom.run.>"}
    # and a declaration the code no longer honours
    monkeypatch.setattr(
        routes,
        "ROUTES",
        (*routes.ROUTES, routes.Route(
            name="ghost", pattern="loom.ghost", kind="request", messages=routes.SUBMIT.messages,
            replies=routes.SUBMIT.replies, publishers=("operator",),
            consumers=(routes.Consumer("memory", queue="memory"),), description="",
        )),
    )  # fmt: skip
    problems = undeclared(actual, durables)
    assert "planner subscribes to undeclared ('loom.secret.plans', '')" in problems
    assert any("('LOOM_RUNS', 'rogue')" in p and "not declared" in p for p in problems)
    assert "memory never subscribes to declared ('loom.ghost', 'memory')" in problems


async def test_every_request_route_answers_bad_input_with_a_typed_error(
    client: Any, stack: LocalStack
) -> None:
    """One reply style: whatever arrives, the asker gets the route's reply with a typed
    error naming what is wrong (never silence, never an empty reply)."""
    # a route the operator may not publish on is asked by one of its own publishers
    askers = {"operator": client}
    for route in (r for r in routes.ROUTES if r.kind == "request"):
        who = "operator" if "operator" in route.publishers else route.publishers[0]
        if who not in askers:
            askers[who] = await stack.client(who)
        asker = askers[who]
        # {via}: the asker's own identity (operator), the only one it may publish on
        subject = route.subject(**{p: "operator" if p == "via" else "memory" for p in route.params})
        for payload in (b"not json", b'{"type": "ping", "surprise": 1}', b"[]"):
            msg = await asker.nc.request(subject, payload, timeout=5)
            reply = codec.decode(msg.data, _reply_type(route))
            error = getattr(reply, "error", None)
            assert error is not None, f"{route.name} answered {payload!r} with {reply!r}"
            assert error.code in ("malformed_json", "invalid_shape"), (route.name, error)
            assert error.message
    for who, asker in askers.items():
        if who != "operator":
            await asker.close()


def _reply_type(route: routes.Route) -> Any:
    return route.replies[0] if len(route.replies) == 1 else route.replies[0] | route.replies[1]
