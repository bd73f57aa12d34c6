"""Streams are bounded and provisioning never undoes what an operator set (issue 9), on
a real nats-server."""

from __future__ import annotations

import dataclasses

from nats.js.api import StreamConfig

from loom_core import subjects
from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import OpsSettings
from loom_services.runtime import provision


async def _configs(url: str) -> dict[str, StreamConfig]:
    nc = await bus.connect(url, "test-streams", persistent=False)
    try:
        js = nc.jetstream()
        return {c.name: (await js.stream_info(c.name)).config for c in bus.STREAMS}  # type: ignore[misc]
    finally:
        await nc.close()


async def test_every_stream_is_bounded_in_age_and_bytes(nats_server: EmbeddedNats) -> None:
    ops = OpsSettings(runs_max_age_days=3, stream_max_bytes=64 * 1024**2, rejects_max_msgs=50)
    await provision(nats_server.url, None, ops)
    configs = await _configs(nats_server.url)
    assert set(configs) == {s.name for s in bus.STREAMS}
    for name, config in configs.items():
        assert config.max_age and config.max_age > 0, name
        assert config.max_bytes and 0 < config.max_bytes <= 64 * 1024**2, name
    assert configs[subjects.RUN_EVENTS_STREAM].max_age == 3 * 24 * 3600
    assert configs[bus.REJECTS_STREAM].max_msgs == 50


async def test_reprovisioning_keeps_what_an_operator_set(nats_server: EmbeddedNats) -> None:
    await provision(nats_server.url, None, OpsSettings())
    nc = await bus.connect(nats_server.url, "operator-by-hand", persistent=False)
    try:
        js = nc.jetstream()
        runs = (await js.stream_info(subjects.RUN_EVENTS_STREAM)).config
        # what an operator does with `nats stream edit`: a tighter age, a count limit, a
        # note, a longer duplicate window (num_replicas must stay 1 on one server)
        await js.update_stream(
            dataclasses.replace(
                runs, description="ops: sized for the cluster", max_msgs=12_345,
                max_age=3600.0, duplicate_window=900.0,
            )
        )  # fmt: skip
        dlq = (await js.stream_info(subjects.DLQ_STREAM)).config
        await js.update_stream(dataclasses.replace(dlq, max_bytes=5 * 1024**2))
    finally:
        await nc.close()

    await provision(nats_server.url, None, OpsSettings())  # a restart, a new release
    configs = await _configs(nats_server.url)
    runs = configs[subjects.RUN_EVENTS_STREAM]
    assert runs.description == "ops: sized for the cluster"
    assert runs.max_msgs == 12_345
    assert runs.max_age == 3600.0  # an operator's limit is theirs, even a tighter one
    assert runs.duplicate_window == 900.0  # a floor is raised, never lowered
    assert runs.num_replicas == 1
    assert configs[subjects.DLQ_STREAM].max_bytes == 5 * 1024**2


async def test_an_old_unbounded_stream_gains_limits_and_keeps_its_fields(
    nats_server: EmbeddedNats,
) -> None:
    nc = await bus.connect(nats_server.url, "old-release", persistent=False)
    try:
        js = nc.jetstream()
        # as an older release made it: no limits; an operator added a description
        await js.add_stream(
            StreamConfig(
                name=subjects.DLQ_STREAM, subjects=[subjects.DLQ_ALL],
                description="kept", duplicate_window=60.0,
            )
        )  # fmt: skip
    finally:
        await nc.close()
    await provision(nats_server.url, None, OpsSettings(stream_max_bytes=32 * 1024**2))
    dlq = (await _configs(nats_server.url))[subjects.DLQ_STREAM]
    assert dlq.description == "kept"
    assert dlq.max_age == 30 * 24 * 3600.0 and dlq.max_bytes == 32 * 1024**2


def test_merge_never_lowers_replicas_and_adds_missing_subjects() -> None:
    wanted = bus.stream_configs()[0]
    existing = dataclasses.replace(
        wanted, num_replicas=3, subjects=["other.>"], max_bytes=1, placement=None
    )
    merged = bus.merge_stream(existing, dataclasses.replace(wanted, num_replicas=1))
    assert merged is not None
    assert merged.num_replicas == 3 and merged.max_bytes == 1
    assert merged.subjects == ["other.>", subjects.RUN_EVENTS_ALL]
    assert bus.merge_stream(merged, wanted) is None  # nothing left to change: no update
