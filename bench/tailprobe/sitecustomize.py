"""Probes for ``bench/tails.py`` (imported by every Python process whose PYTHONPATH
holds this folder, when LOOM_TAILPROBE_DIR is set). Nothing happens without the variable.

- Garbage collection, in every process: each collection of generation 1 or 2, and any
  that took over 0.2 ms, with its wall start time, written to ``gc-<pid>.txt`` in that
  folder at exit.
- The tracing read model, in its child process only: each fold (a fetched batch
  handled, ``tracing fold``), each span-store save within it (``tracing save``) and each
  stretch it spent under the normal CPU policy instead of ``SCHED_IDLE`` (``tracing
  normal policy``, ``loom_infra.cpu_priority``), written to ``marks-<pid>.txt``.
  Patched on the shared classes, not on the module: ``python -m loom_services.tracing``
  runs the module as ``__main__``, a second copy."""

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

    def _is_tracing_child() -> bool:
        try:
            with open("/proc/self/cmdline", "rb") as f:
                return b"loom_services.tracing" in f.read()
        except OSError:
            return False

    if _is_tracing_child():
        from loom_infra import bus, cpu_priority, spanstore

        _marks: list[str] = []
        _normal_since = [0.0]

        def _mark(kind: str, start: float, label: str = "") -> None:
            _marks.append(f"{start:.6f} {time.time():.6f} {kind.replace(' ', '_')} {label}\n")

        _dispatch = bus._AckAll.dispatch

        async def _timed_dispatch(self, msgs):  # type: ignore[no-untyped-def]
            start = time.time()
            try:
                return await _dispatch(self, msgs)
            finally:
                _mark("tracing fold", start, str(len(msgs)))

        bus._AckAll.dispatch = _timed_dispatch  # type: ignore[method-assign]
        _save = spanstore.SpanStore.save

        def _timed_save(self, run_id, records, spans, summary=None):  # type: ignore[no-untyped-def]
            start = time.time()
            try:
                return _save(self, run_id, records, spans, summary)
            finally:
                _mark("tracing save", start, f"{len(records)}/{len(spans)}")

        spanstore.SpanStore.save = _timed_save  # type: ignore[method-assign]
        _saw = cpu_priority.IdleWhileCaughtUp.saw

        def _timed_saw(self, pending, age_s=0.0):  # type: ignore[no-untyped-def]
            was = self.idle
            _saw(self, pending, age_s)
            if was and not self.idle:
                _normal_since[0] = time.time()
            elif self.idle and not was:
                _mark("tracing normal policy", _normal_since[0], str(pending))

        cpu_priority.IdleWhileCaughtUp.saw = _timed_saw  # type: ignore[method-assign]

        def _dump_marks() -> None:
            if not os.path.isdir(_DIR):
                return
            with open(f"{_DIR}/marks-{os.getpid()}.txt", "w") as out:
                out.writelines(_marks)

        atexit.register(_dump_marks)
