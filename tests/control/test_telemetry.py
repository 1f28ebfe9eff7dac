"""The controller's metrics (mesh.control.telemetry) and the golden metrics of sidecars (mesh.control.golden)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.control.golden import PAUSE, Golden, parse, quantile
from mesh.control.telemetry import INSTANCE_STATES, ControllerMetrics
from mesh.messages import Response
from mesh.sidecar.inbound import policy_denials
from mesh.sidecar.observing import ROUTE, Observer
from mesh.testing import make_request


def samples(text: bytes | str) -> list[tuple[str, dict[str, str], float]]:
    text = text.decode() if isinstance(text, bytes) else text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for sample, have, v in found if sample == name and all(have.get(k) == w for k, w in labels.items()))


# the controller's own


def test_instances_are_counted_by_service_and_state_when_scraped() -> None:
    rows: list[dict[str, Any]] = [
        {"service": "web", "instance": 1, "state": "running"},
        {"service": "web", "instance": 2, "state": "starting"},
        {"service": "box", "instance": "front", "state": "running"},  # a front is no instance
        {"service": "box", "instance": 1, "state": "sleeping"},
    ]
    metrics = ControllerMetrics("shop", ["web", "box"], lambda: rows)
    found = samples(metrics.exposition())
    assert value(found, "mesh_controller_instances", service="web", state="running", mesh="shop") == 1
    assert value(found, "mesh_controller_instances", service="web", state="starting") == 1
    assert value(found, "mesh_controller_instances", service="box", state="running") == 0
    assert value(found, "mesh_controller_instances", service="box", state="sleeping") == 1
    # every state of every service is there, 0 or more: series do not come and go
    assert len([s for s in found if s[0] == "mesh_controller_instances"]) == 2 * len(INSTANCE_STATES)

    rows.append({"service": "web", "instance": 3, "state": "running"})  # read again at each scrape
    assert value(samples(metrics.exposition()), "mesh_controller_instances", service="web", state="running") == 2


def test_starts_sleeps_restarts_and_scaling_are_counted() -> None:
    metrics = ControllerMetrics("shop", ["box", "pool"], lambda: [])
    metrics.started("box", "cold", 0.8)
    metrics.started("box", "cold", 1.2)
    metrics.started("box", "wake", 0.3)
    metrics.start_failed("box")
    metrics.slept("box")
    metrics.restarted("pool", "app")
    metrics.restarted("pool", "sidecar")
    metrics.pool_cpu("pool", 0.91)
    metrics.scaled("pool", "up", 0.91)
    metrics.pool_cpu("pool", 0.12)

    found = samples(metrics.exposition())
    assert all(name.startswith("mesh_") and labels["mesh"] == "shop" for name, labels, _ in found)
    assert value(found, "mesh_controller_cold_start_seconds_count", service="box", kind="cold") == 2
    assert value(found, "mesh_controller_cold_start_seconds_sum", service="box", kind="cold") == pytest.approx(2.0)
    assert value(found, "mesh_controller_cold_start_seconds_bucket", service="box", kind="cold", le="1.0") == 1
    assert value(found, "mesh_controller_cold_start_seconds_count", service="box", kind="wake") == 1
    assert value(found, "mesh_controller_start_failures_total", service="box") == 1
    assert value(found, "mesh_controller_sleeps_total", service="box") == 1
    assert value(found, "mesh_controller_restarts_total", service="pool", role="app") == 1
    assert value(found, "mesh_controller_restarts_total", service="pool", role="sidecar") == 1
    assert value(found, "mesh_controller_autoscale_decisions_total", service="pool", direction="up") == 1
    assert value(found, "mesh_controller_autoscale_decision_cpu", service="pool", direction="up") == 0.91
    assert value(found, "mesh_controller_autoscale_cpu", service="pool") == 0.12

    summary = metrics.summary()
    assert summary["box"]["cold_starts"] == 2 and summary["box"]["cold_start_s"] == 1.0
    assert summary["box"]["wakes"] == 1 and summary["box"]["sleeps"] == 1 and summary["box"]["start_failures"] == 1
    assert summary["pool"]["restarts"] == 2 and summary["pool"]["scale_ups"] == 1 and summary["pool"]["cpu"] == 0.12


# golden metrics from what sidecars expose


def served(observer: Observer, count: int, *, direction: str = "inbound", route: str = "web->orders",
           peer: str | None = "web", status: int = 200, seconds: float = 0.004) -> None:
    """``count`` requests as a sidecar's listener reports them, each taking about ``seconds``."""
    for _ in range(count):
        request = make_request(peer=peer, state={ROUTE: route} if route != "none" else {})
        now = time.monotonic()
        observer.done(direction, request, Response(status), now - seconds, now, 0, 0)


def sidecar(service: str = "orders") -> Observer:
    return Observer(service, frozenset({"web", "orders"}), service)


def test_the_first_scrape_is_a_baseline_then_rates_success_and_latency_follow() -> None:
    orders = sidecar()
    served(orders, 7)
    golden = Golden(window=10)
    golden.update({"orders": parse(orders.metrics.exposition().decode())}, now=100.0)
    assert golden.services()["orders"]["requests"] == 7  # in the totals
    assert golden.services()["orders"]["rps"] == 0.0 and golden.recent() == []  # not in the rates

    served(orders, 8)
    served(orders, 2, status=503)
    golden.update({"orders": parse(orders.metrics.exposition().decode())}, now=102.0, wall=5000.0)
    stats = golden.services()["orders"]
    assert stats["requests"] == 17
    assert stats["rps"] == 5.0  # 10 in 2 seconds
    assert stats["success"] == 0.8
    assert 2.5 < stats["p50_ms"] <= 5.0 and 2.5 < stats["p99_ms"] <= 5.0  # the bucket (2.5 ms, 5 ms]
    route = golden.routes()["web->orders"]
    assert route["allowed"] == 17 and route["rps"] == 5.0 and route["denied"] == 0
    assert golden.recent() == [{"time": 5000.0, "kind": "error", "service": "orders", "direction": "inbound",
                                "route": "web->orders", "status": "5xx", "count": 2}]

    # Out of the window, the rates fall back to nothing; the totals stay.
    golden.update({"orders": parse(orders.metrics.exposition().decode())}, now=103.0)
    golden.update({"orders": parse(orders.metrics.exposition().decode())}, now=104.5)
    golden.window_seconds = 1.0
    golden.update({"orders": parse(orders.metrics.exposition().decode())}, now=106.0)
    assert golden.services()["orders"] == {"requests": 17, "from_outside": 0, "rps": 0.0, "success": None,
                                           "p50_ms": None, "p99_ms": None}


def test_denials_count_on_the_route_and_in_the_recent_list() -> None:
    orders, web = sidecar(), sidecar("web")
    inbound = policy_denials(orders.plugin_metrics("mesh.defaults (policy)"))
    outbound = policy_denials(web.plugin_metrics("policy"))
    golden = Golden()

    def scrape(now: float) -> None:
        golden.update({"orders": parse(orders.metrics.exposition().decode()),
                       "web": parse(web.metrics.exposition().decode())}, now=now, wall=now)

    scrape(1.0)
    outbound.inc(direction="outbound", route="web->orders", result="denied")
    outbound.inc(direction="outbound", route="web->orders", result="denied")
    inbound.inc(direction="inbound", route="other->orders", result="audited")
    served(web, 1, direction="public", route="none", peer=None)
    scrape(2.0)
    routes = golden.routes()
    assert routes["web->orders"]["denied"] == 2 and routes["web->orders"]["allowed"] == 0
    assert routes["other->orders"]["audited"] == 1
    kinds = sorted((e["kind"], e["route"], e["count"]) for e in golden.recent())
    assert kinds == [("audited", "other->orders", 1), ("denied", "web->orders", 2)]
    assert golden.services()["web"]["requests"] == 1  # public requests count for the service
    assert golden.services()["web"]["from_outside"] == 1

    # Through a keyed service's front, an outside caller reaches an instance as the service itself.
    served(orders, 2, route="orders->orders", peer="orders")
    scrape(3.0)
    assert golden.services()["orders"]["from_outside"] == 2 and "orders->orders" not in golden.routes()
    assert "none" not in routes  # outside callers take no route


def test_a_new_sidecar_counts_from_zero_and_a_missed_scrape_loses_nothing() -> None:
    golden = Golden()
    first = sidecar()
    served(first, 5)
    golden.update({("orders", 1): parse(first.metrics.exposition().decode())}, now=10.0)
    assert golden.services()["orders"]["requests"] == 5

    # It did not answer this time: its last numbers are kept, so what it did meanwhile is no burst later.
    served(first, 2)
    golden.update({("orders", 1): None}, now=11.0)
    golden.update({("orders", 1): parse(first.metrics.exposition().decode())}, now=12.0)
    assert golden.services()["orders"]["requests"] == 7
    assert golden.services()["orders"]["rps"] == 1.0  # 2 over the 2 seconds since the baseline

    # It restarted (another identity): a fresh sidecar's counters are all new.
    again = sidecar()
    served(again, 3)
    golden.update({("orders", 2): parse(again.metrics.exposition().decode())}, now=13.0)
    assert golden.services()["orders"]["requests"] == 10

    # After a pause the next scrape is a baseline again: no burst from the time nobody looked.
    served(again, 50)
    golden.update({("orders", 2): parse(again.metrics.exposition().decode())}, now=13.0 + PAUSE + 1)
    assert golden.services()["orders"]["requests"] == 60
    assert golden.services()["orders"]["rps"] == 0.0


def test_parse_takes_only_what_it_needs() -> None:
    web = sidecar("web")
    served(web, 3, direction="outbound", route="web->orders", peer="web")
    web.plugin_calls.inc(plugin="jwt")
    reading = parse(web.metrics.exposition().decode())
    assert list(reading.requests) == [("web", "outbound", "web->orders", "2xx")]
    assert reading.requests[("web", "outbound", "web->orders", "2xx")][0] == 3
    assert reading.denials == {}


def test_quantiles_interpolate_within_a_bucket() -> None:
    assert quantile(0.5, []) is None
    assert quantile(0.5, [0.0] * 18) is None
    # 10 requests, all in the bucket (1 ms, 2.5 ms]
    row = [0, 0, 0, 0, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    assert quantile(0.5, row) == pytest.approx(0.00175)
    assert quantile(1.0, row) == pytest.approx(0.0025)
    # beyond the last finite bound: that bound is the most that can be said
    assert quantile(0.99, [0] * 17 + [4]) == 30.0
