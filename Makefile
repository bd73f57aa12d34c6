# One task runner: the README's two commands and CI call these recipes.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install chromium demo test unit lint proto bench chaos clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m loom_infra.embedders install-model  # the default embedder's weights
	touch $@

install: $(VENV)/.installed chromium

## The console's browser tests drive Debian's `chromium` (Playwright never downloads a
## browser here): installed with apt-get when missing and run as root; otherwise say how.
chromium:
	@if [ -n "$$LOOM_CHROMIUM" ] || command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt-get) for the console's browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "note: no chromium: the console's browser tests will be skipped. Install it" \
			"(sudo apt-get install chromium) or set LOOM_CHROMIUM to a Chromium binary."; \
	fi

## README command 1: start the embedded stack, run the demo plan, print output and trace.
demo: install
	$(VENV)/bin/loom demo

## README command 2: lint, format, types, proto freshness, unit + integration + end-to-end tests.
test: install lint
	$(PY) -m pytest

## The checks that need no server: lint, format, types.
lint: install
	$(VENV)/bin/ruff check libs services tests bench
	$(VENV)/bin/ruff format --check libs services tests bench
	$(VENV)/bin/mypy

## The unit tests: the pure core and what needs no long-lived stack (about 30 s).
unit: install
	$(PY) -m pytest tests/unit -q

proto: install
	$(PY) -m loom_infra.proto_gen proto

bench: install
	$(PY) bench/steps.py --steps 200 --store sqlite
	$(PY) bench/steps.py --steps 200 --store postgres

## Fault injection: kill -9 executor, tool-runner, planner and nats-server during
## 50 runs x 10 steps; prints kills, runs, effects, recovery p50/max; fails on a violation.
chaos: install
	$(PY) bench/chaos.py --runs 50 --steps 10 --kills 4 --seed 1

clean:
	rm -rf $(VENV) .loom
