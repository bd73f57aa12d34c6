"""The fake OpenAI server (``loom_infra.fakemodel``) through litellm and a real socket,
and the planner's model layer over it (``loom_services.models``): non-streaming and
streaming answers, tool calls, usage, embeddings, scripted 429/500/timeouts, the request
counter, and calls that do not wait on Nagle's algorithm."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from loom_core.contracts import ModelMessage, ToolSpec
from loom_infra.fakemodel import Fail, FakeModelServer, Hang, Reply, ToolCall
from loom_infra.secret_source import SecretSource
from loom_infra.settings import SecretSettings
from loom_services.models import ModelConfig, ModelLayer, ModelUnavailable

pytestmark = pytest.mark.integration


@pytest.fixture
def server() -> Iterator[FakeModelServer]:
    with FakeModelServer() as s:
        yield s


@pytest.fixture
def litellm() -> Any:
    return ModelLayer.load()


def layer(server: FakeModelServer, **extra: Any) -> ModelLayer:
    config = {
        "num_retries": 0,
        "timeout_s": 2,
        "models": {
            "main": {"model": "openai/m1", "api_base": server.base_url, "fallbacks": ["backup"],
                     "input_cost_per_token": 0.001, "output_cost_per_token": 0.002},
            "backup": {"model": "openai/m2", "api_base": server.base_url},
        },
        **extra,
    }  # fmt: skip
    return ModelLayer(ModelConfig.from_mapping(config))


USER = [ModelMessage(role="user", content="hi")]


async def test_answers_tool_calls_and_usage_through_litellm(
    server: FakeModelServer, litellm: Any
) -> None:
    server.script("m1", Reply(content="hello", input_tokens=7, output_tokens=3),
                  Reply(tool_calls=[ToolCall("echo", {"message": "x"}, id="t1")]))  # fmt: skip
    kwargs = {"api_base": server.base_url, "api_key": "k"}
    ask = [{"role": "user", "content": "q"}]
    first = await litellm.acompletion(model="openai/m1", messages=ask, **kwargs)
    assert first.choices[0].message.content == "hello"
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (7, 3)
    second = await litellm.acompletion(model="openai/m1", messages=ask, **kwargs)
    call = second.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == (
        "t1",
        "echo",
        '{"message": "x"}',
    )
    assert second.choices[0].finish_reason == "tool_calls"
    assert server.requests["m1"] == 2 == server.total
    assert server.bodies[0]["messages"] == [{"role": "user", "content": "q"}]


async def test_streaming_sends_the_same_answer_as_server_sent_events(
    server: FakeModelServer, litellm: Any
) -> None:
    server.script("m1", Reply(content="a streamed answer, in pieces"))
    stream = await litellm.acompletion(
        model="openai/m1", messages=[{"role": "user", "content": "q"}], stream=True,
        stream_options={"include_usage": True}, api_base=server.base_url, api_key="k",
    )  # fmt: skip
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = getattr(chunk, "usage", None) or usage
    assert "".join(pieces) == "a streamed answer, in pieces" and len(pieces) > 1
    assert usage is not None and usage.completion_tokens == 5


async def test_embeddings_are_deterministic(server: FakeModelServer, litellm: Any) -> None:
    kwargs = {"model": "openai/emb", "api_base": server.base_url, "api_key": "k"}
    one = await litellm.aembedding(input=["a text", "another"], **kwargs)
    two = await litellm.aembedding(input=["a text"], **kwargs)
    assert one.data[0]["embedding"] == two.data[0]["embedding"]
    assert one.data[0]["embedding"] != one.data[1]["embedding"]
    assert server.requests["embed:emb"] == 2


async def test_a_429_falls_back_and_every_attempt_is_recorded(server: FakeModelServer) -> None:
    server.script("m1", Fail(429, "slow down"))
    server.script("m2", Reply(content="from the backup"))
    answer = await layer(server).complete(None, USER)
    assert answer.message is not None and answer.message.content == "from the backup"
    assert answer.model == "backup"
    tried = [(a.model, a.fallback, a.error.code if a.error else None) for a in answer.attempts]
    assert tried == [("main", False, "rate_limited"), ("backup", True, None)]


async def test_prices_for_self_hosted_models_give_a_cost(server: FakeModelServer) -> None:
    server.script("m1", Reply(content="x", input_tokens=100, output_tokens=10))
    answer = await layer(server).complete("main", USER)
    assert answer.usage.cost_usd == pytest.approx(100 * 0.001 + 10 * 0.002)


async def test_500s_everywhere_and_a_hang_are_typed_errors(server: FakeModelServer) -> None:
    server.script("m1", Fail(500, "boom"))
    server.script("m2", Fail(500, "boom too"))
    down = await layer(server).complete(None, USER)
    assert down.message is None and down.error is not None
    assert down.error.code == "model_unavailable" and len(down.attempts) == 2
    server.script("m1", Hang(5))
    server.script("m2", Hang(5))
    started = time.perf_counter()
    slow = await layer(server, timeout_s=0.3).complete(None, USER)
    assert slow.error is not None and slow.error.code == "model_timeout"
    assert time.perf_counter() - started < 4


async def test_tools_and_json_mode_reach_the_server(server: FakeModelServer) -> None:
    server.script("m1", Reply(content="{}"))
    schema = {"type": "object", "properties": {"message": {"type": "string"}}}
    spec = ToolSpec(name="echo", description="Echo.", output_schema={}, input_schema=schema)
    await layer(server).complete("main", USER, [spec], json_mode=True)
    body = server.bodies[-1]
    assert body["tools"][0]["function"]["name"] == "echo"
    assert body["tools"][0]["function"]["parameters"]["properties"]["message"]
    assert body["response_format"] == {"type": "json_object"}


async def test_a_call_takes_milliseconds_not_nagles_40(server: FakeModelServer) -> None:
    server.default = Reply(content="ok")
    model = layer(server)
    await model.complete("main", USER)  # the first call builds clients
    took = []
    for _ in range(10):
        started = time.perf_counter()
        await model.complete("main", USER)
        took.append(time.perf_counter() - started)
    assert statistics.median(took) < 0.035


async def test_keys_come_from_the_secret_source_and_never_into_the_answer(
    server: FakeModelServer,
) -> None:
    config = ModelConfig.from_mapping({"models": {"main": {
        "model": "openai/m1", "api_base": server.base_url, "api_key_secret": "OPENAI",
    }}})  # fmt: skip
    server.script("m1", Fail(401, "bad key"))
    secrets = SecretSource(SecretSettings(env={"OPENAI": "sk-canary-7f3e"}))
    answer = await ModelLayer(config, secrets).complete(None, USER)
    assert server.keys == ["sk-canary-7f3e"]
    assert answer.error is not None and answer.error.code == "model_auth_failed"
    assert "sk-canary-7f3e" not in msgspec.json.encode(answer.attempts).decode()
    missing = await ModelLayer(config, SecretSource(SecretSettings())).complete(None, USER)
    assert missing.error is not None and missing.error.code == "no_model_configured"
    assert "LOOM_SECRET_OPENAI" in missing.error.message
    assert server.total == 1


def test_configuration_errors_say_what_to_set() -> None:
    with pytest.raises(ModelUnavailable, match="LOOM_MODEL"):
        ModelConfig().resolve(None)
    with pytest.raises(ModelUnavailable, match="configured models"):
        ModelConfig.from_mapping({"models": {"a": {"model": "openai/x"}}}).resolve("b")
    for bad, says in [
        ({"models": {"a": {"model": "openai/x", "api_key": "sk-1"}}}, "api_key_secret"),
        ({"models": {"a": {"model": "openai/x", "fallbacks": ["z"]}}}, "no model named 'z'"),
        ({"models": {"a": {"modle": "openai/x"}}}, "give `model:`"),
        ({"models": {"a": {"model": "openai/x", "colour": 1}}}, "unknown keys"),
        ([], "expected a mapping"),
    ]:
        with pytest.raises(ValueError, match=says):
            ModelConfig.from_mapping(bad)
