"""Limits on reasons, resume data and signal payloads (``loom_core.message_limits``) and
their settings: pure checks, no servers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom_core.message_limits import (
    DEFAULT_MESSAGE_LIMITS,
    MessageLimits,
    check_resume_data,
    check_signal_payload,
    check_text,
)
from loom_infra.settings import SettingsError, settings_from_env

SMALL = MessageLimits(reason_bytes=10, resume_data_bytes=20, signal_payload_bytes=30, max_depth=3)


def test_text_is_measured_in_utf8_bytes() -> None:
    assert check_text("x" * 10, SMALL, "$.reason") is None
    assert check_text(None, SMALL, "$.label") is None
    error = check_text("é" * 6, SMALL, "$.by")  # 12 bytes
    assert error is not None and error.code == "reason_too_large" and error.path == "$.by"
    assert error.details == {"size": 12, "limit": 10, "setting": "LOOM_MAX_REASON_BYTES"}
    assert "LOOM_MAX_REASON_BYTES" in error.message


def test_json_is_measured_compact_and_depth_comes_first() -> None:
    assert check_resume_data({"a": "x" * 12}, SMALL) is None  # {"a":"xxxxxxxxxxxx"} = 20
    error = check_resume_data({"a": "x" * 13}, SMALL)
    assert error is not None and (error.code, error.path) == ("data_too_large", "$.data")
    assert error.details["setting"] == "LOOM_MAX_RESUME_DATA_BYTES"
    deep = check_signal_payload([[[["x"]]]], SMALL)
    assert deep is not None and deep.code == "too_deep" and deep.path.startswith("$.payload")
    big = check_signal_payload("y" * 40, SMALL)
    assert big is not None and big.code == "payload_too_large"
    assert big.details["setting"] == "LOOM_MAX_SIGNAL_PAYLOAD_BYTES"


def test_nesting_far_past_python_recursion_is_refused_without_recursing() -> None:
    value: object = 1
    for _ in range(50_000):
        value = {"k": value}
    error = check_resume_data(value, DEFAULT_MESSAGE_LIMITS)
    assert error is not None and error.code == "too_deep"


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=20))  # fmt: skip
def test_whatever_passes_fits_the_limit(value: object) -> None:
    import msgspec

    limits = MessageLimits(resume_data_bytes=64, signal_payload_bytes=64, max_depth=64)
    if check_resume_data(value, limits) is None:
        assert len(msgspec.json.encode(value)) <= 64


def test_settings_read_and_bounded() -> None:
    limits = settings_from_env({}).message_limits
    assert limits == DEFAULT_MESSAGE_LIMITS
    env = {
        "LOOM_MAX_REASON_BYTES": "1000",
        "LOOM_MAX_RESUME_DATA_BYTES": "2048",
        "LOOM_MAX_SIGNAL_PAYLOAD_BYTES": "4096",
        "LOOM_MAX_JSON_DEPTH": "10",
    }
    assert settings_from_env(env).message_limits == MessageLimits(1000, 2048, 4096, 10)
    for name, value in (("LOOM_MAX_REASON_BYTES", "12"), ("LOOM_MAX_RESUME_DATA_BYTES", "9e9"),
                        ("LOOM_MAX_SIGNAL_PAYLOAD_BYTES", str(10 * 1024**2))):  # fmt: skip
        with pytest.raises(SettingsError, match=name):
            settings_from_env({name: value})
