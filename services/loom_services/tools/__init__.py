"""The tool-runner's tool library: registry, built-in tools, SSRF guard, execution.

The service shell calls :func:`execute_tool` for each tool-call request; it never raises
for a tool's problem and returns a :class:`ToolOutcome` (output or typed ``ErrorInfo``).
"""

from loom_services.tools.library import default_registry
from loom_services.tools.netguard import AddressNotAllowed, ResolvedTarget, check_url
from loom_services.tools.registry import (
    Tool,
    ToolContext,
    ToolFailure,
    ToolInput,
    ToolOutcome,
    ToolOutput,
    ToolRegistry,
    ToolSettings,
    ToolSuspend,
    execute_tool,
    make_tool,
    tool,
)

__all__ = [
    "AddressNotAllowed",
    "ResolvedTarget",
    "Tool",
    "ToolContext",
    "ToolFailure",
    "ToolInput",
    "ToolOutcome",
    "ToolOutput",
    "ToolRegistry",
    "ToolSettings",
    "ToolSuspend",
    "check_url",
    "default_registry",
    "execute_tool",
    "make_tool",
    "tool",
]
