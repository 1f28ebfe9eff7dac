"""mesh.toml (v1): load, check everything, report every problem at once.

`load` returns a `MeshConfig` or raises `ConfigError` whose ``problems``
list names, for each problem, its key path, what was found and what was
expected, with a did-you-mean for typos. Plugins are loaded and their
options bound while checking, so a file that loads is a file that starts.

Outbound resilience (`mesh.sidecar.resilience`, `mesh.sidecar.balancer`) is configured per
route, with mesh-wide defaults; a route's own key wins over ``[mesh.defaults]``,
which wins over the built-in default::

    [mesh.defaults]                      # or: [mesh] defaults = { ... }
    timeout = "15s"         # a whole outbound call, every try included, until the
                            # response head; "0s": no deadline. Between a route's
                            # `timeout` and this one comes the target service's `timeout`.
    max_pending = 1024      # requests in flight from one sidecar to one target service;
                            # over it: 503 with Retry-After at once (circuit breaking)
    lb = "p2c"              # "p2c" (two random instances, the one with fewer requests
                            # in flight) or "round-robin"
    retries = { attempts = 3,            # tries in all, the first included; 1: never retry
                per_try_timeout = "0s",  # bound of each try ("0s": only the overall timeout)
                on = ["connect-failure", "reset", "502", "503", "504"],
                                         # also "timeout" (a try's timeout; "504" covers it
                                         # too), "5xx", or any status
                idempotent_only = true,  # retry only GET HEAD OPTIONS TRACE PUT DELETE
                                         # (connect failures: every method, nothing was sent)
                backoff = "25ms", max_backoff = "250ms",  # full jitter, doubling per retry
                budget = 0.2,            # retries add at most this share of requests...
                min_per_second = 10 }    # ...beyond this many per second (per target)
    outlier = { consecutive_failures = 5,  # connect failures, resets, timeouts, 502/503/504
                base_ejection = "5s",      # ejected for base * times ejected...
                max_ejection = "60s",      # ...at most this long
                max_ejection_percent = 50 }# never more of a service's instances than this

    [[routes]]
    from = "web"
    to = "orders"
    timeout = "2s"
    retries = { attempts = 5, per_try_timeout = "300ms" }   # the rest from [mesh.defaults]
    max_pending = 100

A service with a ``health`` path is checked by the controller while it runs
(``health_check = { interval = "1s", timeout = "1s", unhealthy_threshold = 2,
healthy_threshold = 2 }``): an unhealthy instance leaves every sidecar's
registry and comes back once healthy.
"""

from mesh.config.model import (
    RETRIES_DEFAULT,
    Defaults,
    HealthCheck,
    Instances,
    MeshConfig,
    MeshSection,
    Outlier,
    PluginSpec,
    Retries,
    RouteConfig,
    Scale,
    ServiceConfig,
    Tracing,
)
from mesh.config.reader import BUILTIN_PLUGINS, build_plugins, load, parse, resolve

__all__ = ["BUILTIN_PLUGINS", "Defaults", "HealthCheck", "Instances", "MeshConfig", "MeshSection", "Outlier",
           "PluginSpec", "RETRIES_DEFAULT", "Retries", "RouteConfig", "Scale", "ServiceConfig", "Tracing",
           "build_plugins", "load", "parse", "resolve"]
