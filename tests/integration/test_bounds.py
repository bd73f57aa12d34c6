"""Issue 9 findings reproduced on a real stack: deep input is refused at submit (it used
to pass and strand the run in a recursive render), and a second embedded stack on one
data dir is refused (it used to share the SQLite files and the JetStream store)."""

from __future__ import annotations

import pytest

from loom_core.contracts import SubmitAccepted, SubmitRejected, SubmitReply
from loom_infra.client import LoomClient
from loom_infra.datalock import DataDirLocked
from loom_infra.settings import Settings, StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

PLAN = (
    b'{"plan": {"steps": [{"kind": "tool", "id": "a", "tool": "echo", "input": {"message": "x"}}]}'
)


async def _submit(client: LoomClient, body: bytes) -> SubmitReply:
    return await client.submit_raw(body)


@pytest.mark.parametrize("depth", [100, 5000])
async def test_deep_input_is_refused_at_submit_with_its_path(
    client: LoomClient, depth: int
) -> None:
    body = PLAN + b', "input": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
    reply = await _submit(client, body)
    assert isinstance(reply, SubmitRejected), reply
    assert reply.error.code == "too_deep"
    assert "LOOM_MAX_JSON_DEPTH" in reply.error.message
    if depth == 100:
        assert reply.error.path is not None and reply.error.path.startswith("$.input.x[0]")
    # and the stack goes on: a good submission right after is accepted and completes
    ok = await _submit(client, PLAN + b"}")
    assert isinstance(ok, SubmitAccepted)
    records = await client.wait(ok.run_id, timeout=20)
    assert records[-1].kind == "run_completed"


async def test_a_second_stack_on_the_same_data_dir_is_refused(
    sqlite_store_settings: StoreSettings,
) -> None:
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=sqlite_store_settings)
    async with LocalStack(settings, nats_port=-1):
        with pytest.raises(DataDirLocked) as refused:
            async with LocalStack(settings, nats_port=-1):
                pass
        assert refused.value.error.code == "data_dir_locked"
        assert str(sqlite_store_settings.data_dir) in refused.value.error.message
    # released on close: the data dir can be used again
    async with LocalStack(settings, nats_port=-1) as again:
        assert again.stack is not None
