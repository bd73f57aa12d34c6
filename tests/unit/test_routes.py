"""The route registry is the one declaration of the edge: these check it is complete and
consistent with the contracts (the live check that services subscribe only to what is
declared is tests/integration/test_routes_live.py)."""

from __future__ import annotations

import typing

import pytest

from loom_core import contracts, routes, subjects
from loom_infra import proto_gen


def test_route_names_are_unique_and_match_asyncapi_channels() -> None:
    names = [r.name for r in routes.ROUTES]
    assert len(names) == len(set(names))
    channels = proto_gen.asyncapi()["channels"]
    expected = set(names) | {f"{r.name}Reply" for r in routes.ROUTES if r.replies}
    assert set(channels) == expected


def test_every_inbox_message_has_exactly_one_inbox_route() -> None:
    members = typing.get_args(contracts.InboxMessage)
    assert set(routes.INBOX_ROUTE_OF) == set(members)
    for route in routes.INBOXES:
        assert route.pattern.startswith(f"{subjects.PREFIX}.inbox.{{run_id}}.")
        assert route.pattern.rsplit(".", 1)[1] in subjects.INBOX_SOURCES
        assert len(route.publishers) == 1, "one owner per kind of fact"


def test_inbox_subject_is_the_runs_own_and_the_sources() -> None:
    result = contracts.PlanRefused(run_id="r-1", issues=[])
    assert routes.inbox_subject(result) == "loom.inbox.r-1.plan"
    assert routes.inbox_source("loom.inbox.r-1.plan") == ("r-1", "plan")
    assert routes.inbox_source("loom.inbox.r-1") is None
    assert routes.inbox_source("loom.run.r-1.plan") is None


def test_run_events_are_published_only_by_the_executor_and_filters_name_real_events() -> None:
    assert routes.RUN_EVENTS.publishers == ("executor",)
    tags = set(proto_gen.event_tags())
    for consumer in routes.RUN_EVENTS.consumers:
        for event in consumer.events:
            assert routes.tag_of(event) in tags
    assert routes.RUN_EVENTS.filters(routes.RUN_EVENTS.consumer("planner")) == [
        "loom.run.*.run_requested"
    ]


def test_request_routes_have_an_error_reply_and_a_queue_group() -> None:
    for route in routes.ROUTES:
        if route.kind != "request":
            continue
        assert route.replies, route.name
        assert any("error" in r.__struct_fields__ for r in route.replies), route.name
        for consumer in route.consumers:
            assert consumer.queue, f"{route.name}: replicas must share the work"


def test_dead_letters_each_service_writes_only_its_own_subject() -> None:
    for service in routes.SERVICES:
        assert routes.DEAD_LETTER.publisher_subjects(service) == [f"loom.dlq.{service}"]
    assert routes.DEAD_LETTER.publisher_subjects("client") == []


def test_health_is_served_on_each_services_own_subject() -> None:
    assert routes.declared_subscriptions("memory") >= {("loom.health.memory", "memory")}
    assert not any("health.executor" in s for s, _ in routes.declared_subscriptions("memory"))


def test_a_durable_belongs_to_one_identity() -> None:
    durables = routes.declared_durables()
    # the inbox: one durable per partition, filtered as the stream stores the subjects
    assert durables[(subjects.INBOX_STREAM, "executor-p3")] == (
        "executor",
        {r.wildcard.replace("loom.inbox.", "loom.inbox.3.") for r in routes.INBOXES},
    )
    assert (subjects.INBOX_STREAM, "executor-p8") not in durables  # default: 8 partitions
    assert (subjects.INBOX_STREAM, "executor-p{partition}") in routes.declared_durables(None)
    assert durables[(subjects.RUN_EVENTS_STREAM, "tracing-fold")] == ("tracing", {"loom.run.*.*"})
    # the durable it took over from (another ack policy) is no consumer any more
    assert (subjects.RUN_EVENTS_STREAM, "tracing") not in durables
    assert routes.replaced_durables() == {(subjects.RUN_EVENTS_STREAM, "tracing"): "tracing"}


def test_a_subject_needs_all_its_parameters() -> None:
    with pytest.raises(KeyError, match="run_id"):
        routes.INBOX_TOOL.subject()
