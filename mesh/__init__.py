"""mesh: a programmable service-mesh sidecar.

The public API, for plugin authors::

    from mesh import Plugin, Request, Response

Everything else in the package is internal and may change.
"""

from mesh.errors import BodyTooLarge, ConfigError, MeshError, PluginError, UpstreamError
from mesh.messages import Headers, Request, Response
from mesh.options import Duration, Rate
from mesh.plugin import CallNext, Context, Handler, Plugin

__version__ = "0.1.0"

__all__ = [
    "BodyTooLarge",
    "CallNext",
    "ConfigError",
    "Context",
    "Duration",
    "Handler",
    "Headers",
    "MeshError",
    "Plugin",
    "PluginError",
    "Rate",
    "Request",
    "Response",
    "UpstreamError",
]
