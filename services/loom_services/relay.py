"""The relay as its own process: ``python -m loom_services.relay``.

The executor runs a relay in-process (woken after each commit); this entry point runs
one alone over the same store, e.g. to republish after restoring JetStream, or in the
crash tests. ``LOOM_RELAY_BATCH`` sets how many events go out per batch.
"""

from __future__ import annotations

from loom_infra.relay import Relay
from loom_infra.settings import Settings
from loom_infra.store import open_event_store
from loom_services.runtime import ServiceContext, run_main


class RelayService:
    name = "relay"
    identity = "executor"  # the executor's relay: it connects with the executor's key

    def __init__(self, settings: Settings) -> None:
        self.store = open_event_store(settings.store)
        self.batch = settings.delivery.relay_batch

    async def start(self, ctx: ServiceContext) -> None:
        self.relay = Relay(self.store, ctx.js, batch=self.batch)
        ctx.spawn(self.relay.run(ctx.stop), "relay")

    async def close(self) -> None:
        await self.relay.io.close()
        self.store.close()


def main() -> None:
    run_main(lambda settings: [RelayService(settings)])


if __name__ == "__main__":
    main()
