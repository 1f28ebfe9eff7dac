"""Metrics a sidecar keeps, in the Prometheus text format on its admin listener's ``/metrics``.

The request path only adds to plain Python numbers: `Counter` and
`Histogram` are a dict from label values to a number (or to bucket counts),
with no lock (a sidecar is one event loop) and no object per request.
prometheus-client turns them into its metric families when ``/metrics`` is
scraped (`Metrics.collect`, a custom collector) and writes the exposition
format, so the text is exactly what Prometheus expects. It is imported at
the first scrape, not when a sidecar starts (it takes longer to import than
the rest of a sidecar's start).

Every name starts with ``mesh_``; every series carries ``service``. What a
request records (`mesh.observe.record`): ``mesh_requests_total`` and
``mesh_request_duration_seconds`` by ``direction`` (``inbound`` from another
sidecar, ``public`` from outside, ``outbound`` from the app), ``route``
(the ``[[routes]]`` entry that allowed it, ``from->to``, else ``none``),
``peer``, ``method`` and ``status_class`` (``2xx`` ...); bytes in and out;
``mesh_upstream_duration_seconds`` (until the upstream's response head).
The chain records per plugin: ``mesh_plugin_calls_total``,
``mesh_plugin_duration_seconds`` (the plugin's own time, the layers inside
it excluded), ``mesh_plugin_answers_total`` (by ``status``, when the plugin
answered itself) and ``mesh_plugin_exceptions_total``.

Label values come from mesh.toml (services, routes, plugins) or from small
fixed sets (directions, status classes, methods folded to the standard ones
and ``other``), never from the raw path: the number of series stays bounded
whatever clients send.

Plugins add their own through ``ctx.metrics`` (a `PluginMetrics`), without
importing prometheus-client::

    async def start(self, ctx):
        self.refused = ctx.metrics.counter("refusals", "tokens refused", ["reason"])

    ...
        self.refused.inc(reason="expired")   # mesh_jwt_refusals_total{service=...,plugin=...,reason="expired"}

Each label set's series is made once and remembered, so counting again by
the same keywords is a dictionary lookup; ``self.refused.labels(reason="expired")``
returns that series, to keep and count on with ``inc()``.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

__all__ = ["CONTENT_TYPE", "Counter", "CounterSeries", "Gauge", "GaugeSeries", "Histogram", "HistogramSeries",
           "Metrics", "PluginMetrics", "cumulative", "status_class"]

# What `Metrics.exposition` writes: prometheus_client.exposition.CONTENT_TYPE_LATEST (a test holds them equal).
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"

# Seconds: from a fast plugin's microseconds to a slow upstream's seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_REMEMBERED = 1024  # label sets a plugin's metric keeps the series of; others are looked up each time


def status_class(status: int) -> str:
    return _CLASSES[status // 100] if 100 <= status <= 599 else "other"


class _Metric:
    """A named metric: label names fixed at creation, one number (or bucket row) per label values."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 const: dict[str, str] | None = None) -> None:
        for label in (name, *labelnames):
            if not _NAME.match(label):
                raise ValueError(f"{label!r}: metric and label names are letters, digits and '_'")
        self.name = name
        self.documentation = documentation
        self.const = dict(const or {})
        self.labelnames = tuple(self.const) + tuple(labelnames)
        self._own = tuple(labelnames)
        self._names = frozenset(labelnames)
        self._const_values = tuple(self.const.values())

    def _key(self, labels: dict[str, Any]) -> tuple[str, ...]:
        if labels.keys() != self._names:
            raise ValueError(f"{self.name}: expected the labels {list(self._own)}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self._own)

    def labels(self, **labels: Any) -> Any:
        """The series of these label values, to count on without naming them again."""
        return self.series(self._key(labels))

    def series(self, key: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def families(self) -> Iterable[Any]:
        raise NotImplementedError


class Counter(_Metric):
    """A count that only goes up; exposed as ``<name>_total``."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 const: dict[str, str] | None = None) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames, const)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1, **labels: Any) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up")
        self.add(self._key(labels), amount)

    def add(self, key: tuple[str, ...], amount: float = 1) -> None:
        """The request path's `inc`: ``key`` is the label values in order, unchecked."""
        values = self.values
        values[key] = values.get(key, 0) + amount

    def series(self, key: tuple[str, ...]) -> CounterSeries:
        return CounterSeries(self, key)

    def families(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, value in list(self.values.items()):
            family.add_metric(self._const_values + key, value)
        yield family


class Gauge(_Metric):
    """A value that goes up and down (set, or read from ``function`` at each scrape)."""

    kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 const: dict[str, str] | None = None) -> None:
        super().__init__(name, documentation, labelnames, const)
        self.values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, **labels: Any) -> None:
        self.values[self._key(labels)] = value

    def inc(self, amount: float = 1, **labels: Any) -> None:
        self.add(self._key(labels), amount)

    def dec(self, amount: float = 1, **labels: Any) -> None:
        self.inc(-amount, **labels)

    def add(self, key: tuple[str, ...], amount: float) -> None:
        """`inc` by the label values in order, unchecked."""
        values = self.values
        values[key] = values.get(key, 0) + amount

    def series(self, key: tuple[str, ...]) -> GaugeSeries:
        return GaugeSeries(self, key)

    def families(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, value in list(self.values.items()):
            family.add_metric(self._const_values + key, value)
        yield family


class Histogram(_Metric):
    """How values spread over buckets (seconds by default), with their count and sum."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 const: dict[str, str] | None = None, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, documentation, labelnames, const)
        self.bounds = tuple(sorted(buckets))
        self.rows: dict[tuple[str, ...], list[float]] = {}  # per bucket (not cumulative), +Inf, then the sum

    def observe(self, value: float, **labels: Any) -> None:
        self.add(self._key(labels), value)

    def add(self, key: tuple[str, ...], value: float) -> None:
        """The request path's `observe`: ``key`` is the label values in order, unchecked."""
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = [0.0] * (len(self.bounds) + 2)
        row[bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def series(self, key: tuple[str, ...]) -> HistogramSeries:
        return HistogramSeries(self, key)

    def families(self) -> Iterable[Any]:
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, row in list(self.rows.items()):
            family.add_metric(self._const_values + key, cumulative(self.bounds, row), row[-1])
        yield family


class CounterSeries:
    """One series of a `Counter`, its label values bound (`Counter.labels`)."""

    __slots__ = ("_add", "_key", "_name")

    def __init__(self, counter: Counter, key: tuple[str, ...]) -> None:
        self._add = counter.add
        self._key = key
        self._name = counter.name

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"{self._name}: a counter only goes up")
        self._add(self._key, amount)


class GaugeSeries:
    """One series of a `Gauge`, its label values bound (`Gauge.labels`)."""

    __slots__ = ("_add", "_key", "_values")

    def __init__(self, gauge: Gauge, key: tuple[str, ...]) -> None:
        self._values = gauge.values
        self._add = gauge.add
        self._key = key

    def set(self, value: float) -> None:
        self._values[self._key] = value

    def inc(self, amount: float = 1) -> None:
        self._add(self._key, amount)

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)


class HistogramSeries:
    """One series of a `Histogram`, its label values bound (`Histogram.labels`)."""

    __slots__ = ("_histogram", "_key")

    def __init__(self, histogram: Histogram, key: tuple[str, ...]) -> None:
        self._histogram = histogram
        self._key = key

    def observe(self, value: float) -> None:
        self._histogram.add(self._key, value)


def cumulative(bounds: Sequence[float], row: Sequence[float]) -> list[tuple[str, float]]:
    """Prometheus buckets (``le`` and count so far) from per-bucket counts: one per bound, then +Inf."""
    buckets, total = [], 0.0
    for bound, count in zip([*map(repr, bounds), "+Inf"], row, strict=False):
        total += count
        buckets.append((bound, total))
    return buckets


class Metrics:
    """One sidecar's (or controller's) metrics, and their exposition (a prometheus-client collector)."""

    def __init__(self, **const: str) -> None:
        self.const = const  # labels every series carries: service
        self._metrics: dict[str, _Metric] = {}

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(f"mesh_{name}", documentation, labelnames, self.const))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(f"mesh_{name}", documentation, labelnames, self.const))

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(f"mesh_{name}", documentation, labelnames, self.const, buckets))

    def register(self, source: Any) -> None:
        """Another source of families: anything with ``families()`` and a unique ``name``."""
        self._add(source)

    def _add(self, metric: Any) -> Any:
        known = self._metrics.get(metric.name)
        if known is not None and not isinstance(known, _Metric):
            raise ValueError(f"{metric.name} is taken")
        if known is not None:
            if (type(known), known.labelnames) != (type(metric), metric.labelnames):
                raise ValueError(f"{metric.name} is already a {known.kind} with labels {list(known.labelnames)}")
            return known  # a plugin restarted, or two instances of one plugin: one series set
        self._metrics[metric.name] = metric
        return metric

    def collect(self) -> Iterator[Any]:
        for metric in list(self._metrics.values()):
            yield from metric.families()

    def exposition(self) -> bytes:
        from prometheus_client.exposition import generate_latest
        from prometheus_client.registry import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)


class PluginMetrics:
    """``ctx.metrics``: a plugin's own metrics, named ``mesh_<plugin>_<name>`` with a ``plugin`` label."""

    def __init__(self, metrics: Metrics, prefix: str, plugin: str) -> None:
        self._metrics = metrics
        self._prefix = re.sub(r"[^a-zA-Z0-9_]", "_", prefix)
        self._plugin = plugin

    def _labels(self, labelnames: Sequence[str]) -> list[str]:
        return ["plugin", *labelnames]

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> _PluginMetric:
        metric = self._metrics.counter(f"{self._prefix}_{name}", documentation, self._labels(labelnames))
        return _PluginMetric(metric, self._plugin)

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> _PluginMetric:
        metric = self._metrics.gauge(f"{self._prefix}_{name}", documentation, self._labels(labelnames))
        return _PluginMetric(metric, self._plugin)

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> _PluginMetric:
        metric = self._metrics.histogram(f"{self._prefix}_{name}", documentation, self._labels(labelnames), buckets)
        return _PluginMetric(metric, self._plugin)


class _PluginMetric:
    """A plugin's metric with its ``plugin`` label filled in: ``inc``, ``set``, ``observe`` by keyword labels.

    The series of each label set met is remembered (up to `_REMEMBERED` sets whose values are all
    strings), so a call costs a lookup of its keywords rather than checking and converting them.
    """

    def __init__(self, metric: Any, plugin: str) -> None:
        self._metric = metric
        self._plugin = plugin
        self._series: dict[tuple[tuple[str, Any], ...], Any] = {}

    def labels(self, **labels: Any) -> Any:
        """The series of these label values (a `CounterSeries`, `GaugeSeries` or `HistogramSeries`)."""
        return self._of(labels)

    def _of(self, labels: dict[str, Any]) -> Any:
        try:
            return self._series[tuple(labels.items())]
        except (KeyError, TypeError):  # not met yet, or a value that is no key (a list)
            series = self._metric.labels(plugin=self._plugin, **labels)
            if len(self._series) < _REMEMBERED and all(type(value) is str for value in labels.values()):
                self._series[tuple(labels.items())] = series
            return series

    def inc(self, amount: float = 1, **labels: Any) -> None:
        self._of(labels).inc(amount)

    def dec(self, amount: float = 1, **labels: Any) -> None:
        self._of(labels).dec(amount)

    def set(self, value: float, **labels: Any) -> None:
        self._of(labels).set(value)

    def observe(self, value: float, **labels: Any) -> None:
        self._of(labels).observe(value)
