"""A real MCP server for the tests (mcp 2.x ``MCPServer``), over stdio or streamable
HTTP: ``python demo_server.py`` (stdio) or ``python demo_server.py http PORT``.

Tools cover the paths the client must handle: a good answer with an output schema, an
``is_error`` result, output that breaks its own schema, a hang, a process that dies
mid-call, a non-idempotent counter (writes a line per real execution to the file named
by ``DEMO_COUNTER_FILE``) and a switchable failure (fails while ``DEMO_FAIL_FILE``
exists), for the circuit breaker."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from pydantic import BaseModel

app = MCPServer("demo")


class Sum(BaseModel):
    total: int


class Strict(BaseModel):
    count: int


@app.tool(description="Add two integers.", annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> Sum:
    return Sum(total=a + b)


@app.tool(description="Always reports an error (is_error).")
def boom(reason: str = "bad") -> str:
    raise ValueError(f"boom: {reason}")


@app.tool(description="Declares {count: int} and returns a string there.", structured_output=True)
def liar() -> Strict:
    return Strict.model_construct(count="not a number")  # type: ignore[arg-type]


@app.tool(description="Sleeps the given seconds.", annotations=ToolAnnotations(read_only_hint=True))
async def hang(seconds: float = 60.0) -> str:
    await asyncio.sleep(seconds)
    return "woke"


@app.tool(description="Exits the server process in the middle of the call.")
def die() -> str:
    os._exit(3)


@app.tool(description="Counts real executions (not idempotent).")
def bump(label: str) -> str:
    path = os.environ.get("DEMO_COUNTER_FILE")
    if path:
        with open(path, "a") as f:
            f.write(label + "\n")
        if Path(path + ".die").exists():  # die after acting: the outcome is ambiguous
            os._exit(4)
    return "bumped"


@app.tool(
    description="Fails while DEMO_FAIL_FILE exists, else answers ok.",
    annotations=ToolAnnotations(idempotent_hint=True),
)
def fragile() -> str:
    flag = os.environ.get("DEMO_FAIL_FILE")
    if flag and Path(flag).exists():
        raise RuntimeError("fragile is failing")  # is_error: its breaker counts it
    return "ok"


@app.tool(description="Answers plain text (no output schema).", structured_output=False)
def plain(name: str = "world") -> str:
    return f"hello {name}"


@app.tool(description="Says whether the env var DEMO_TOKEN was set (never its value).")
def has_token() -> bool:
    return bool(os.environ.get("DEMO_TOKEN"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        app.run("streamable-http", port=int(sys.argv[2]), json_response=True)
    else:
        app.run()
