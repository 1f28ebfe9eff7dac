"""mesh: a programmable service-mesh sidecar.

The public API, for plugin authors::

    from mesh import Plugin, Request, Response

and the typed keys of ``request.state`` that mesh's layers and plugins
hand each other (`mesh.keys`: ``UPSTREAM``, ``DEADLINE``, ...). Besides
what ``__all__`` lists, the documented submodules are public:
`mesh.testing` (a plugin tested alone), `mesh.sidecar.inbound` and
`mesh.sidecar.resilience` (the built-in layers, to subclass) and `mesh.lifecycle`
(the lifecycle hooks' base class). Everything else in the package is
internal and may change.
"""

from mesh.config import Retries
from mesh.errors import BodyTooLarge, ConfigError, MeshError, PluginError, UpstreamError
from mesh.keys import (
    AVOID,
    BACKEND,
    CLAIMS,
    DEADLINE,
    LISTENER,
    LOG_FIELDS,
    RETRIES,
    TIMEOUT,
    TRY_TIMEOUT,
    UPSTREAM,
    StateKey,
)
from mesh.messages import Headers, Request, Response
from mesh.options import Duration, Rate
from mesh.plugin import CallNext, Context, Handler, Plugin

__version__ = "0.1.0"

__all__ = [
    "AVOID",
    "BACKEND",
    "BodyTooLarge",
    "CLAIMS",
    "CallNext",
    "ConfigError",
    "Context",
    "DEADLINE",
    "Duration",
    "Handler",
    "Headers",
    "LISTENER",
    "LOG_FIELDS",
    "MeshError",
    "Plugin",
    "PluginError",
    "RETRIES",
    "Rate",
    "Request",
    "Response",
    "Retries",
    "StateKey",
    "TIMEOUT",
    "TRY_TIMEOUT",
    "UPSTREAM",
    "UpstreamError",
]
