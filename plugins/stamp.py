"""``stamp``: add a header to every response.

Options:

- ``value`` (string, default ``"hello"``): the header's value.
- ``header`` (string, default ``"X-Stamp"``): the header's name.

The smallest useful plugin, and the shape every other one follows.
"""

from mesh import CallNext, Plugin, Request, Response


class Stamp(Plugin):
    """Adds ``X-Stamp`` (or ``header``) to every response."""

    def __init__(self, value: str = "hello", header: str = "X-Stamp") -> None:
        self.value = value
        self.header = header

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        response = await call_next(request)
        response.headers[self.header] = self.value
        return response
