"""A pass-through plugin: the cheapest thing a chain can hold, for the benchmark."""

from mesh import Plugin


class Noop(Plugin):
    async def handle(self, request, call_next):
        return await call_next(request)
