"""The model layer of the planner service: every model call of the system goes here,
through litellm (docs/design.md decision 8), and nowhere else.

litellm is imported lazily, on the first call (it costs ~3 s and ~350 MB): a stack
without a model configured never imports it, and ``LITELLM_LOCAL_MODEL_COST_MAP`` is set
before the import so it never fetches a price map over the network.

Configuration (``ModelConfig``): either ``LOOM_MODELS_FILE``, a YAML file::

    default: main                 # the model agent steps and planning use by default
    planner: main                 # the model that plans natural-language requests
    timeout_s: 60                 # per attempt
    stream: true                  # agent turns' text live on loom.stream.{run_id}
    num_retries: 2                # the Router's retries per model before a fallback
    models:
      main:
        model: openai/gpt-4o-mini # a litellm model name
        api_key_secret: OPENAI    # resolved from the secret source (LOOM_SECRET_OPENAI)
        fallbacks: [backup]
      backup:
        model: openai/llama-3     # a self-hosted OpenAI-compatible server
        api_base: http://llm.internal:8000/v1
        input_cost_per_token: 0.0000002   # prices litellm does not know
        output_cost_per_token: 0.0000006

or ``LOOM_MODEL`` alone: one model named ``default`` (litellm reads the provider's key
from its usual variable, e.g. ``OPENAI_API_KEY``). Keys never enter an event: the
attempts recorded name the model, provider, latency, tokens, cost and error only.

One litellm Router does the retries and fallbacks; a callback records each HTTP attempt
it makes (correlated by a per-call id in the request's metadata), so a fallback after a
429 leaves both attempts in the run's history.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loom_core.contracts import (
    ErrorInfo,
    ModelAttempt,
    ModelMessage,
    ModelToolCall,
    ModelUsage,
    ToolSpec,
)
from loom_core.errors import LoomError
from loom_infra.secret_source import SecretSource
from loom_infra.settings import Settings, SettingsError

log = logging.getLogger("loom.models")

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 2
MAX_ANSWER_CHARS = 1_000_000  # an answer longer than this is refused before decoding


class ModelUnavailable(LoomError):
    """No model is configured (or the named one is not): the message says what to set."""

    code = "model_unavailable"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model: str  # litellm model name, e.g. openai/gpt-4o-mini
    api_base: str | None = None
    api_key_secret: str | None = None
    fallbacks: tuple[str, ...] = ()
    timeout_s: float | None = None
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else "openai"


@dataclass(frozen=True)
class ModelConfig:
    models: Mapping[str, ModelEntry] = field(default_factory=dict)
    default: str | None = None
    planner: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    num_retries: int = DEFAULT_RETRIES
    stream: bool = False  # stream agent turns' text to loom.stream.{run_id}

    @property
    def configured(self) -> bool:
        return bool(self.models)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelConfig:
        if settings.models_file is not None:
            return cls.from_file(settings.models_file)
        if settings.model:
            entry = ModelEntry(name="default", model=settings.model)
            return cls(models={"default": entry}, default="default", planner="default")
        return cls()

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError("LOOM_MODELS_FILE", f"cannot read {path}: {exc}") from None
        return cls.from_mapping(raw, str(path))

    @classmethod
    def from_mapping(cls, raw: Any, where: str = "models") -> ModelConfig:
        def bad(message: str) -> SettingsError:
            return SettingsError("LOOM_MODELS_FILE", f"{where}: {message}")

        if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
            raise bad("expected a mapping with `models:` (name -> {model: provider/name})")
        known = {"model", "api_base", "api_key_secret", "fallbacks", "timeout_s",
                 "input_cost_per_token", "output_cost_per_token"}  # fmt: skip
        models: dict[str, ModelEntry] = {}
        for name, spec in raw["models"].items():
            if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
                raise bad(f"models.{name}: give `model:` (a litellm name, e.g. openai/gpt-4o)")
            unknown = set(spec) - known
            if unknown:
                raise bad(f"models.{name}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
            if "api_key" in spec:
                raise bad(
                    f"models.{name}: put keys in the secret source, name it in api_key_secret"
                )
            models[str(name)] = ModelEntry(
                name=str(name),
                model=spec["model"],
                api_base=spec.get("api_base"),
                api_key_secret=spec.get("api_key_secret"),
                fallbacks=tuple(spec.get("fallbacks") or ()),
                timeout_s=spec.get("timeout_s"),
                input_cost_per_token=spec.get("input_cost_per_token"),
                output_cost_per_token=spec.get("output_cost_per_token"),
            )
        for entry in models.values():
            for fb in entry.fallbacks:
                if fb not in models:
                    raise bad(f"models.{entry.name}.fallbacks: no model named {fb!r}")
        default = raw.get("default") or next(iter(models), None)
        planner = raw.get("planner") or default
        for key, value in (("default", default), ("planner", planner)):
            if value is not None and value not in models:
                raise bad(f"{key}: no model named {value!r}; models: {sorted(models)}")
        return cls(
            models=models,
            default=default,
            planner=planner,
            timeout_s=float(raw.get("timeout_s", DEFAULT_TIMEOUT_S)),
            num_retries=int(raw.get("num_retries", DEFAULT_RETRIES)),
            stream=bool(raw.get("stream", False)),
        )

    def resolve(self, name: str | None) -> str:
        """The configured name a request for ``name`` (None: the default) goes to."""
        if not self.models:
            raise ModelUnavailable(
                "no model is configured: set LOOM_MODEL to a litellm model name (e.g. "
                "openai/gpt-4o-mini) and the provider's key (e.g. OPENAI_API_KEY), or "
                "LOOM_MODELS_FILE to a models file"
            )
        chosen = name or self.default
        if chosen is None or chosen not in self.models:
            raise ModelUnavailable(
                f"model {chosen!r} is not configured; configured models: {sorted(self.models)}"
            )
        return chosen


@dataclass
class Answer:
    """What one call returned: the assistant message, or an error; always the attempts."""

    message: ModelMessage | None
    finish_reason: str = ""
    model: str = ""
    provider: str = ""
    attempts: list[ModelAttempt] = field(default_factory=list)
    usage: ModelUsage = field(default_factory=ModelUsage)
    error: ErrorInfo | None = None


# Attempts of calls in flight, by call id. litellm keeps the callbacks it saw first in
# its own lists, so one recorder per process serves every ModelLayer (a test starts
# several stacks in one process).
_IN_FLIGHT: dict[str, tuple[ModelLayer, list[ModelAttempt]]] = {}
_RECORDER: list[Any] = []


def _install_recorder(litellm: Any) -> None:
    if _RECORDER:
        return
    from litellm.integrations.custom_logger import CustomLogger

    class Recorder(CustomLogger):
        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):  # noqa: ANN001
            _record(kwargs, response_obj, start_time, end_time, None)

        async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):  # noqa: ANN001
            _record(kwargs, None, start_time, end_time, kwargs.get("exception"))

    _RECORDER.append(Recorder())
    litellm.callbacks = [*getattr(litellm, "callbacks", []), _RECORDER[0]]


def _record(kwargs: dict[str, Any], response: Any, start: Any, end: Any,
            exc: BaseException | None) -> None:  # fmt: skip
    meta = (kwargs.get("litellm_params") or {}).get("metadata") or {}
    entry = _IN_FLIGHT.get(str(meta.get("loom_call")))
    if entry is None:
        return
    info = meta.get("model_info") or {}
    name = str(info.get("id") or meta.get("model_group") or kwargs.get("model") or "")
    usage = getattr(response, "usage", None) if response is not None else None
    try:
        latency = (end - start).total_seconds() * 1000
    except Exception:  # noqa: BLE001 (litellm passes datetimes or floats)
        latency = 0.0
    error = None
    if exc is not None:
        status = getattr(exc, "status_code", None)
        error = ErrorInfo(code=_error_code(exc), message=_short(str(exc)), retryable=True,
                          details={"status": status} if status else {})  # fmt: skip
    entry[1].append(ModelAttempt(
        model=name,
        provider=str(kwargs.get("custom_llm_provider") or ""),
        provider_model=str(kwargs.get("model") or ""),
        fallback=name != meta.get("loom_requested"),
        latency_ms=round(latency, 3),
        input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        cost_usd=float(kwargs.get("response_cost") or 0.0) if exc is None else 0.0,
        error=error,
    ))  # fmt: skip


class ModelLayer:
    """``await layer.complete(name, messages, tools)``: one model call with the Router's
    retries and fallbacks, every attempt recorded."""

    _ids = itertools.count(1)

    def __init__(self, config: ModelConfig, secrets: SecretSource | None = None) -> None:
        self.config = config
        self.secrets = secrets
        self._router: Any = None
        self._litellm: Any = None
        self.calls = 0

    # ------------------------------------------------------------------ setup

    @staticmethod
    def load() -> Any:
        """Import litellm (once per process; ~3 s). Safe to call from a thread, so a
        service can warm it up without blocking its event loop."""
        # Not a loom setting: this configures litellm itself, which reads it at import
        # (else it downloads a price map); setdefault keeps an operator's own value.
        # Allowed by name in tests/unit/test_settings_only.py.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm  # lazy: ~3 s and ~350 MB, only where models are called

        return litellm

    def _ensure(self) -> Any:
        if self._router is not None:
            return self._router
        litellm = self.load()
        litellm.suppress_debug_info = True
        litellm.telemetry = False
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        _install_recorder(litellm)
        model_list = []
        for entry in self.config.models.values():
            params: dict[str, Any] = {"model": entry.model}
            if entry.api_base:
                params["api_base"] = entry.api_base
            if entry.api_key_secret:
                key = self.secrets.get(entry.api_key_secret) if self.secrets else None
                if key is None:
                    raise ModelUnavailable(
                        f"model {entry.name!r}: secret {entry.api_key_secret!r} is not set "
                        f"(LOOM_SECRET_{entry.api_key_secret} or a file in LOOM_SECRETS_DIR)"
                    )
                params["api_key"] = key
            elif entry.api_base:
                params["api_key"] = "none"  # a self-hosted server without keys
            if entry.timeout_s:
                params["timeout"] = entry.timeout_s
            if entry.input_cost_per_token is not None:
                params["input_cost_per_token"] = entry.input_cost_per_token
            if entry.output_cost_per_token is not None:
                params["output_cost_per_token"] = entry.output_cost_per_token
            model_list.append({"model_name": entry.name, "litellm_params": params,
                               "model_info": {"id": entry.name}})  # fmt: skip
        fallbacks = [
            {e.name: list(e.fallbacks)} for e in self.config.models.values() if e.fallbacks
        ]
        self._litellm = litellm
        self._router = litellm.Router(
            model_list=model_list,
            fallbacks=fallbacks,
            num_retries=self.config.num_retries,
            timeout=self.config.timeout_s,
            retry_after=0,
        )
        return self._router

    async def _streamed(
        self, router: Any, request: dict[str, Any], on_text: Callable[[str], Awaitable[None]]
    ) -> Any:
        """Stream the answer, handing text on as it comes; the complete response rebuilt
        from the chunks (``litellm.stream_chunk_builder``)."""
        stream = await router.acompletion(
            **request, stream=True, stream_options={"include_usage": True}
        )
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                await on_text(piece)
        return self._litellm.stream_chunk_builder(chunks, messages=request["messages"])

    def _price(self, name: str, tokens_in: int, tokens_out: int) -> float:
        entry = self.config.models.get(name)
        if entry is None:
            return 0.0
        return round(
            tokens_in * (entry.input_cost_per_token or 0.0)
            + tokens_out * (entry.output_cost_per_token or 0.0),
            10,
        )

    # ------------------------------------------------------------------ calls

    async def complete(
        self,
        name: str | None,
        messages: list[ModelMessage],
        tools: list[ToolSpec] = (),  # type: ignore[assignment]  # an immutable empty default; only read
        json_schema: dict[str, Any] | None = None,
        json_mode: bool = False,
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> Answer:
        """One call. With ``on_text`` and ``stream: true`` in the configuration the
        answer is streamed and each piece of text handed to ``on_text`` as it comes; the
        Answer is the same either way."""
        if self._router is None and self.config.models:
            await asyncio.to_thread(self.load)  # the ~3 s import never blocks the loop
        try:
            chosen = self.config.resolve(name)
            router = self._ensure()
        except ModelUnavailable as exc:
            return Answer(message=None, error=ErrorInfo(code="no_model_configured",
                                                       message=str(exc)))  # fmt: skip
        call = f"c{next(self._ids)}"
        _IN_FLIGHT[call] = (self, [])
        # tool names as providers accept them (`demo.add` -> `demo__add`), and back
        to_wire, from_wire = wire_names([spec.name for spec in tools])
        request: dict[str, Any] = {
            "model": chosen,
            "messages": [_wire(m, to_wire) for m in messages],
            "metadata": {"loom_call": call, "loom_requested": chosen},
        }
        if tools:
            request["tools"] = [_tool(spec, to_wire[spec.name]) for spec in tools]
        if json_schema is not None:
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": json_schema},
            }
        elif json_mode:
            request["response_format"] = {"type": "json_object"}
        self.calls += 1
        t0 = time.perf_counter()
        streamed = self.config.stream and on_text is not None
        try:
            if streamed:
                response = await self._streamed(router, request, on_text)  # type: ignore[arg-type]  # streamed implies on_text is not None
            else:
                response = await router.acompletion(**request)
        except asyncio.CancelledError:
            _IN_FLIGHT.pop(call, None)  # the service stops: nothing will read these
            raise
        except Exception as exc:  # noqa: BLE001 (every provider error becomes a typed one)
            await _settle()
            attempts = _IN_FLIGHT.pop(call, (self, []))[1]
            code = _error_code(exc)
            return Answer(message=None, attempts=attempts, usage=_usage(attempts, 0),
                          error=ErrorInfo(code=code, message=_short(str(exc)),
                                          retryable=code in ("rate_limited", "model_timeout",
                                                             "model_unavailable")))  # fmt: skip
        elapsed = (time.perf_counter() - t0) * 1000
        await _settle()
        attempts = _IN_FLIGHT.pop(call, (self, []))[1]
        hidden = getattr(response, "_hidden_params", {}) or {}
        headers = hidden.get("additional_headers") or {}
        usage_obj = getattr(response, "usage", None)
        tokens_in = int(getattr(usage_obj, "prompt_tokens", 0) or 0)
        tokens_out = int(getattr(usage_obj, "completion_tokens", 0) or 0)
        cost = round(float(hidden.get("response_cost") or 0.0), 10)
        answered_by = str(headers.get("x-litellm-model-group") or chosen)
        if streamed:  # a rebuilt stream carries no headers: the attempts say who answered
            ok = [a for a in attempts if a.error is None]
            answered_by = ok[-1].model if ok else _last_tried(attempts, chosen)
            cost = cost or self._price(answered_by, tokens_in, tokens_out)
        if not any(a.error is None for a in attempts):  # the success callback lags: add it
            attempts.append(ModelAttempt(
                model=answered_by, provider=str(hidden.get("custom_llm_provider") or ""),
                provider_model=str(hidden.get("litellm_model_name") or ""),
                fallback=answered_by != chosen, latency_ms=round(elapsed, 3),
                input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=cost,
            ))  # fmt: skip
        choice = response.choices[0]
        raw = choice.message
        content = raw.content if isinstance(raw.content, str) else None
        if content is not None and len(content) > MAX_ANSWER_CHARS:
            return Answer(message=None, attempts=attempts, usage=_usage(attempts, 1),
                          error=ErrorInfo(code="model_output_too_large",
                                          message=f"the answer has {len(content)} characters, "
                                          f"over {MAX_ANSWER_CHARS}"))  # fmt: skip
        calls = [
            ModelToolCall(
                id=str(tc.id or f"call_{i}"),
                name=_from_wire(str(getattr(tc.function, "name", "") or ""), from_wire),
                arguments=_arguments(getattr(tc.function, "arguments", "")),
            )
            for i, tc in enumerate(raw.tool_calls or [])
        ]
        return Answer(
            message=ModelMessage(role="assistant", content=content, tool_calls=calls),
            finish_reason=str(choice.finish_reason or ""),
            model=answered_by,
            provider=self.config.models[answered_by].provider
            if answered_by in self.config.models
            else str(hidden.get("custom_llm_provider") or ""),
            attempts=attempts,
            usage=ModelUsage(
                input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=cost, calls=1
            ),  # fmt: skip
        )


def _last_tried(attempts: list[ModelAttempt], chosen: str) -> str:
    """Who answered a stream whose success callback has not run yet: the model after
    the last failed one in the fallback order (or the one asked)."""
    return attempts[-1].model if attempts and attempts[-1].error is None else chosen


async def _settle() -> None:
    """Let litellm's logging tasks of this call run (they are scheduled, not awaited)."""
    for _ in range(3):
        await asyncio.sleep(0)


def _usage(attempts: list[ModelAttempt], calls: int) -> ModelUsage:
    return ModelUsage(
        input_tokens=sum(a.input_tokens for a in attempts),
        output_tokens=sum(a.output_tokens for a in attempts),
        cost_usd=sum(a.cost_usd for a in attempts),
        calls=calls or 1,
    )


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def wire_names(names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Function names a provider accepts for our tool names, and the way back.

    OpenAI (and providers copying its API) allow only ``^[a-zA-Z0-9_-]{1,64}$``; catalog
    names are namespaced with dots (``demo.add`` from the MCP server ``demo``), which such
    a provider refuses with a 400. A dot becomes ``__``, any other character ``_``; a name
    that collides or is too long gets a short digest suffix, so the mapping stays one to
    one. Only the wire sees these names: events keep the catalog name."""
    to_wire: dict[str, str] = {}
    for name in names:
        if _FUNCTION_NAME.fullmatch(name) and name not in to_wire.values():
            to_wire[name] = name
            continue
        wire = re.sub(r"[^A-Za-z0-9_-]", "_", name.replace(".", "__"))
        if len(wire) > 64 or wire in to_wire.values() or wire in names:
            digest = hashlib.sha256(name.encode()).hexdigest()[:8]
            wire = f"{wire[:55]}-{digest}"
        to_wire[name] = wire
    return to_wire, {wire: name for name, wire in to_wire.items()}


def _from_wire(name: str, from_wire: dict[str, str]) -> str:
    # a name the model made up stays as it came: the agent reports it as unknown_tool
    return from_wire.get(name, name)


def _history_name(name: str, to_wire: dict[str, str]) -> str:
    # an earlier call to a tool not offered now (or one the model made up, refused as
    # unknown_tool) must still pass the provider's name rule, or the whole turn is refused
    if name in to_wire:
        return to_wire[name]
    return name if _FUNCTION_NAME.fullmatch(name) else (re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]
                                                        or "unnamed")  # fmt: skip


def _wire(message: ModelMessage, to_wire: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": _history_name(c.name, to_wire), "arguments": c.arguments}}
            for c in message.tool_calls
        ]  # fmt: skip
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _tool(spec: ToolSpec, wire_name: str) -> dict[str, Any]:
    schema = spec.input_schema or {"type": "object", "properties": {}}
    return {"type": "function", "function": {
        "name": wire_name, "description": spec.description[:1024], "parameters": schema,
    }}  # fmt: skip


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _short(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_code(exc: BaseException) -> str:
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    if name == "RateLimitError" or status == 429:
        return "rate_limited"
    if "Timeout" in name or status in (408, 504):
        return "model_timeout"
    if name in ("AuthenticationError", "PermissionDeniedError") or status in (401, 403):
        return "model_auth_failed"
    if name in ("BadRequestError", "ContextWindowExceededError", "NotFoundError") or status in (
        400, 404, 422,
    ):  # fmt: skip
        return "model_bad_request"
    return "model_unavailable"
