"""The garbage collector paused while a large state is rebuilt.

Decoding a run's snapshot creates hundreds of thousands of container objects at once;
each few hundred allocations trigger a young collection and, as they survive, full ones
that walk everything created so far, so the collector's work grows with the square of
the state. Measured on a 20,000-step chain's 15 MB snapshot: 358 ms to decode with the
collector on, 90 ms with it paused (issue 10). Nothing built there is garbage, so there
is nothing to miss; the collector resumes as soon as the rebuild ends.

Resuming is not the end of it: the decoded objects are then the youngest generation,
so the first allocation after the block walks all of them (a gen-0 collection), and
they are walked again on their way to the oldest generation. For that 20,000-step
chain: 40-70 ms, on whatever thread allocates next (often the event loop). A state is
long-lived by nature, so the block ends by moving everything young straight to the
oldest generation (``gc.freeze()`` then ``gc.unfreeze()``: two list splices, O(1)).
Nothing is lost to the collector: the oldest generation is walked by every full
collection, as it would have been after two promotions. It is skipped for a small
block (``MOVE_AT_LEAST``), where the collector's own pace costs less than promoting
everything young.

When something else froze objects on purpose (``gc.get_freeze_count()``: a service
freezes its start-up heap), unfreezing would hand those back to the collector, and
freezing the state with them would keep for ever any cycle alive at that moment. The
block then ends with an ordinary collection of the two young generations
(``gc.collect(1)``): the decoded objects are walked once, there, on the thread that
rebuilt, and go to the oldest generation, instead of being walked by the next young
collection and again by the next middle one. What that walk costs is kept small by the
state itself: steps and instances are never tracked (``gc=False``, see
``loom_core.executor.Inst``), so a 20,000-step chain leaves ~80,000 tracked objects
(~7 ms), not ~180,000 (~35 ms) (docs/decisions.md, "Performance, fourteenth part").
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Young objects a block must leave for the move to pay. Every run's first load passes
# here (a few hundred objects): moving the young generation each time would promote
# the garbage of many runs starting at once to the oldest generation.
MOVE_AT_LEAST = 50_000

_lock = threading.Lock()
_depth = 0  # rebuilds under way (several threads may rebuild at once)
_was_enabled = False
_heap_frozen = False  # ``freeze_heap`` ran: the frozen list is not empty, no need to walk it


def freeze_heap() -> None:
    """Collect, then freeze everything alive (``runtime.freeze_startup_objects``), and
    remember it: the end of a large ``paused`` block then knows without walking the
    frozen list that it must not unfreeze. If something unfreezes later, a block only
    takes the slower of its two ways (a collection instead of the move)."""
    global _heap_frozen
    gc.collect()
    gc.freeze()
    _heap_frozen = True


@contextmanager
def paused() -> Iterator[None]:
    """The collector off for the block (process-wide: it is one for all threads), then
    back as it was once the last overlapping block ends."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                # the count first, then the flag: ``get_freeze_count`` walks the frozen
                # list (a service froze ~200k objects at start: 1-5 ms), at every run's
                # load it cut 50 runs' throughput from ~3,900 to ~760 steps/s; it is
                # O(1) when nothing is frozen
                if gc.get_count()[0] >= MOVE_AT_LEAST:
                    if not _heap_frozen and gc.get_freeze_count() == 0:
                        gc.freeze()  # young objects: to the permanent generation...
                        gc.unfreeze()  # ...and from it to the oldest one
                    else:  # a service: walked once, here, on their way to the oldest
                        # (under the lock: nothing a collection runs loads a run)
                        gc.collect(1)
                if _was_enabled:
                    gc.enable()
