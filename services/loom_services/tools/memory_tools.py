"""Memory as tools: every memory operation is a tool in the registry, executed by the
tool-runner like any other (events, spans, the idempotency ledger), which asks the memory
service over the declared route ``apiMemoryTool`` with the call's run id.

The memory service acts as that run's stored principal; nothing in a tool's input can
name another user or tenant (the inputs are strict: an unknown field such as ``user_id``
is an ``invalid_input``)."""

from __future__ import annotations

import msgspec

from loom_core import subjects
from loom_core.contracts import JSON, MemoryReply, MemoryRequest
from loom_infra import bus
from loom_services import memory_ops as ops
from loom_services.tools.registry import Tool, ToolContext, ToolFailure

RETRYABLE = frozenset({"memory_error", "store_busy"})


def _memory_tool(
    name: str, op: str, description: str, *, idempotent: bool = True, timeout_s: float = 30.0
) -> Tool:
    args_type = ops.OPS[op][0]

    async def call(inp: msgspec.Struct, ctx: ToolContext) -> JSON:
        nc = getattr(ctx, "nc", None)
        if nc is None:
            raise ToolFailure(
                "memory_unavailable",
                f"{name} runs in the tool-runner service, which reaches the memory service "
                "over NATS; this context has no connection",
            )
        request = MemoryRequest(op=op, args=msgspec.to_builtins(inp), run_id=ctx.run_id)  # type: ignore[arg-type]  # op is this tool's own name; the service refuses others
        try:
            reply = await bus.request(
                nc, subjects.API_MEMORY_TOOL, request, MemoryReply, timeout=timeout_s
            )
        except TimeoutError:
            raise ToolFailure(
                "memory_unavailable",
                "the memory service did not answer: check that it runs (loom status)",
                retryable=True,
            ) from None
        if reply.error is not None:
            e = reply.error
            raise ToolFailure(
                e.code, e.message, e.code in RETRYABLE, path=e.path, details=e.details
            )
        return reply.result

    return Tool(
        name=name,
        description=description,
        input_type=args_type,
        output_type=JSON,
        fn=call,
        idempotent=idempotent,
        timeout_s=timeout_s,
    )


MEMORY_TOOLS: tuple[Tool, ...] = (
    _memory_tool("memory_store", "store", "Remember a fact for the run's user (scope user) or "
                 "for everyone with given roles (scope global, admins only)."),
    _memory_tool("memory_search", "search", "Memories like a query: the user's, the global "
                 "ones the user's roles allow, or all; with score threshold and category."),
    _memory_tool("memory_get", "get", "One memory by id."),
    _memory_tool("memory_update", "update", "Change a memory's text, category or metadata."),
    _memory_tool("memory_delete", "delete", "Forget one memory."),
    _memory_tool("memory_list", "list", "The user's (or global) memories, a page at a time."),
    _memory_tool("memory_stats", "stats", "How many memories the user has, by category."),
    _memory_tool("memory_bulk_delete", "bulk_delete", "Forget all of the user's memories "
                 "(optionally of one category)."),
    _memory_tool("memory_export", "export", "The user's memories as JSON."),
    _memory_tool("memory_import", "import", "Store memories exported before (as this user)."),
    _memory_tool("memory_inspect", "inspect", "Another user's memories (admin only)."),
    _memory_tool("thread_history", "history", "The last messages of one of the user's "
                 "conversation threads."),
    _memory_tool("thread_recall", "recall", "Messages like a query from one thread or all "
                 "of the user's threads, each with its neighbouring messages."),
    _memory_tool("working_memory_get", "working_get", "The user's (or a thread's) working "
                 "memory document and its version; an earlier version by number."),
    _memory_tool("working_memory_set", "working_set", "Replace the working memory document "
                 "if it is still at expected_version (else a conflict naming the current one)."),
    _memory_tool("working_memory_history", "working_history", "Earlier versions of the "
                 "working memory document."),
    _memory_tool("knowledge_add", "knowledge_add", "Ingest a document (text, markdown, html, "
                 "json) into a knowledge collection: chunked, embedded, idempotent by "
                 "content.", timeout_s=300.0),
    _memory_tool("knowledge_search", "knowledge_search", "Chunks of a knowledge collection "
                 "like a query, with scores and sources."),
    _memory_tool("knowledge_list", "knowledge_list", "Knowledge collections, or one "
                 "collection's sources."),
    _memory_tool("knowledge_delete", "knowledge_delete", "Remove a source (or a whole "
                 "collection) from knowledge."),
)  # fmt: skip
