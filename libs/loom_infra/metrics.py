"""A small metrics registry, rendered in the Prometheus text format (version 0.0.4).

Why our own: the services need a handful of counters, gauges and one histogram, and a
dependency (prometheus_client) would bring a global registry, threads and a second HTTP
server. Instruments are process-wide (``REGISTRY``): in ``loom up`` the five services
share one process and one ``/metrics``, so series that differ by service carry a
``service`` label.

Updating an instrument is a dict update on the event loop: cheap enough for the hot
path (no locks: every caller runs on the loop). A gauge may instead be computed at
scrape time (``Gauge.set_function``) so nothing has to be kept up to date by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

Labels = tuple[tuple[str, str], ...]


def _labels(values: dict[str, str]) -> Labels:
    return tuple(sorted(values.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _series(name: str, labels: Labels, extra: Labels = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return f"{name}{{{inner}}}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help

    def samples(self) -> Iterable[tuple[str, float]]:
        raise NotImplementedError

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{series} {_number(value)}" for series, value in self.samples()]
        return lines


M = TypeVar("M", bound="_Metric")  # a metric kind: _add gives back the kind it was given


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self.values: dict[Labels, float] = {}
        self.functions: dict[Labels, Callable[[], float]] = {}

    def set(self, value: float, **labels: str) -> None:
        self.values[_labels(labels)] = value

    def set_function(self, function: Callable[[], float], **labels: str) -> None:
        """Computed at each scrape (e.g. a queue's current size)."""
        self.functions[_labels(labels)] = function

    def value(self, **labels: str) -> float:
        key = _labels(labels)
        function = self.functions.get(key)
        return function() if function is not None else self.values.get(key, 0)

    def samples(self) -> Iterable[tuple[str, float]]:
        merged = dict(self.values)
        for labels, function in self.functions.items():
            try:
                merged[labels] = float(function())
            except Exception:  # a value that cannot be read now is left out of this scrape
                merged.pop(labels, None)
        for labels, value in sorted(merged.items()):
            yield _series(self.name, labels), value


class Counter(Gauge):
    """Only goes up (resets when the process restarts; Prometheus handles that). A
    function counter must be monotonic too (e.g. a position minus where it started)."""

    kind = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = _labels(labels)
        self.values[key] = self.values.get(key, 0) + amount


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help)
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = _labels(labels)
        counts = self.counts.setdefault(key, [0] * len(self.bounds))
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                counts[i] += 1
                break
        self.sums[key] = self.sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        return sum(self.counts.get(_labels(labels), ()))

    def samples(self) -> Iterable[tuple[str, float]]:
        for labels, counts in sorted(self.counts.items()):
            running = 0
            for bound, n in zip(self.bounds, counts, strict=True):
                running += n
                le = (("le", "+Inf" if math.isinf(bound) else repr(float(bound))),)
                yield _series(f"{self.name}_bucket", labels, le), running
            yield _series(f"{self.name}_sum", labels), self.sums[labels]
            yield _series(f"{self.name}_count", labels), running


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, _Metric] = {}

    def _add(self, metric: M) -> M:
        existing = self.metrics.get(metric.name)
        if existing is not None:
            # one name, one kind (isinstance tells mypy it is the kind asked for)
            assert type(existing) is type(metric) and isinstance(existing, type(metric))
            return existing
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str) -> Counter:
        return self._add(Counter(name, help))

    def gauge(self, name: str, help: str) -> Gauge:
        return self._add(Gauge(name, help))

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        return self._add(Histogram(name, help, buckets))

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self.metrics):
            lines += self.metrics[name].render()
        return "\n".join(lines) + "\n"


REGISTRY = Registry()

# --- the instruments the services update (one line at each place that counts)
EVENTS_STORED = REGISTRY.counter("loom_events_stored_total", "Run events committed to the store")
EVENTS_PUBLISHED = REGISTRY.counter(
    "loom_events_published_total", "Run events the relay published to JetStream"
)
RELAY_POSITION = REGISTRY.gauge(
    "loom_relay_position", "Notification id of the last event the relay published"
)
STORE_HEAD = REGISTRY.gauge(
    "loom_store_notification_head", "Largest notification id in the store (as last sampled)"
)
RELAY_LAG = REGISTRY.gauge(
    "loom_relay_lag_events", "Stored events the relay has not published yet (as last sampled)"
)
STEP_SECONDS = REGISTRY.histogram(
    "loom_step_duration_seconds",
    "Time from a step's start to its end, by outcome",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 3600),
)
QUEUE_DEPTH = REGISTRY.gauge("loom_queue_depth", "Work waiting in an in-process queue")
CONSUMER_PENDING = REGISTRY.gauge(
    "loom_consumer_pending", "Messages not yet delivered to a durable consumer"
)
CONSUMER_ACK_PENDING = REGISTRY.gauge(
    "loom_consumer_ack_pending", "Messages delivered to a durable consumer and not yet acked"
)
DEAD_LETTERS = REGISTRY.counter(
    "loom_dead_letters_total", "Messages sent to the dead-letter stream, by service"
)
REJECTIONS = REGISTRY.counter(
    "loom_rejections_total", "Requests refused as the client's mistake, by service and code"
)
REJECTS_DROPPED = REGISTRY.counter(
    "loom_rejects_dropped_total",
    "Rejections answered but not recorded because the record queue was full",
)
READY = REGISTRY.gauge("loom_ready", "1 when the process is ready (its last /readyz answer)")
