"""Every exception class of the project derives from one root, ``LoomError``, and its
``info`` is a valid ErrorInfo with a registered code (issue 16, "one of each")."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import msgspec
import pytest

from loom_core.contracts import ErrorInfo, PlanIssue
from loom_core.error_codes import CODES
from loom_core.errors import LoomError

PACKAGES = ("loom_core", "loom_infra", "loom_services", "loom_cli")

# not errors: a tool's request to suspend, answered by the tool-runner, never reported
NOT_ERRORS = {"loom_services.tools.registry.ToolSuspend"}


def _exception_classes() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        modules = [root] + [
            importlib.import_module(m.name)
            for m in pkgutil.walk_packages(root.__path__, f"{package}.")
        ]
        for module in modules:
            for name, obj in vars(module).items():
                if (
                    inspect.isclass(obj)
                    and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__
                    and not name.startswith("_")  # private control flow, caught where raised
                    and obj.__name__ == name  # not an alias
                    and f"{obj.__module__}.{name}" not in NOT_ERRORS
                ):
                    found.append(obj)
    return found


CLASSES = _exception_classes()


def test_the_walk_finds_the_project_exceptions() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {"TemplateError", "ServiceError", "StoreError", "ToolFailure", "ReplyError"} <= names
    assert len(CLASSES) >= 30


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_exception_derives_from_the_root_with_a_registered_code(
    cls: type[BaseException],
) -> None:
    assert issubclass(cls, LoomError), f"{cls.__module__}.{cls.__name__} is not a LoomError"
    assert cls.code in CODES, f"{cls.__name__}.code {cls.code!r} is not in error_codes.CODES"


def test_old_bases_are_kept_for_callers_that_catch_them() -> None:
    from loom_core.expressions import ExpressionError
    from loom_core.fork_reuse import ForkError
    from loom_infra.credentials import CredentialsError
    from loom_infra.settings import SettingsError

    assert issubclass(ForkError, ValueError) and issubclass(ExpressionError, ValueError)
    assert issubclass(SettingsError, ValueError) and issubclass(CredentialsError, RuntimeError)


def test_the_client_public_name_still_means_an_error_reply() -> None:
    from loom_infra import client

    assert client.LoomError is client.ReplyError
    error = ErrorInfo(code="not_found", message="no run 'x'")
    assert client.LoomError(error).info == error


def _examples() -> list[tuple[LoomError, str]]:
    from loom_core.blobs import BlobRefError
    from loom_core.convert import ConversionError
    from loom_core.expressions import ExpressionError
    from loom_core.fork_reuse import ForkError
    from loom_core.predicates import PredicateError
    from loom_core.templating import BlobValueError, TemplateSyntaxError
    from loom_infra.auth import AuthError
    from loom_infra.endpoints import ServiceError
    from loom_infra.settings import SettingsError
    from loom_infra.store import StoreError
    from loom_infra.workingmemory import Conflict
    from loom_services.memorystore import MemoryFailure
    from loom_services.tools.netguard import InvalidUrl
    from loom_services.tools.registry import ToolFailure

    return [
        (TemplateSyntaxError("unclosed `{{`", path="$.steps[0].input.q"), "invalid_template"),
        (BlobValueError("a blob", path="$.x"), "blob_not_inline"),
        (PredicateError("no operator", path="$.when"), "invalid_predicate"),
        (ExpressionError("expression_too_deep", "too deep", 3), "expression_too_deep"),
        (
            ForkError("no step s", "$.step", "unknown_step", {"close_matches": ["t"]}),
            "unknown_step",
        ),
        (
            ConversionError(
                [PlanIssue(code="unknown_variable", message="no x", path="$.steps[0]")]
            ),
            "invalid_plan",
        ),
        (BlobRefError(ErrorInfo(code="blob_not_found", message="gone")), "blob_not_found"),
        (AuthError("token_expired", "the bearer token has expired"), "token_expired"),
        (ServiceError(ErrorInfo(code="not_found", message="no run")), "not_found"),
        (SettingsError("LOOM_X", "not a number"), "invalid_setting"),
        (StoreError("down", operation="append", backend="sqlite", retryable=True), "store_error"),
        (Conflict("k", 1, 2), "conflict"),
        (MemoryFailure("conflict", "stale", "$.expected_version", current_version=2), "conflict"),
        (InvalidUrl("ftp://x", None, "not http(s)"), "invalid_url"),
        (ToolFailure("http_error", "404", path="$.url", details={"status": 404}), "http_error"),
    ]


@pytest.mark.parametrize(
    "exc,code", _examples(), ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v
)
def test_info_is_a_valid_error_info(exc: LoomError, code: str) -> None:
    info = exc.info
    assert info.code == code and code in CODES
    assert info.message
    # it survives the wire: encodes and decodes as the ErrorInfo contract
    assert msgspec.json.decode(msgspec.json.encode(info), type=ErrorInfo) == info


def test_info_carries_path_retryable_and_details() -> None:
    from loom_core.fork_reuse import ForkError
    from loom_infra.settings import SettingsError
    from loom_infra.store import StoreError

    fork = ForkError("no step s", "$.step", "unknown_step", {"close_matches": ["t"]}).info
    assert (fork.path, fork.details) == ("$.step", {"close_matches": ["t"]})
    assert StoreError("down", operation="a", backend="b", retryable=True).info.retryable
    setting = SettingsError("LOOM_X", "not a number").info
    assert setting.message == "LOOM_X: not a number"
    assert setting.details == {"variable": "LOOM_X"}


def test_the_cli_explains_any_typed_error_by_its_code() -> None:
    from loom_cli.app import explain
    from loom_cli.common import ExitCode
    from loom_services.models import ModelUnavailable
    from loom_services.planner import CatalogUnavailable
    from loom_services.runtime import ProvisioningError

    assert explain(ModelUnavailable("no model is configured: set LOOM_MODEL")) == (
        ExitCode.FAILED,
        "no model is configured: set LOOM_MODEL (model_unavailable)",
    )
    assert explain(ProvisioningError("stream RUNS does not exist"))[0] == ExitCode.UNAVAILABLE
    assert explain(CatalogUnavailable("no tools yet"))[0] == ExitCode.UNAVAILABLE
    assert explain(KeyError("x"))[0] == ExitCode.BUG  # untyped: still a bug to report
