"""Secrets: references, and redaction of values that arrive inline anyway. Pure.

Design notes
- A secret travels by reference: ``{{ secrets.NAME }}`` (grammar in
  ``loom_core.templating``, which copies it verbatim when rendering). The executor
  records, on each ``tool_call_requested``, where in the tool input the *plan* wrote
  references (:func:`reference_sites`); the tool-runner resolves only those
  (:func:`resolve`), right before the call. A reference that reaches a tool input as
  data (from the run input, a tool's output, a model) is never resolved: a fetched page
  saying ``{{ secrets.OPENAI_KEY }}`` must not make the next tool send that key away. A
  string whose references differ from what the plan wrote there fails the call
  (``untrusted_secret_reference``), and so does a request the executor did not store
  (the tool-runner asks before resolving anything).
- Secret-looking keys (:func:`is_secret_key`), case-insensitive, on the words of the key
  (``apiKey``, ``X-Api-Key`` and ``api_key`` are the words api + key):
  - a word anywhere: password, passwd, passphrase, secret(s), token, authorization,
    cookie(s), credential(s), apikey, accesskey, privatekey, secretkey, bearer;
  - a word that contains password, passwd, passphrase, secret, credential,
    authorization, cookie, apikey, accesskey or privatekey, or ends with token
    (``dbpassword``, ``githubtoken``);
  - the last word pass, pwd or auth (``db_pass``, ``basic_auth``);
  - the word pairs api key, access key, private key, signing key, encryption key, master
    key, ssh key;
  - but not when the last word says the value is about the secret, not the secret:
    count(s), limit(s), tokens, type, kind, length, ttl, name, url, uri, endpoint
    (``max_tokens``, ``token_count``, ``token_type``, ``token_url``).
  Keys are never rewritten; ``key``, ``jwt``, ``id`` alone are not secret-looking.
- Credential-shaped text (:func:`scrub_text`), masked wherever it appears: ``Bearer``,
  ``Basic`` and ``Token`` credentials (8+ token characters with a digit, a ``=`` pad, or
  20+ characters, so prose like "bearer authentication" survives), ``sk-`` keys, JSON Web
  Tokens, GitHub/Slack/AWS access keys, PEM private keys and passwords in URLs
  (``scheme://user:password@``). A reference (``{{ ... }}``) never matches.
- Stored data (:func:`redact_value`): every string at any depth under a secret-looking
  key becomes :data:`MARKER`, except empty strings, the marker itself and strings that
  are only secret references (with an optional auth scheme word and separators, e.g.
  ``"Bearer {{ secrets.TOKEN }}"``). Numbers, booleans and null are kept (a count or a
  flag is not a credential; ``max_tokens: 100`` must reach the tool). Other strings get
  :func:`scrub_text`. Keys, types and shapes never change. Each replaced string is
  reported by its JSON path (at most :data:`MAX_REPORTED`, then a count).
- A run request (:func:`redact_request`): its input, labels, a fork's reused outputs,
  and in its plan the data fields of every step (tool/sub-run ``input``, approval
  ``payload``, ``output``, ``items``, ``initial``) are redacted as stored data; the
  natural-language ``request`` gets :func:`scrub_text`. The rest of a plan (ids,
  schemas, predicates) is structure: an approval schema with a ``password`` property
  must stay a schema.
- Values the tool-runner resolved are scrubbed from what a tool returns
  (:func:`scrub_values`) on the JSON encoding: every occurrence, in keys and values, of
  each value (and its URL-encoded forms) becomes the marker. Values shorter than
  :data:`MIN_SCRUB_LENGTH` are not scrubbed (they would match everywhere).
- Redaction is idempotent: redacting a redacted value changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import quote, quote_plus

import msgspec

from loom_core.contracts import ErrorInfo, RunRequest
from loom_core.errors import LoomError
from loom_core.templating import OPEN, SECRET_NAME, SECRETS_ROOT, child_path, scan_templates

JSON = Any

MARKER = "[redacted]"
MAX_REPORTED = 100
MIN_SCRUB_LENGTH = 4

NAME_RE = re.compile(rf"{SECRET_NAME}\Z")
# A reference as it appears in a rendered string (templating copies it verbatim).
REFERENCE_RE = re.compile(rf"\{{\{{\s*{SECRETS_ROOT}\.({SECRET_NAME})\s*\}}\}}")


def is_secret_name(name: str) -> bool:
    return NAME_RE.match(name) is not None


# --------------------------------------------------------------------------- keys

_ANYWHERE = frozenset(
    {
        "password", "passwd", "passphrase", "secret", "secrets", "token", "authorization",
        "cookie", "cookies", "credential", "credentials", "apikey", "accesskey",
        "privatekey", "secretkey", "bearer",
    }
)  # fmt: skip
_INSIDE = (
    "password", "passwd", "passphrase", "secret", "credential", "authorization", "cookie",
    "apikey", "accesskey", "privatekey",
)  # fmt: skip
_LAST = frozenset({"pass", "pwd", "auth"})
_PAIRS = frozenset(
    {
        ("api", "key"), ("access", "key"), ("private", "key"), ("signing", "key"),
        ("encryption", "key"), ("master", "key"), ("ssh", "key"),
    }
)  # fmt: skip
_ABOUT = frozenset(
    {
        "count", "counts", "limit", "limits", "tokens", "type", "kind", "length", "ttl",
        "name", "url", "uri", "endpoint",
    }
)  # fmt: skip
_WORD_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def key_words(key: str) -> list[str]:
    """``"X-ApiKey_id"`` -> ``["x", "api", "key", "id"]``: camelCase, acronyms and any
    separator split words."""
    return [w.lower() for w in _WORD_RE.findall(key)]


@lru_cache(maxsize=8192)
def is_secret_key(key: object) -> bool:
    """Does an object key name a secret (see the module notes for the list)?"""
    if not isinstance(key, str):
        return False
    words = key_words(key)
    if not words or words[-1] in _ABOUT:
        return False
    if words[-1] in _LAST:
        return True
    for word in words:
        if word in _ANYWHERE or word.endswith("token"):
            return True
        if any(part in word for part in _INSIDE):
            return True
    return any(pair in _PAIRS for pair in zip(words, words[1:], strict=False))


# --------------------------------------------------------------------------- text

_CRED_CHARS = r"[A-Za-z0-9._~+/-]"


def _credential(match: re.Match[str]) -> str:
    token = match.group(2)
    if len(token) >= 20 or token.endswith("=") or any(c.isdigit() for c in token):
        return f"{match.group(1)} {MARKER}"
    return match.group(0)


_TEXT_PATTERNS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    # an Authorization header's credentials inside a string
    (re.compile(rf"\b(Bearer|Basic|Token)\s+({_CRED_CHARS}{{8,}}=*)", re.IGNORECASE), _credential),
    # OpenAI/Anthropic-style keys: sk-..., sk-proj-..., sk-ant-...
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "sk-" + MARKER),
    # JSON Web Tokens
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), MARKER),
    # GitHub, Slack and AWS access keys
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), MARKER),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), MARKER),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), MARKER),
    # PEM private keys (a cut-off one too: a dead letter may end inside it)
    (
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*)",
            re.DOTALL,
        ),
        MARKER,
    ),
    # passwords in URLs: scheme://user:password@host ("{" keeps references intact)
    (
        re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@{]+):[^/\s@{]+@"),
        r"\1:" + MARKER + "@",
    ),
)
# Cheap substring checks before the patterns (a case-insensitive regex alternation costs
# ~50 ns per character; text without any of these cannot match).
_HINTS = ("bearer", "basic", "token", "sk-", "eyj", "xox", "akia", "private key", "://")


def _may_hold_credentials(text: str) -> bool:
    if len(text) < 8:  # shorter than the shortest pattern (`a://b:c@`)
        return False
    lowered = text.lower()
    if any(hint in lowered for hint in _HINTS):
        return True
    return "_" in text and ("gh" in text or "github" in text)


def scrub_text(text: str) -> str:
    """``text`` with credential-shaped parts masked (see the module notes)."""
    if not _may_hold_credentials(text):
        return text  # the common case: no pattern can match
    for pattern, replacement in _TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# Text that is not JSON (a dead letter that failed to parse): `"key": "value"` pairs
# and `key: value` / `key=value` forms whose key looks secret.
_RAW_JSON_PAIR = re.compile(r'"((?:[^"\\]|\\.){1,128})"(\s*:\s*)"((?:[^"\\]|\\.)*)("?)')
_RAW_PAIR = re.compile(r"([A-Za-z][A-Za-z0-9_.-]{0,63})(\s*[:=]\s*)([^\s&,;\"'}]+)")


def _raw_json_pair(match: re.Match[str]) -> str:
    key, sep, value, end = match.groups()
    if is_secret_key(key) and value and value != MARKER and not _only_references(value):
        return f'"{key}"{sep}"{MARKER}{end}'
    return match.group(0)


def _raw_pair(match: re.Match[str]) -> str:
    key, sep, value = match.groups()
    if is_secret_key(key) and value != MARKER and not value.startswith("{{"):
        return f"{key}{sep}{MARKER}"
    return match.group(0)


def scrub_raw_text(text: str) -> str:
    """Text that could not be parsed as JSON (e.g. a malformed submission): values of
    secret-looking keys in ``"key": "value"``, ``key: value`` and ``key=value`` forms,
    then :func:`scrub_text`."""
    text = _RAW_JSON_PAIR.sub(_raw_json_pair, text)
    text = _RAW_PAIR.sub(_raw_pair, text)
    return scrub_text(text)


# --------------------------------------------------------------------------- values

_SCHEME_ONLY = re.compile(
    r"\s*(?:(?:Bearer|Basic|Token|Bot|Digest|ApiKey|Key)\b)?[\s:;,=/._-]*\Z", re.IGNORECASE
)


def _only_references(text: str) -> bool:
    """True when ``text`` holds secret references and nothing that could be a value:
    ``"Bearer {{ secrets.T }}"``, ``"{{ secrets.USER }}:{{ secrets.PASS }}"``."""
    if OPEN not in text:
        return False
    rest, count = REFERENCE_RE.subn("", text)
    return count > 0 and _SCHEME_ONLY.match(rest) is not None


Trail = tuple[str | int, ...]


def _format(path: str, trail: Trail) -> str:
    for key in trail:
        path = child_path(path, key)
    return path


# A trail as a linked list (parent link, key): O(1) per node; a tuple is built only for
# the few strings that change.
_Link = tuple[Any, str | int] | None
_SCALARS = (int, float, bool, type(None))


def _trail(link: _Link) -> Trail:
    keys: list[str | int] = []
    while link is not None:
        link, key = link
        keys.append(key)
    return tuple(reversed(keys))


def _replacement(text: str, secret: bool) -> str | None:
    """What a string becomes, or None when it stays."""
    if secret:
        if text and text != MARKER and not _only_references(text):
            return MARKER
        return None
    scrubbed = scrub_text(text)
    return scrubbed if scrubbed != text else None


def _changes(value: JSON, under: bool) -> list[tuple[Trail, str]]:
    """Every string to replace, with its trail of keys (an object's own strings before
    its nested ones). Iterative: depth is the decoder's business, not Python's
    recursion limit."""
    found: list[tuple[Trail, str]] = []
    if isinstance(value, str):
        new = _replacement(value, under)
        return [((), new)] if new is not None else []
    todo: list[tuple[JSON, _Link, bool]] = [(value, None, under)]
    while todo:
        node, link, secret = todo.pop()
        if isinstance(node, Mapping):
            items: Iterable[tuple[str | int, Any]] = node.items()
        elif isinstance(node, list | tuple):
            items = enumerate(node)
        else:
            continue
        later: list[tuple[JSON, _Link, bool]] = []
        for key, item in items:
            if type(item) in _SCALARS:
                continue
            inner = secret or (type(key) is str and is_secret_key(key))
            if type(item) is str:
                new = _replacement(item, inner)
                if new is not None:
                    found.append((_trail((link, key)), new))
            else:
                later.append((item, (link, key), inner))
        todo += reversed(later)  # nested values in document order
    return found


def _apply(value: JSON, changes: Sequence[tuple[Trail, str]]) -> JSON:
    """A copy of ``value`` with ``changes`` made; only containers on a changed trail are
    copied, the rest is shared with ``value`` (never mutated)."""
    if len(changes) == 1 and changes[0][0] == ():
        return changes[0][1]
    root: Any = dict(value) if isinstance(value, Mapping) else list(value)
    copies: dict[Trail, Any] = {(): root}
    for trail, new in changes:
        node: Any = root
        for depth in range(1, len(trail)):
            prefix = trail[:depth]
            copied = copies.get(prefix)
            if copied is None:
                child = node[trail[depth - 1]]
                copied = dict(child) if isinstance(child, Mapping) else list(child)
                node[trail[depth - 1]] = copied
                copies[prefix] = copied
            node = copied
        node[trail[-1]] = new
    return root


def _report(paths: list[str]) -> list[str]:
    if len(paths) <= MAX_REPORTED:
        return paths
    return [*paths[:MAX_REPORTED], f"... and {len(paths) - MAX_REPORTED} more"]


def redact_value(value: JSON, path: str = "$", *, secret: bool = False) -> tuple[JSON, list[str]]:
    """``value`` (JSON) with inline secrets replaced, and the JSON paths replaced (see
    the module notes). ``secret``: ``value`` itself sits under a secret-looking key.
    Returns ``value`` itself when nothing changes; never mutates it."""
    changes = _changes(value, secret)
    if not changes:
        return value, []
    return _apply(value, changes), [_format(path, trail) for trail, _ in changes]


# --------------------------------------------------------------------------- requests

_DATA_FIELDS = ("input", "payload", "output", "items", "initial")
_BODY_FIELDS = ("do", "then", "else")


def _redact_plan(plan: dict[str, Any], path: str, paths: list[str]) -> None:
    """Redact the data fields of a plan (as builtins, in place), adding to ``paths``."""
    plans: list[tuple[dict[str, Any], str]] = [(plan, path)]
    while plans:
        current, where = plans.pop()
        if "output" in current:
            current["output"], found = redact_value(current["output"], f"{where}.output")
            paths += found
        steps: list[tuple[Any, str]] = [
            (s, f"{where}.steps[{i}]") for i, s in enumerate(current.get("steps", []))
        ]
        while steps:
            step, at = steps.pop()
            if not isinstance(step, dict):
                continue
            for name in _DATA_FIELDS:
                if name in step:
                    step[name], found = redact_value(step[name], child_path(at, name))
                    paths += found
            for name in _BODY_FIELDS:
                body = step.get(name)
                if isinstance(body, list):
                    steps += [(s, f"{child_path(at, name)}[{i}]") for i, s in enumerate(body)]
            for branch, body in (step.get("branches") or {}).items():
                where_branch = child_path(child_path(at, "branches"), branch)
                steps += [(s, f"{where_branch}[{i}]") for i, s in enumerate(body)]
            if isinstance(step.get("fallback"), dict):
                steps.append((step["fallback"], child_path(at, "fallback")))
            if isinstance(step.get("plan"), dict):
                plans.append((step["plan"], child_path(at, "plan")))


def redact_request(request: RunRequest) -> tuple[RunRequest, tuple[str, ...]]:
    """``request`` with inline secrets replaced, and the JSON paths replaced (for
    ``RunRequested.redacted``). Pure; the request itself is returned when nothing
    changes."""
    paths: list[str] = []
    data = msgspec.to_builtins(request)
    for name in ("input", "labels"):
        if name in data:
            data[name], found = redact_value(data[name], f"$.{name}")
            paths += found
    if isinstance(data.get("request"), str):
        text = scrub_text(data["request"])
        if text != data["request"]:
            data["request"] = text
            paths.append("$.request")
    fork = data.get("fork")
    if isinstance(fork, dict) and "reused" in fork:
        fork["reused"], found = redact_value(fork["reused"], "$.fork.reused")
        paths += found
    if isinstance(data.get("plan"), dict):
        _redact_plan(data["plan"], "$.plan", paths)
    if not paths:
        return request, ()
    return msgspec.convert(data, RunRequest), tuple(_report(paths))


# --------------------------------------------------------------------------- references


def reference_sites(value: JSON) -> dict[str, list[str]]:
    """Where a plan's value (a tool step's ``input``, before rendering) holds secret
    references: JSON path of each string (``$`` is the value) -> the names in it, in
    order. Malformed templates are the validator's business: they are skipped here."""
    refs, _ = scan_templates(value)
    sites: dict[str, list[str]] = {}
    for ref in refs:
        if ref.root == SECRETS_ROOT:
            sites.setdefault(ref.path, []).append(str(ref.segments[0]))
    return sites


class SecretReferenceError(LoomError):
    """A reference the tool-runner cannot resolve; ``error`` is the typed refusal."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


Lookup = Callable[[str], str | None]


def resolve(
    value: JSON, sites: Mapping[str, Sequence[str]], lookup: Lookup, step: str = ""
) -> tuple[JSON, list[str]]:
    """``value`` (a rendered tool input) with the references at ``sites`` replaced by the
    secrets ``lookup`` gives, and the values used (to scrub them from the result).
    Strings elsewhere are left as they are, references or not. Raises
    :class:`SecretReferenceError`: ``secret_not_found`` (names the secret and where it
    is referenced, never a value) or ``untrusted_secret_reference`` (the string holds
    references the plan did not write there)."""
    if not sites:
        return value, []
    changes: list[tuple[Trail, str]] = []
    used: list[str] = []
    todo: list[tuple[JSON, Trail]] = [(value, ())]
    while todo:
        node, trail = todo.pop()
        if isinstance(node, str):
            path = _format("$", trail)
            names = sites.get(path)
            if names is not None:
                changes.append((trail, _substitute(node, list(names), path, lookup, used, step)))
        elif isinstance(node, Mapping):
            todo += [(item, (*trail, key)) for key, item in node.items()]
        elif isinstance(node, list | tuple):
            todo += [(item, (*trail, index)) for index, item in enumerate(node)]
    if not changes:
        return value, used
    return _apply(value, changes), used


def _substitute(
    text: str, names: list[str], path: str, lookup: Lookup, used: list[str], step: str
) -> str:
    where = f"the input of step {step!r}" if step else "the tool input"
    found = [m.group(1) for m in REFERENCE_RE.finditer(text)]
    if found != names:
        raise SecretReferenceError(
            ErrorInfo(
                code="untrusted_secret_reference",
                message=f"{where} holds secret references {found} at {path}, but the plan "
                f"wrote {names} there: a reference that arrives as data (the run's input, "
                "a tool's or a model's output) is never resolved",
                path=path,
                details={"expected": names, "found": found},
            )
        )
    values: dict[str, str] = {}
    for name in names:
        secret = lookup(name)
        if secret is None:
            raise SecretReferenceError(
                ErrorInfo(
                    code="secret_not_found",
                    message=f"secret {name!r}, referenced in {where} at {path}, is not "
                    f"defined in the tool-runner's secret source: set LOOM_SECRET_{name} or "
                    f"put a file named {name} in LOOM_SECRETS_DIR",
                    path=path,
                    details={"secret": name},
                )
            )
        values[name] = secret
        used.append(secret)
    return REFERENCE_RE.sub(lambda m: values[m.group(1)], text)


# --------------------------------------------------------------------------- scrubbing


def scrub_forms(values: Iterable[str]) -> list[str]:
    """The forms of each resolved value to scrub: as is and URL-encoded, longest first
    (so a longer form is never half-replaced by a shorter one)."""
    forms: set[str] = set()
    for value in values:
        if len(value) >= MIN_SCRUB_LENGTH:
            forms |= {value, quote(value, safe=""), quote_plus(value)}
    return sorted(forms, key=len, reverse=True)


def scrub_values(value: JSON, forms: Sequence[str]) -> JSON:
    """``value`` (JSON) with every occurrence of each of ``forms`` (see
    :func:`scrub_forms`), in keys and strings, replaced by the marker. Works on the JSON
    encoding, i.e. on exactly what is stored. If a replacement ever broke the encoding,
    the whole value becomes the marker: losing an output beats leaking a secret."""
    if not forms:
        return value
    data = msgspec.json.encode(value)
    scrubbed = data
    for form in forms:
        encoded = msgspec.json.encode(form)[1:-1]  # as it appears inside a JSON string
        scrubbed = scrubbed.replace(encoded, MARKER.encode())
    if scrubbed == data:
        return value
    try:
        return msgspec.json.decode(scrubbed)
    except msgspec.DecodeError:
        return MARKER


def scrub_str(text: str, forms: Sequence[str]) -> str:
    for form in forms:
        text = text.replace(form, MARKER)
    return scrub_text(text)
