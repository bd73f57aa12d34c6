"""Every environment setting is read in ``loom_infra/settings.py``, when a process starts
(issue 16): no other module of ``libs/`` or ``services/`` reads the environment, nothing
reads it at import time, a bad value is a ``SettingsError`` naming the variable, and one
table (docs/configuration.md) names exactly the variables read, including every one the
Kubernetes manifests set."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loom_infra import settings as settings_module
from loom_infra.settings import (
    EmbedderSettings,
    OpsSettings,
    OtlpConfigError,
    PartitionSettings,
    SettingsError,
    otlp_settings_from_env,
    settings_from_env,
)

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = "libs/loom_infra/settings.py"
VARIABLE = re.compile(r"(LOOM|OTEL)_[A-Z0-9_]+|COLUMNS")

# Each place outside settings.py that touches os.environ, and why it is not a setting
# being read. Keyed by file and the expression itself, so a new use fails the test.
ALLOWED = {
    ("libs/loom_infra/natsserver.py",
     "{'GOMAXPROCS': str(self.gomaxprocs or default_gomaxprocs()), **os.environ}"):
        "the embedded nats-server inherits this process's environment: passed on, not read "
        "(an inherited GOMAXPROCS replaces the default set before it)",
    ("services/loom_services/tools/mcp_client.py", "os.environ.get('PATH', '')"):
        "a stdio MCP server gets our PATH (to find its command) and nothing else of ours",
    ("services/loom_services/models.py",
     "os.environ.setdefault('LITELLM_LOCAL_MODEL_COST_MAP', 'True')"):
        "configures litellm itself (read by it at import, else it downloads a price map); "
        "an operator's own value is kept",
}  # fmt: skip
ENV_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for base in ("libs", "services"):
        for path in sorted((ROOT / base).rglob("*.py")):
            yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), str(path))


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def environment_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, expression) of each use of ``os.environ`` / ``os.getenv`` and kin, the
    expression widened to the call or literal it is part of."""
    parents = _parents(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [(node.lineno, f"from os import {a.name}") for a in node.names
                      if a.name in ENV_NAMES]  # fmt: skip
        is_env = (
            isinstance(node, ast.Attribute)
            and node.attr in ENV_NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        )
        if not is_env:
            continue
        use: ast.AST = node
        while isinstance(parent := parents.get(use), ast.Attribute | ast.Call | ast.Dict):
            if isinstance(parent, ast.Call) and use is not parent.func:
                break  # os.environ passed as an argument: the call is not the use
            if isinstance(parent, ast.Dict) and use is not node:
                break  # a value read into a literal: the read is the use
            use = parent
        found.append((node.lineno, ast.unparse(use)))
    return found


def test_only_the_settings_module_reads_the_environment() -> None:
    offences, allowed_seen = [], set()
    for path, tree in modules():
        if path == SETTINGS:
            continue
        for line, use in environment_uses(tree):
            if (path, use) in ALLOWED:
                allowed_seen.add((path, use))
            else:
                offences.append(f"{path}:{line}: {use}")
    assert not offences, (
        "read the environment in libs/loom_infra/settings.py (a typed, range-checked "
        "setting read at start) and pass the value in:\n" + "\n".join(offences)
    )
    assert allowed_seen == set(ALLOWED), f"stale allowlist entries: {set(ALLOWED) - allowed_seen}"


def _import_time_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """What runs when the module is imported: everything but function and lambda bodies
    (decorators and default values do run)."""
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            pending += [*node.decorator_list, *node.args.defaults]
            pending += [d for d in node.args.kw_defaults if d is not None]
        elif isinstance(node, ast.Lambda):
            pending += [*node.args.defaults]
        else:
            pending += list(ast.iter_child_nodes(node))


def test_nothing_reads_a_setting_at_import_time() -> None:
    offences = []
    for path, tree in modules():
        for node in _import_time_nodes(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name.endswith("from_env"):
                offences.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not offences, "read settings at start, not at import:\n" + "\n".join(offences)


BAD_VALUES = {
    "LOOM_ACK_WAIT_S": "soon",
    "LOOM_CONSUMER_CREATE_S": "0",
    "LOOM_PARTITIONS": "0",
    "LOOM_RUNS_PERSIST": "sometimes",
    "LOOM_EMBEDDER": "word2vec",
    "LOOM_TRACE_CAPTURE_IO": "maybe",
}


def test_modules_import_with_bad_values_and_the_cli_names_the_variable(tmp_path: Path) -> None:
    """Before issue 16 these values broke ``import loom_infra.bus`` (a traceback from any
    ``loom`` verb); now each is one line at start, exit 2 (a usage mistake)."""
    env = {**os.environ, **BAD_VALUES}
    importing = (
        "import loom_infra.bus, loom_infra.ownership, loom_infra.embedders, loom_infra.otlp, "
        "loom_services.executor, loom_services.tracing, loom_services.memory, "
        "loom_services.toolrunner, loom_cli.app"
    )
    done = subprocess.run(
        [sys.executable, "-c", importing], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loom = Path(sys.executable).with_name("loom")
    # one read at import before, one at first use: the others take the same path
    for name in ("LOOM_ACK_WAIT_S", "LOOM_EMBEDDER"):
        value = BAD_VALUES[name]
        one = {**os.environ, name: value, "LOOM_DATA_DIR": str(tmp_path)}
        run = subprocess.run(
            [str(loom), "runs"], env=one, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 2, (name, run.stdout, run.stderr)
        assert "Traceback" not in run.stderr
        assert f"{name}:" in run.stderr and "fix it and start again" in run.stderr
    # a service: one logged line, exit 2
    one = {**os.environ, "LOOM_LOG_LEVEL": "chatty", "LOOM_DATA_DIR": str(tmp_path)}
    service = subprocess.run([sys.executable, "-m", "loom_services.planner"], env=one,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert service.returncode == 2 and "Traceback" not in service.stderr, service.stderr
    assert "cannot start: LOOM_LOG_LEVEL: must be one of DEBUG" in service.stderr


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("LOOM_PARTITIONS", "0", "between 1 and 1024"),
        ("LOOM_PARTITIONS", "eight", "between 1 and 1024"),
        ("LOOM_PARTITION_LEASE_S", "0.5", "between 1 and 300"),
        ("LOOM_EMBEDDER", "word2vec", "minilm"),
        ("LOOM_EMBEDDER", "hash:0", "hash[:dim]"),
        ("LOOM_EMBEDDER", "litellm:text-embedding-3-small", "litellm:<model>:<dimensions>"),
        ("LOOM_EMBED_THREADS", "0", "1-256"),
        ("LOOM_EMBED_THREADS", "all", "whole number"),
        ("LOOM_CONSUMER_CREATE_S", "forever", "seconds"),
        ("LOOM_RUNS_PERSIST", "sometimes", "'async' or 'default'"),
        ("LOOM_TRACE_CAPTURE_IO", "maybe", "1 or 0"),
        ("LOOM_TRACE_IO_LIMIT", "-1", ">= 0"),
        ("LOOM_MAX_PAYLOAD", "0", "positive"),
        ("LOOM_MAX_JSON_DEPTH", "500", "1-200"),
        ("LOOM_LOG_LEVEL", "chatty", "DEBUG, INFO"),
    ],
)
def test_a_bad_value_stops_the_start_naming_the_variable(name: str, value: str, says: str) -> None:
    env = {name: value, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    with pytest.raises(SettingsError) as raised:
        settings_from_env(env)
    assert raised.value.variable == name and says in str(raised.value)
    assert raised.value.info.code == "invalid_setting"


def test_what_was_read_where_it_was_used_is_now_in_the_settings() -> None:
    settings = settings_from_env({
        "LOOM_PARTITIONS": "16", "LOOM_PARTITION_LEASE_S": "2", "LOOM_REPLICA_ID": "ex 1.a",
        "LOOM_EMBEDDER": "hash:32", "LOOM_EMBED_MODEL_DIR": "/models", "LOOM_EMBED_THREADS": "2",
        "LOOM_QDRANT": "http://qdrant:6333", "LOOM_TRACE_CAPTURE_IO": "on",
        "LOOM_TOOLS_CONFIG": "tools.yaml", "LOOM_CONSUMER_CREATE_S": "5",
        "LOOM_RUNS_PERSIST": "Default", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cr3t",
    })  # fmt: skip
    assert settings.partitions == PartitionSettings(count=16, lease_s=2.0, replica="ex_1_a")
    assert settings.ops.partitions == 16 and settings.ops.runs_persist == "default"
    assert settings.embedder == EmbedderSettings("hash:32", Path("/models"), 2)
    assert settings.qdrant == "http://qdrant:6333" and settings.trace.capture_io
    assert settings.tools_config == Path("tools.yaml")
    assert settings.delivery.consumer_create_s == 5.0
    defaults = settings_from_env({})
    assert defaults.ops == OpsSettings()
    assert defaults.embedder == EmbedderSettings() and defaults.tools_config is None


def test_otel_variables_are_the_tracing_services_alone() -> None:
    """The OTEL_* variables are shared with other software: a value we do not support
    (http/json) stops the tracing service at its start, never the CLI or another
    service, which export nothing."""
    foreign = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}  # fmt: skip
    settings_from_env(foreign)  # no error
    with pytest.raises(OtlpConfigError) as raised:
        otlp_settings_from_env(foreign)
    assert raised.value.variable == "OTEL_EXPORTER_OTLP_PROTOCOL"
    assert otlp_settings_from_env({}) is None
    otlp = otlp_settings_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                   "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cr3t"})  # fmt: skip
    assert otlp is not None and otlp.endpoint == "http://c:4318/v1/traces"
    assert "s3cr3t" not in repr(otlp)  # a collector's API key is never shown


# --------------------------------------------------------------------------- the table


class _Spy(dict[str, str]):
    """An environment that records every variable asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]  # dict.get's overloads
        self.asked.add(key)
        return super().get(key, default)

    def items(self) -> Any:
        self.asked.add("LOOM_SECRET_<NAME>")  # the only reader of the whole environment
        return super().items()


def variables_read() -> set[str]:
    spy = _Spy({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})  # reads the rest too
    settings_from_env(spy)
    readers = ("log_level_from_env", "debug_from_env", "columns_from_env", "otlp_settings_from_env")
    for reader in readers:
        getattr(settings_module, reader)(spy)
    return spy.asked


def cli_option_variables() -> set[str]:
    """Variables typer reads as option defaults (``envvar=``)."""
    found = set()
    for _, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "envvar":
                found.add(ast.literal_eval(node.value))
    return found


def documented() -> set[str]:
    names = set()
    for line in (ROOT / "docs/configuration.md").read_text().splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names |= set(re.findall(r"`([A-Z][A-Z0-9_<>]+)`", first))
    return names


def deployed() -> set[str]:
    """Variables the Kubernetes manifests set (ConfigMap/Secret keys, container env)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("kind") in ("ConfigMap", "Secret"):
                data = {**(node.get("data") or {}), **(node.get("stringData") or {})}
                names.update(k for k in data if VARIABLE.fullmatch(k))
            name = node.get("name")  # a container's env entry: name with value(From)
            entry = "value" in node or "valueFrom" in node
            if entry and isinstance(name, str) and VARIABLE.fullmatch(name):
                names.add(name)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted((ROOT / "deploy/k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            walk(doc)
    return names


# read by the container image's entrypoint (a shell script), not by Python
NOT_PYTHON = {"LOOM_SERVICE"}


def test_one_table_names_every_variable_read_and_deployed() -> None:
    read = variables_read() | cli_option_variables()
    table = documented()
    assert read - table == set(), f"read but not in docs/configuration.md: {read - table}"
    assert table - read - NOT_PYTHON == set(), f"documented, never read: {table - read}"
    assert deployed() - table == set(), f"set in deploy/k8s, not documented: {deployed() - table}"
