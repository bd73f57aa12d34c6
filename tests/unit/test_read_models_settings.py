"""``LOOM_READ_MODELS`` and the environment the embedded stack gives a read-model child
(``settings.service_process_env``): what the child reads back is what the stack runs
with, for everything a read model and the service runtime use."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from loom_core.contracts import SizeLimits
from loom_core.spans import TraceOptions
from loom_infra.settings import (
    BlobSettings,
    DeliverySettings,
    EmbedderSettings,
    OpsSettings,
    PartitionSettings,
    Settings,
    SettingsError,
    StoreSettings,
    read_models_from_env,
    read_models_nice_from_env,
    service_process_env,
    settings_from_env,
)


def test_the_default_is_process_and_a_bad_value_names_the_setting() -> None:
    assert read_models_from_env({}) == "process"
    assert read_models_from_env({"LOOM_READ_MODELS": " Inline "}) == "inline"
    assert settings_from_env({"LOOM_READ_MODELS": "inline"}).read_models == "inline"
    for bad in ("threads", "processes", "0"):
        with pytest.raises(SettingsError) as raised:
            settings_from_env({"LOOM_READ_MODELS": bad})
        assert raised.value.variable == "LOOM_READ_MODELS"
        assert "'process'" in str(raised.value) and repr(bad) in str(raised.value)
    with pytest.raises(SettingsError, match="LOOM_READ_MODELS"):
        Settings(nats_url="nats://x:1", store=StoreSettings("sqlite", Path("d")),
                 read_models="both")  # type: ignore[arg-type]  # fmt: skip


def test_the_read_models_run_at_nice_10_unless_told_and_a_bad_value_names_the_setting() -> None:
    assert read_models_nice_from_env({}) == 10
    assert read_models_nice_from_env({"LOOM_READ_MODELS_NICE": " "}) == 10  # blank: default
    assert read_models_nice_from_env({"LOOM_READ_MODELS_NICE": "0"}) == 0
    assert settings_from_env({"LOOM_READ_MODELS_NICE": " 19 "}).read_models_nice == 19
    for bad in ("-1", "20", "-20", "ten", "1.5", "0x5", "1e1"):
        with pytest.raises(SettingsError) as raised:
            settings_from_env({"LOOM_READ_MODELS_NICE": bad})
        assert raised.value.variable == "LOOM_READ_MODELS_NICE"
        assert "0" in str(raised.value) and "19" in str(raised.value), str(raised.value)
    for value in (-5, 42, True, 2.0, "3"):
        with pytest.raises(SettingsError, match="LOOM_READ_MODELS_NICE"):
            Settings(nats_url="nats://x:1", store=StoreSettings("sqlite", Path("d")),
                     read_models_nice=value)  # type: ignore[arg-type]  # fmt: skip


def made_in_code(tmp_path: Path) -> Settings:
    """Settings a test or ``loom up`` made in code, every read-model field off its default."""
    return Settings(
        nats_url="nats://127.0.0.1:43210",
        store=StoreSettings(
            kind="postgres", data_dir=tmp_path / "data",
            postgres_url="postgresql://loom:s3cret@db:5433/loom", snapshots_kept=3,
        ),
        max_payload=128 * 1024,
        creds_dir=tmp_path / "keys",
        size_limits=SizeLimits(step_input_bytes=40_000, step_output_bytes=50_000),
        ops=OpsSettings(
            http_port=8080, http_host="0.0.0.0", ready_max_relay_lag=7, ready_stall_s=12.5,
            runs_max_age_days=3.0, stream_max_bytes=2 * 1024**3, rejects_max_msgs=9,
            rejects_queue=11, stream_replicas=3, partitions=4, runs_persist="default",
        ),
        delivery=DeliverySettings(
            ack_wait_s=0.25, held_ack_wait_s=2.0, tool_ack_wait_s=0.5, tool_concurrency=3,
            relay_batch=17, local_tools=(), local_budget=5, consumer_create_s=7.0,
            log_level="WARNING",
        ),
        partitions=PartitionSettings(count=4, lease_s=2.0, replica="r-1"),
        blobs=BlobSettings(threshold_bytes=20_000, max_resolved_bytes=1_000_000,
                           max_blob_bytes=2_000_000, bucket_max_bytes=3_000_000,
                           max_age_s=2 * 86_400.0),
        trace=TraceOptions(capture_io=True, io_limit=99),
        embedder=EmbedderSettings(spec="hash:64", model_dir=tmp_path / "model", threads=2),
        qdrant="http://qdrant:6333",
        read_models="process",
        read_models_nice=3,
    )  # fmt: skip


def test_a_child_reads_back_the_settings_its_stack_runs_with(tmp_path: Path) -> None:
    settings = made_in_code(tmp_path)
    seed = tmp_path / "keys" / "tracing.nk"
    parent_env = {"LOOM_LOCAL_TOOLS": "noop", "PATH": "/bin", "LOOM_SECRET_API": "x",
                  "LOOM_SECRETS_DIR": "/run/secrets", "OTEL_SERVICE_NAME": "loom"}  # fmt: skip
    env = service_process_env(settings, seed, parent_env)
    child = settings_from_env(env)

    same = ("nats_url", "store", "max_payload", "size_limits", "delivery", "partitions",
            "blobs", "trace", "embedder", "qdrant", "insecure", "read_models",
            "read_models_nice")  # fmt: skip
    for name in same:
        assert getattr(child, name) == getattr(settings, name), name
    # the stack's process owns the HTTP port: a child serves none
    assert child.ops == dataclasses.replace(settings.ops, http_port=0)
    assert child.nkey_seed_file == seed and child.credentials_dir == tmp_path / "keys"
    # the rest of the parent's environment is inherited, but not the tool-runner's secrets
    assert env["PATH"] == "/bin" and env["OTEL_SERVICE_NAME"] == "loom"
    assert not any(name.startswith("LOOM_SECRET") for name in env)


def test_unset_local_tools_and_no_credentials_stay_so(tmp_path: Path) -> None:
    settings = dataclasses.replace(
        made_in_code(tmp_path),
        delivery=DeliverySettings(local_tools=None),
        insecure=True,
        qdrant=None,
        embedder=EmbedderSettings(),
    )
    env = service_process_env(settings, None, {"LOOM_LOCAL_TOOLS": ""})
    child = settings_from_env(env)
    assert child.delivery.local_tools is None  # every pure built-in, not none
    assert child.insecure and child.nkey_seed_file is None and child.seed_file_for("x") is None
    assert child.qdrant is None and child.embedder == EmbedderSettings()
