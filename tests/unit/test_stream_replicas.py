"""LOOM_STREAM_REPLICAS: every stream is provisioned with it, replicated LOOM_RUNS is
fsynced (the server refuses async persistence there), and provisioning never lowers it.
The cluster itself is tests/integration/test_jetstream_cluster.py."""

from __future__ import annotations

import dataclasses

import pytest
from nats.js.api import PersistMode

from loom_core import subjects
from loom_infra import bus
from loom_infra.settings import OpsSettings, SettingsError, ops_settings_from_env


def test_replicas_are_read_from_the_environment() -> None:
    assert ops_settings_from_env({}).stream_replicas == 1
    assert ops_settings_from_env({"LOOM_STREAM_REPLICAS": "3"}).stream_replicas == 3


@pytest.mark.parametrize("raw", ["0", "6", "-1", "three", "2.5"])
def test_bad_replicas_name_the_setting(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        ops_settings_from_env({"LOOM_STREAM_REPLICAS": raw})
    assert caught.value.variable == "LOOM_STREAM_REPLICAS"
    assert raw in str(caught.value)


def test_every_stream_gets_the_replicas_and_replicated_runs_are_fsynced() -> None:
    for replicas in (1, 3, 5):
        configs = bus.stream_configs(OpsSettings(stream_replicas=replicas))
        assert {c.num_replicas for c in configs} == {replicas}
    (runs,) = [c for c in bus.stream_configs(OpsSettings(stream_replicas=3))
               if c.name == subjects.RUN_EVENTS_STREAM]  # fmt: skip
    assert runs.persist_mode == PersistMode.DEFAULT
    (single,) = [c for c in bus.stream_configs() if c.name == subjects.RUN_EVENTS_STREAM]
    assert single.persist_mode == PersistMode.ASYNC  # LOOM_RUNS_PERSIST decides at R1
    (fsynced,) = [c for c in bus.stream_configs(OpsSettings(runs_persist="default"))
                  if c.name == subjects.RUN_EVENTS_STREAM]  # fmt: skip
    assert fsynced.persist_mode == PersistMode.DEFAULT


@pytest.mark.parametrize("index", range(len(bus.STREAMS)))
def test_provisioning_raises_replicas_and_never_lowers_them(index: int) -> None:
    at_1 = bus.stream_configs(OpsSettings(stream_replicas=1))[index]
    at_3 = bus.stream_configs(OpsSettings(stream_replicas=3))[index]
    raised = bus.merge_stream(at_1, at_3)
    assert raised is not None and raised.num_replicas == 3
    # a process started without LOOM_STREAM_REPLICAS (or a restart) asks for 1: no change
    assert bus.merge_stream(at_3, at_1) is None
    kept = dataclasses.replace(at_3, description="sized by ops")
    assert bus.merge_stream(kept, at_1) is None
