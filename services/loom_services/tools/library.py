"""The built-in tool library as one registry.

Its own module so that the dependencies point one way: ``builtins`` and
``http_request`` define tools with ``registry``; this module gathers them. (Kept in
``registry`` it made ``registry`` and ``builtins`` import each other.)
"""

from __future__ import annotations

from loom_services.tools.builtins import BUILTIN_TOOLS
from loom_services.tools.http_request import http_request
from loom_services.tools.registry import ToolRegistry


def default_registry() -> ToolRegistry:
    """A new registry holding every built-in tool."""
    return ToolRegistry((*BUILTIN_TOOLS, http_request))
