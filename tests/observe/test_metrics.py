"""The numbers behind /metrics: plugins' own metrics by keywords or bound series, and their exposition."""

from __future__ import annotations

import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from mesh.observe.metrics import CONTENT_TYPE, Metrics, PluginMetrics


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for sample in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, frozenset({"service": "web", **labels}.items()))]


def test_the_content_type_is_the_one_prometheus_client_writes() -> None:
    assert CONTENT_TYPE == CONTENT_TYPE_LATEST


def test_a_counter_by_keywords_and_by_its_bound_series_is_one_series() -> None:
    metrics = Metrics(service="web")
    denied = PluginMetrics(metrics, "gate", "gate.py:Gate").counter("denied", "turned away", ["why"])
    denied.inc(why="path")
    denied.inc(2, why="path")
    expired = denied.labels(why="expired")
    expired.inc()
    expired.inc(0.5)
    assert denied.labels(why="expired") is expired  # remembered, as the keywords' series
    denied.inc(why="expired")
    assert value(metrics, "mesh_gate_denied_total", plugin="gate.py:Gate", why="path") == 3
    assert value(metrics, "mesh_gate_denied_total", plugin="gate.py:Gate", why="expired") == 2.5


def test_labels_are_checked_every_time_and_a_counter_only_goes_up() -> None:
    metrics = Metrics(service="web")
    denied = PluginMetrics(metrics, "gate", "g").counter("denied", "turned away", ["why"])
    denied.inc(why="path")
    for wrong in ({}, {"why": "path", "who": "x"}, {"reason": "path"}):
        with pytest.raises(ValueError, match="expected the labels"):
            denied.inc(**wrong)
    with pytest.raises(ValueError, match="only goes up"):
        denied.inc(-1, why="path")
    with pytest.raises(ValueError, match="only goes up"):
        denied.labels(why="path").inc(-1)
    with pytest.raises(AttributeError):
        denied.observe(1.0, why="path")
    assert value(metrics, "mesh_gate_denied_total", plugin="g", why="path") == 1


def test_values_that_are_no_strings_are_shown_as_text_each_as_itself() -> None:
    metrics = Metrics(service="web")
    codes = PluginMetrics(metrics, "gate", "g").counter("codes", "answers", ["code"])
    codes.inc(code=401)
    codes.inc(code="401")
    codes.inc(code=True)
    codes.inc(code=["a"])  # no key of a dict, still a label value
    assert value(metrics, "mesh_gate_codes_total", plugin="g", code="401") == 2
    assert value(metrics, "mesh_gate_codes_total", plugin="g", code="True") == 1
    assert value(metrics, "mesh_gate_codes_total", plugin="g", code="['a']") == 1


def test_many_label_sets_are_all_counted() -> None:
    metrics = Metrics(service="web")
    seen = PluginMetrics(metrics, "gate", "g").counter("seen", "clients", ["client"])
    for _ in range(2):
        for n in range(1500):  # more than are remembered
            seen.inc(client=f"c{n}")
    assert value(metrics, "mesh_gate_seen_total", plugin="g", client="c0") == 2
    assert value(metrics, "mesh_gate_seen_total", plugin="g", client="c1499") == 2


def test_gauges_and_histograms_by_keywords_and_by_series() -> None:
    metrics = Metrics(service="web")
    own = PluginMetrics(metrics, "pool", "p")
    size = own.gauge("size", "entries", ["kind"])
    size.set(5, kind="a")
    size.inc(kind="a")
    size.labels(kind="a").dec(2)
    size.labels(kind="b").set(7)
    took = own.histogram("took_seconds", "how long", ["step"], buckets=(0.1, 1.0))
    took.observe(0.05, step="x")
    took.labels(step="x").observe(0.5)
    took.labels(step="x").observe(3)
    assert value(metrics, "mesh_pool_size", plugin="p", kind="a") == 4
    assert value(metrics, "mesh_pool_size", plugin="p", kind="b") == 7
    assert value(metrics, "mesh_pool_took_seconds_bucket", plugin="p", step="x", le="0.1") == 1
    assert value(metrics, "mesh_pool_took_seconds_bucket", plugin="p", step="x", le="1.0") == 2
    assert value(metrics, "mesh_pool_took_seconds_count", plugin="p", step="x") == 3
    assert value(metrics, "mesh_pool_took_seconds_sum", plugin="p", step="x") == pytest.approx(3.55)


def test_a_metric_without_labels_and_two_instances_of_a_plugin() -> None:
    metrics = Metrics(service="web")
    first = PluginMetrics(metrics, "jwt", "jwt").counter("accepted", "let through")
    again = PluginMetrics(metrics, "jwt", "jwt#2").counter("accepted", "let through")
    first.inc()
    first.labels().inc()
    again.inc(3)
    assert value(metrics, "mesh_jwt_accepted_total", plugin="jwt") == 2
    assert value(metrics, "mesh_jwt_accepted_total", plugin="jwt#2") == 3
