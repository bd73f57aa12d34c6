"""Examples shown at the end of each command's ``--help``: kept in one place so every
verb has them and they read alike (``add_examples`` appends them at import)."""

from __future__ import annotations

import inspect

import typer

__all__ = ["EXAMPLES", "add_examples"]

EXAMPLES: dict[str, list[str]] = {
    "up": [
        "loom up",
        "loom up --port 4333 --data-dir /tmp/loom-dev",
        "loom up --no-console   # no web console",
    ],
    "console": [
        "loom console   # then open http://127.0.0.1:8484/",
        "loom console --port 0 --nats nats://127.0.0.1:4333",
    ],
    "run": [
        "loom run examples/hello-dag.yaml -i name=Ada",
        'loom run plan.yaml --input-json \'{"urls": ["https://example.com"]}\' -o json',
        "loom run their-plan.yaml --format plan-execute",
        "loom run plan.yaml --run-id order-17   # again: follows, never starts twice",
    ],
    "follow": ["loom follow run-3f2a…", "loom follow run-3f2a… -o json"],
    "convert": ["loom convert their-plan.yaml", "loom convert their-plan.yaml -o json > plan.json"],
    "runs": ["loom runs", "loom runs --status failed --limit 10", "loom runs --suspended -o json"],
    "show": ["loom show RUN", "loom show RUN -o jsonl > run.jsonl   # an export"],
    "trace": ["loom trace RUN", "loom trace RUN --rebuild -o json"],
    "thread": ["loom thread RUN"],
    "demo": ["loom demo", "loom demo --file examples/foreach.yaml"],
    "describe": ["loom describe RUN", "loom describe RUN -o json"],
    "cancel": ["loom cancel RUN --reason 'wrong input'"],
    "pause": ["loom pause RUN --reason 'maintenance'"],
    "unpause": ["loom unpause RUN"],
    "signal": ["loom signal payment A-17 --data '{\"amount\": 12}'"],
    "resume": ["loom resume RUN --label manager --data '{\"approved\": true}'"],
    "state": ["loom state RUN --at 5", "loom state run.jsonl"],
    "replay": ["loom replay RUN", "loom replay run.jsonl -o json"],
    "fork": ["loom fork RUN --from-step summarise", "loom fork RUN --from-step b --no-follow"],
    "diff": ["loom diff RUN FORK", "loom diff a.jsonl b.jsonl -o json"],
    "traces": ["loom traces --since 1h --status failed", "loom traces --tool http_get -o json"],
    "usage": ["loom usage --by model --since 1d"],
    "slowest": ["loom slowest --since 1h --limit 5"],
    "rebuild-traces": ["loom rebuild-traces --since 2d", "loom rebuild-traces --run RUN"],
    "provision": ["loom provision"],
    "blob": [
        "loom blob put value.json",
        "loom blob get sha256:9f2c… --out value.json",
        "loom blob info sha256:9f2c…",
        "LOOM_TENANT=acme loom blob get sha256:9f2c… --run RUN_ID   # through its run",
    ],
    "mcp": ["loom mcp   # stdio: add it to an MCP client's servers", "loom mcp --http 8765"],
    "tools": ["loom tools", "loom tools show time.get_current_time", "loom tools -o json"],
    "memory": [
        'loom memory add "I prefer window seats" --user alice --tenant acme',
        'loom memory search "where do I sit on planes" --user alice --tenant acme',
        "loom memory working get --user alice --tenant acme",
    ],
    "knowledge": [
        "loom knowledge add handbook docs/handbook.md",
        'loom knowledge search handbook "how do I deploy"',
    ],
    "creds": ["loom creds generate --out deploy/creds", "loom creds matrix"],
    "dead-letters": [
        "loom dead-letters",
        "loom dead-letters --rejects -o json",
        "loom dead-letters --after 120 --limit 20",
        "LOOM_TENANT=acme loom dead-letters   # acme's own only",
    ],
    "schedule": [
        "loom schedule create nightly examples/hello-dag.yaml --cron '0 2 * * *' "
        "--tz Europe/Lisbon -i name=Ada",
        "loom schedule create poll examples/hello-dag.yaml --every 10m --catch-up none",
        "loom schedule create once examples/hello-dag.yaml --at 2026-12-05T09:00Z",
        "loom schedule list",
        "loom schedule describe nightly -o json",
        "loom schedule list --every-tenant   # the platform's operator: every tenant's",
        "loom schedule describe nightly --tenant acme",
        "loom schedule pause nightly; loom schedule resume nightly",
        "loom schedule trigger nightly   # fire now, once",
        "loom schedule delete nightly",
        "loom runs   # a schedule's runs carry the label schedule=NAME",
    ],
}


def add_examples(app: typer.Typer) -> None:
    """Append an Examples section to the help of each command of ``app`` that has one
    (the help is rendered as Markdown: each example is a code line)."""
    for info in app.registered_commands:
        callback = info.callback
        if callback is None:
            continue
        name = info.name or callback.__name__.replace("_", "-")
        examples = EXAMPLES.get(name)
        if not examples:
            continue
        info.help = _with_examples(info.help or callback.__doc__ or "", examples)
    for group in app.registered_groups:  # command groups (``loom blob``, ``loom creds``)
        examples = EXAMPLES.get(group.name or "")
        instance = group.typer_instance
        if not examples or instance is None:
            continue
        instance.info.help = _with_examples(str(instance.info.help or ""), examples)


def _with_examples(help_text: str, examples: list[str]) -> str:
    # A fenced block, not an indented one: typer dedents the paragraphs after the first,
    # which turned the indented examples of a one-paragraph help into one flowed line.
    lines = "\n".join(examples)
    return f"{inspect.cleandoc(help_text)}\n\n**Examples**\n\n```\n{lines}\n```\n"
