"""Garbage-collection probe for ``bench/tails.py`` (imported by every Python process
whose PYTHONPATH holds this folder, when LOOM_TAILPROBE_DIR is set): each collection
of generation 1 or 2, and any that took over 0.2 ms, with its wall start time, written
to ``gc-<pid>.txt`` in that folder at exit. Nothing happens without the variable."""

import os

if os.environ.get("LOOM_TAILPROBE_DIR"):
    import atexit
    import gc
    import sys
    import time

    _DIR = os.environ["LOOM_TAILPROBE_DIR"]
    _rows: list[str] = []
    _start = [0.0, 0.0]
    _young = [0, 0.0]  # count, total seconds of quick gen-0 collections

    def _gc_probe(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _start[0] = time.time()
            _start[1] = time.perf_counter()
            return
        took = time.perf_counter() - _start[1]
        if info["generation"] or took > 0.0002:
            _rows.append(
                f"{_start[0]:.6f} {took * 1000:.3f} {info['generation']} {info['collected']}\n"
            )
        else:
            _young[0] += 1
            _young[1] += took

    gc.callbacks.append(_gc_probe)

    def _dump() -> None:
        if not os.path.isdir(_DIR):
            return
        with open(f"{_DIR}/gc-{os.getpid()}.txt", "w") as out:
            out.write(
                "# " + " ".join(sys.argv) + f" | young {_young[0]} {_young[1] * 1000:.1f} ms\n"
            )
            out.writelines(_rows)

    atexit.register(_dump)
