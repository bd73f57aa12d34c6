"""Delivery settings (ack waits, concurrency, local calls, consumer creation, log
level) are read in one place, loom_infra.settings, with typed errors naming the
variable; the services take them from there."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom_infra.settings import (
    DeliverySettings,
    SettingsError,
    delivery_settings_from_env,
    settings_from_env,
)
from loom_services.local_tools import PURE_BUILTINS, LocalTools
from loom_services.relay import RelayService


def test_defaults_and_overrides() -> None:
    assert delivery_settings_from_env({}) == DeliverySettings()
    custom = delivery_settings_from_env({
        "LOOM_ACK_WAIT_S": "0.15", "LOOM_TOOL_ACK_WAIT_S": "0.15", "LOOM_HELD_ACK_WAIT_S": "2",
        "LOOM_TOOL_CONCURRENCY": "8", "LOOM_RELAY_BATCH": "20", "LOOM_LOCAL_TOOLS": "noop, echo",
        "LOOM_LOCAL_BUDGET": "4", "LOOM_CONSUMER_CREATE_S": "5", "LOOM_LOG_LEVEL": "debug",
    })  # fmt: skip
    assert custom == DeliverySettings(
        ack_wait_s=0.15, held_ack_wait_s=2.0, tool_ack_wait_s=0.15, tool_concurrency=8,
        relay_batch=20, local_tools=("noop", "echo"), local_budget=4, consumer_create_s=5.0,
        log_level="DEBUG",
    )  # fmt: skip
    # set but empty: no local tools (unset: every pure built-in)
    assert delivery_settings_from_env({"LOOM_LOCAL_TOOLS": ""}).local_tools == ()
    assert settings_from_env({"LOOM_RELAY_BATCH": "7"}).delivery.relay_batch == 7


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("LOOM_ACK_WAIT_S", "soon", "seconds"),
        ("LOOM_ACK_WAIT_S", "0", "0.01-3600"),
        ("LOOM_TOOL_ACK_WAIT_S", "-1", "0.01-3600"),
        ("LOOM_TOOL_CONCURRENCY", "0", ">= 1"),
        ("LOOM_RELAY_BATCH", "many", "whole number"),
        ("LOOM_CONSUMER_CREATE_S", "0", "0.01-3600"),
        ("LOOM_LOCAL_BUDGET", "-1", "0-10000"),
    ],
)
def test_a_bad_value_is_a_typed_error_naming_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as raised:
        delivery_settings_from_env({name: value})
    assert name in str(raised.value) and says in str(raised.value)


def test_services_take_them_from_the_settings(tmp_path: Path) -> None:
    limits = settings_from_env({}).size_limits
    local = LocalTools.from_settings(limits, delivery_settings_from_env({}))
    assert local.names == frozenset(PURE_BUILTINS)
    budget = delivery_settings_from_env({"LOOM_LOCAL_BUDGET": "3"})
    assert LocalTools.from_settings(limits, budget).budget == 3
    settings = settings_from_env({"LOOM_RELAY_BATCH": "9", "LOOM_DATA_DIR": str(tmp_path)})
    relay = RelayService(settings)
    try:
        assert relay.batch == 9
    finally:
        relay.store.close()
