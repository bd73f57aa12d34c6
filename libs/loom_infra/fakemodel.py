"""A real, local HTTP server speaking the OpenAI chat completions and embeddings API,
for tests and benchmarks: every call goes through litellm and a socket, never a mock
inside the process.

Each test scripts what the "model" answers, per model name (the ``model`` field of the
request): a queue of replies, taken in order, each one of
- ``Reply(content=...)``: a text answer;
- ``Reply(tool_calls=[ToolCall(name, arguments)])``: the model calls tools
  (``arguments`` is sent as given when it is a string, so malformed JSON can be sent);
- ``Fail(status=429|500, ...)``: an HTTP error (rate limit, server error);
- ``Hang(seconds)``: answer nothing for that long (a timeout on the client side).
When a model's queue is empty, ``default`` answers (a callable of the request body, or a
Reply), else the server answers 500 ``no scripted reply``. Streaming (``stream: true``)
sends the same reply as server-sent events, content split into chunks.

Tool names outside OpenAI's function-name rule are refused with a 400, as OpenAI does.
``requests`` counts every request received (by model too), so a test can assert that a
replay made zero model calls. TCP_NODELAY is set on every connection
(``disable_nagle_algorithm``): without it each small answer waits ~40 ms for the
client's delayed ACK.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: Any = field(default_factory=dict)  # a dict (sent as JSON) or a raw string
    id: str = ""


@dataclass
class Reply:
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    input_tokens: int = 10
    output_tokens: int = 5
    finish_reason: str | None = None  # default: tool_calls when calling tools, else stop


@dataclass
class Fail:
    status: int = 500
    message: str = "scripted failure"


@dataclass
class Hang:
    seconds: float = 30.0


Scripted = Reply | Fail | Hang
Default = Callable[[dict[str, Any]], Scripted] | Scripted | None


class FakeModelServer:
    """``with FakeModelServer() as server:`` then ``server.base_url`` (ends in ``/v1``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.scripts: dict[str, deque[Scripted]] = {}
        self.default: Default = None
        self.requests: Counter[str] = Counter()  # "*" counts all
        self.bodies: list[dict[str, Any]] = []  # every request body, in order
        self.keys: list[str] = []  # the bearer token of every chat request (auth checks)
        self.keep_bodies = True
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ scripting

    def script(self, model: str, *replies: Scripted) -> None:
        """Append replies for ``model`` (the name the request carries, without the
        ``openai/`` prefix litellm strips)."""
        with self._lock:
            self.scripts.setdefault(model, deque()).extend(replies)

    def clear(self) -> None:
        with self._lock:
            self.scripts.clear()
            self.default = None

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bodies.clear()

    @property
    def total(self) -> int:
        return self.requests["*"]

    def _next(self, model: str, body: dict[str, Any]) -> Scripted:
        with self._lock:
            self.requests["*"] += 1
            self.requests[model] += 1
            if self.keep_bodies:
                self.bodies.append(body)
            refused = _bad_function_name(body)
            if refused:  # as OpenAI answers it; the script is not consumed
                return Fail(400, refused)
            queue = self.scripts.get(model)
            if queue:
                return queue.popleft()
            default = self.default
        if default is None:
            return Fail(500, f"no scripted reply for model {model!r}")
        if not callable(default):
            return default
        try:
            return default(body)
        except Exception as exc:  # noqa: BLE001 (a broken script answers 500, never hangs)
            return Fail(500, f"the scripted reply raised {exc!r}")

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeModelServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fake-model", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_id(self) -> int:
        return next(self._ids)


def _handler(server: FakeModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: litellm's client reuses connections
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return None

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._json(400, {"error": {"message": "body is not JSON", "type": "invalid"}})
                return
            path = self.path.rstrip("/")
            if path.endswith("/embeddings"):
                self._embeddings(body)
            elif path.endswith("/chat/completions"):
                self._chat(body)
            else:
                self._json(404, {"error": {"message": f"no route {self.path}"}})

        def _chat(self, body: dict[str, Any]) -> None:
            model = str(body.get("model", ""))
            auth = self.headers.get("Authorization") or ""
            with server._lock:
                server.keys.append(auth.removeprefix("Bearer "))
            answer = server._next(model, body)
            if isinstance(answer, Hang):
                time.sleep(answer.seconds)
                answer = Fail(504, "hung")
            if isinstance(answer, Fail):
                kind = "rate_limit_error" if answer.status == 429 else "server_error"
                self._json(answer.status, {"error": {"message": answer.message, "type": kind,
                                                     "code": str(answer.status)}})  # fmt: skip
                return
            n = server.next_id()
            calls = [
                {
                    "id": c.id or f"call_{n}_{i}",
                    "type": "function",
                    "function": {
                        "name": c.name,
                        "arguments": c.arguments
                        if isinstance(c.arguments, str)
                        else json.dumps(c.arguments),
                    },
                }
                for i, c in enumerate(answer.tool_calls)
            ]
            finish = answer.finish_reason or ("tool_calls" if calls else "stop")
            usage = {
                "prompt_tokens": answer.input_tokens,
                "completion_tokens": answer.output_tokens,
                "total_tokens": answer.input_tokens + answer.output_tokens,
            }
            if body.get("stream"):
                self._stream(n, model, answer, calls, finish, usage)
                return
            message: dict[str, Any] = {"role": "assistant", "content": answer.content}
            if calls:
                message["tool_calls"] = calls
            self._json(200, {
                "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage,
            })  # fmt: skip

        def _stream(self, n: int, model: str, answer: Reply, calls: list[Any], finish: str,
                    usage: dict[str, int]) -> None:  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            base = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk",
                    "created": 1_700_000_000, "model": model}  # fmt: skip
            chunks: list[dict[str, Any]] = []
            text = answer.content or ""
            pieces = [text[i : i + 8] for i in range(0, len(text), 8)]
            for i, piece in enumerate(pieces):
                delta = {"content": piece} if i else {"role": "assistant", "content": piece}
                chunks.append({"index": 0, "delta": delta, "finish_reason": None})
            for i, call in enumerate(calls):
                chunks.append({"index": 0, "delta": {"tool_calls": [{"index": i, **call}]},
                               "finish_reason": None})  # fmt: skip
            chunks.append({"index": 0, "delta": {}, "finish_reason": finish})
            for choice in chunks:
                self._chunk({**base, "choices": [choice]})
            self._chunk({**base, "choices": [], "usage": usage})
            self._write(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _chunk(self, data: dict[str, Any]) -> None:
            self._write(b"data: " + json.dumps(data).encode() + b"\n\n")

        def _write(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        def _embeddings(self, body: dict[str, Any]) -> None:
            model = str(body.get("model", ""))
            with server._lock:
                server.requests["*"] += 1
                server.requests[f"embed:{model}"] += 1
            texts = body.get("input", [])
            texts = [texts] if isinstance(texts, str) else texts
            data = [
                {"object": "embedding", "index": i, "embedding": _vector(str(t))}
                for i, t in enumerate(texts)
            ]
            tokens = sum(len(str(t).split()) for t in texts)
            self._json(200, {"object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": tokens,
                                       "total_tokens": tokens}})  # fmt: skip

        def _json(self, status: int, data: dict[str, Any]) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _bad_function_name(body: dict[str, Any]) -> str | None:
    """OpenAI's rule for tool (function) names, in the tools offered and in the
    assistant's earlier calls: a name outside it is refused with a 400."""
    names = [t.get("function", {}).get("name") for t in body.get("tools") or []]
    for m in body.get("messages") or []:
        names += [c.get("function", {}).get("name") for c in m.get("tool_calls") or []]
    for name in names:
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            return f"Invalid 'tools': string does not match pattern '^[a-zA-Z0-9_-]+$': {name!r}"
    return None


def _vector(text: str, dims: int = 8) -> list[float]:
    """A deterministic vector per text (same text, same vector)."""
    import hashlib

    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255.0, 4) for b in digest[:dims]]
