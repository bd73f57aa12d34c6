"""The one root of the project's exceptions: any of them becomes a typed ``ErrorInfo``.

Every exception class of ``libs/`` and ``services/`` derives from :class:`LoomError`
(keeping its old base too, e.g. ``ValueError``, so callers that catch that still do).
``exc.info`` is the error as a client sees it, built in one place from what the
subclass carries: an ``error`` (an ErrorInfo already), or ``code`` / ``message`` /
``path`` / ``retryable`` / ``details`` attributes. A subclass only names its ``code``
(a class attribute, or an instance attribute when it varies); every code is registered
in :mod:`loom_core.error_codes` (a unit test walks the classes and checks it).
"""

from __future__ import annotations

from typing import Any

from loom_core.contracts import ErrorInfo

__all__ = ["LoomError"]


class LoomError(Exception):
    """Root of every agentloom exception; ``info`` is its typed ErrorInfo."""

    code: str = "internal_error"
    retryable: bool = False

    @property
    def info(self) -> ErrorInfo:
        error = getattr(self, "error", None)
        if isinstance(error, ErrorInfo):
            return error
        message = getattr(self, "message", None)
        path = getattr(self, "path", None)
        details: Any = getattr(self, "details", None)
        return ErrorInfo(
            code=self.code,
            message=message if isinstance(message, str) else str(self),
            path=path if isinstance(path, str) else None,
            retryable=bool(self.retryable),
            details=dict(details) if isinstance(details, dict) else {},
        )
