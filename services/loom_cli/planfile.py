"""Reading run files and JSON arguments without recursing on what they hold.

PyYAML's composer and ``json.loads`` recurse once per nesting level, so a deeply nested
file used to crash ``loom run`` with a RecursionError traceback (issue 9). Here the
YAML is first walked as a stream of parser events (the parser is a state machine, not
recursive), stopping at the first collection nested deeper than the limit; only a file
within the limit is composed. What YAML aliases could still build (a shallow anchor
repeated deep inside, or repeated until huge) is caught by the iterative
``loom_core.limits.check_json`` on the loaded value, with a size bound too.

Every refusal is one line naming the file, where, the limit and the setting that
raises it (``LOOM_MAX_JSON_DEPTH``, ``LOOM_MAX_PAYLOAD``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from loom_cli.common import ExitCode, fail
from loom_core.limits import MAX_DEPTH_SETTING, check_json, json_path, too_deep
from loom_infra.settings import SettingsError, json_depth_from_env, payload_limit_from_env

MAX_PAYLOAD_SETTING = "LOOM_MAX_PAYLOAD"
# libyaml's parser when present (faster), else PyYAML's own; both are iterative
_EVENT_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def limits() -> tuple[int, int]:
    """(depth, bytes): LOOM_MAX_JSON_DEPTH and LOOM_MAX_PAYLOAD, read by the settings
    module; a bad value is a usage error naming the variable (exit 2)."""
    try:
        return json_depth_from_env(), payload_limit_from_env()
    except SettingsError as exc:
        raise fail(f"{exc}; fix it and start again", ExitCode.USAGE) from None


def too_deep_in_yaml(text: str, max_depth: int) -> tuple[str, int, int] | None:
    """(JSON path, line, column) of the first collection nested deeper than
    ``max_depth`` in the YAML ``text``, or None. Stops there: the cost is the text up to
    the offence, whatever follows."""
    frames: list[_Open] = []
    keys: list[str | int] = []  # the path to the innermost open collection
    for event in yaml.parse(text, Loader=_EVENT_LOADER):
        if isinstance(event, yaml.CollectionEndEvent):
            if frames.pop().keyed:
                keys.pop()
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue  # stream and document boundaries
        key: str | int | None = None
        if frames:
            key = frames[-1].child(event)
            if key is None:
                continue  # a mapping's scalar key: not a node of the data's depth
        if isinstance(event, yaml.CollectionStartEvent):
            if len(frames) >= max_depth:
                mark = event.start_mark
                where = json_path("$", [*keys, key] if key is not None else keys)
                if mark is None:  # events from the C loader always carry marks
                    return where, 0, 0
                return where, mark.line + 1, mark.column + 1
            frames.append(_Open(isinstance(event, yaml.MappingStartEvent), key is not None))
            if key is not None:
                keys.append(key)
    return None


class _Open:
    """An open collection in the event stream."""

    __slots__ = ("mapping", "keyed", "seen", "key")

    def __init__(self, mapping: bool, keyed: bool) -> None:
        self.mapping, self.keyed = mapping, keyed
        self.seen = 0
        self.key: str = ""

    def child(self, event: Any) -> str | int | None:
        """The key of the node ``event`` starts; None when it is a mapping's key."""
        self.seen += 1
        if not self.mapping:
            return self.seen - 1
        if self.seen % 2:  # keys and values alternate
            self.key = str(event.value) if isinstance(event, yaml.ScalarEvent) else "?"
            # a collection used as a key still nests: name it "?"
            return "?" if isinstance(event, yaml.CollectionStartEvent) else None
        return self.key


def read_run_file(path: Path) -> Any:
    """The YAML (or JSON) document in ``path``; exits with one line when it cannot be
    read, parsed, or is nested or sized past the limits."""
    max_depth, max_bytes = limits()
    try:
        text = path.read_text()
        deep = too_deep_in_yaml(text, max_depth)
        if deep is not None:
            where, line, column = deep
            raise fail(
                f"{path}: {where} (line {line}, column {column}) is nested deeper than "
                f"{max_depth} levels (the limit, {MAX_DEPTH_SETTING}); flatten it"
            )
        doc = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())  # PyYAML's messages span lines
        raise fail(f"cannot read {path}: {detail}") from None
    check(doc, f"{path}", max_depth, max_bytes)
    return doc


def check(value: Any, what: str, max_depth: int, max_bytes: int) -> None:
    """Exit with one line when ``value`` nests or weighs past the limits (what YAML
    aliases can build; and a run request must fit one message anyway)."""
    error = check_json(
        value, max_depth=max_depth, max_bytes=max_bytes, bytes_setting=MAX_PAYLOAD_SETTING
    )
    if error is not None:
        raise fail(f"{what}: {error.message}")


def parse_json(text: str, what: str) -> Any:
    """``text`` as JSON, or exit with one line (deep nesting included)."""
    max_depth, max_bytes = limits()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # json gives up near 1,000 levels, cleanly
        raise fail(f"{what}: {too_deep('$', max_depth=max_depth).message}") from None
    check(value, what, max_depth, max_bytes)
    return value
