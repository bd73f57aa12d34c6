#!/bin/sh
# Run one agentloom service:  loom-entrypoint [service] [args...]
#   no argument  -> python -m loom_services.$LOOM_SERVICE
#   a service    -> python -m loom_services.<service> [args...]
#   anything else is run as a command (e.g. `python -m loom_services.health executor`).
set -eu
case "${1:-}" in
    "")
        exec python -m "loom_services.${LOOM_SERVICE:?set LOOM_SERVICE or pass a service name}"
        ;;
    executor | planner | toolrunner | memory | tracing)
        service="$1"
        shift
        exec python -m "loom_services.${service}" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
