"""A user plugin: add ``X-Served-By`` naming the service whose sidecar answered.

mesh.toml finds it on ``[mesh] plugin_path`` as ``served_by.py:ServedBy``.
"""

from mesh import CallNext, Context, Plugin, Request, Response


class ServedBy(Plugin):
    """Adds ``X-Served-By: <service>`` (or ``header``) to every response."""

    def __init__(self, header: str = "X-Served-By") -> None:
        self.header = header
        self.service = "?"

    async def start(self, ctx: Context) -> None:
        self.service = ctx.service

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        response = await call_next(request)
        response.headers[self.header] = self.service
        return response
