"""Readiness/liveness probe: ``python -m loom_services.health <service>`` exits 0 when
the service answers on ``loom.health.<service>``, 1 otherwise (Kubernetes exec probe)."""

from __future__ import annotations

import asyncio
import sys

from loom_infra.client import LoomClient
from loom_infra.settings import settings_from_env


async def probe(service: str) -> bool:
    try:
        settings = settings_from_env()
        # the pod's own key (LOOM_NKEY_SEED_FILE): a service may ping its own health
        seed = settings.seed_file_for(service)
        async with await LoomClient.connect(
            settings.nats_url, "loom-probe", seed=seed, identity=service
        ) as c:
            await c.ping(service, timeout=2.0)
    except Exception:
        return False
    return True


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m loom_services.health <service>", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if asyncio.run(probe(sys.argv[1])) else 1)


if __name__ == "__main__":
    main()
