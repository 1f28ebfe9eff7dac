"""What a sidecar's ``/metrics`` says of its upstreams, its TLS and its certificate, read when scraped.

The numbers live where the work is done: the balancer's view of each
instance (requests, errors, ejections, whether ejected now), the pool's
kept-alive connections, the breaker's and the retry budget's refusals,
the TLS handshakes that failed (`mesh.sidecar.identity.HANDSHAKE_FAILURES`)
and the certificate's expiry. `UpstreamMetrics` turns them into families
when ``/metrics`` is scraped, so a request pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mesh.sidecar.identity import HANDSHAKE_FAILURES
from mesh.sidecar.resilience import CircuitBreaker, Retry

if TYPE_CHECKING:
    from mesh.sidecar.sidecar import Sidecar

__all__ = ["UpstreamMetrics"]


class UpstreamMetrics:
    """A collector of one sidecar's upstream state (registered on its `mesh.observe.metrics.Metrics`)."""

    name = "mesh_upstream"

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    def families(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # at a scrape, not at start

        s = self.sidecar
        service = s.service
        per_instance = ("service", "target", "instance")
        in_flight = GaugeMetricFamily("mesh_upstream_requests_in_flight",
                                      "Requests sent to an instance of another service and not yet answered",
                                      labels=per_instance)
        requests = CounterMetricFamily("mesh_upstream_instance_requests", "Requests sent to each instance",
                                       labels=per_instance)
        errors = CounterMetricFamily("mesh_upstream_instance_errors",
                                     "Failures of each instance: connect failures, resets, timeouts, 502/503/504",
                                     labels=per_instance)
        ejections = CounterMetricFamily("mesh_upstream_ejections", "Times an instance was ejected (outlier "
                                        "detection)", labels=per_instance)
        ejected = GaugeMetricFamily("mesh_upstream_ejected", "1 while an instance is ejected, else 0",
                                    labels=per_instance)
        for target, backends in s.balancer.snapshot().items():
            for backend in backends:
                values = (service, target, backend["address"])
                in_flight.add_metric(values, backend["outstanding"])
                requests.add_metric(values, backend["requests"])
                errors.add_metric(values, backend["errors"])
                ejections.add_metric(values, backend["ejections"])
                ejected.add_metric(values, 1 if backend["ejected"] else 0)
        idle = GaugeMetricFamily("mesh_upstream_idle_connections", "Connections kept alive for reuse",
                                 labels=("service", "target"))
        for endpoint, count in s.pool.idle().items():
            idle.add_metric((service, endpoint.peer or "app"), count)
        plugins = [plugin for chain in (s.outbound, s._app_retry) for _, plugin in chain.plugins]
        breaker = CounterMetricFamily("mesh_breaker_rejections", "Calls refused at once with 503: max_pending "
                                      "requests were in flight to the target", labels=("service",))
        breaker.add_metric((service,), sum(p.rejected for p in plugins if isinstance(p, CircuitBreaker)))
        budget = CounterMetricFamily("mesh_retry_budget_exhausted", "Retries not made: the retry budget was spent",
                                     labels=("service",))
        budget.add_metric((service,), sum(p.refused for p in plugins if isinstance(p, Retry)))
        handshakes = CounterMetricFamily("mesh_tls_handshake_failures", "TLS handshakes that failed, by side "
                                         "(server: a caller's; client: this sidecar's to a peer) and reason",
                                         labels=("service", "side", "reason"))
        for (side, reason), count in list(HANDSHAKE_FAILURES.items()):
            handshakes.add_metric((service, side, reason), count)
        families: list[Any] = [in_flight, requests, errors, ejections, ejected, idle, breaker, budget, handshakes]
        if s.identity is not None:
            expiry = GaugeMetricFamily("mesh_certificate_expiry_timestamp_seconds",
                                       "When this sidecar's certificate expires (Unix time)", labels=("service",))
            expiry.add_metric((service,), s.identity.expires)
            families.append(expiry)
        return families
