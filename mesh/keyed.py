"""Keyed services: one instance per key, booted on its first request, asleep when idle.

For a service with ``instances = { key = "header:X-Session", sleep_after = "1m", max = 100 }``
the controller runs a `KeyedFront`: the address other sidecars reach the
service at. It takes the caller's identity from its certificate and checks
route policy like any receiving sidecar, reads the key from the request,
and forwards to that key's instance, starting it first if it is not
running:

- concurrent first requests for a key start exactly one instance; the
  others wait for it to be ready (up to ``start_timeout``);
- the idle timer starts when the last request in flight for an instance
  ends; after ``sleep_after`` the instance is stopped, and a later request
  starts it again, transparently to the caller;
- at ``max`` instances the least recently used idle one is put to sleep to
  make room; when every instance is busy the request gets 503 with
  ``Retry-After`` (never an unbounded queue).

Starting and stopping are the controller's (``start(key)`` returns the new
instance's mesh address, ``stop(key)`` stops it), so the front works the same
on every runtime.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .chain import error_response, short_error
from .config import Instances, MeshConfig
from .errors import UpstreamError
from .headers import PEER_HEADER, request_id, strip_hop_by_hop
from .identity import Identity
from .messages import Request, Response
from .routes import Policy
from .server import Listener, ServerLimits
from .upstream import Endpoint, Pool, connect_websocket

__all__ = ["KeyedFront", "key_of"]

log = logging.getLogger("mesh.keyed")

StartInstance = Callable[[str], Awaitable[tuple[str, int]]]
StopInstance = Callable[[str], Awaitable[None]]


def key_of(request: Request, spec: str) -> str | None:
    """The key ``spec`` (``header:NAME``, ``path:N``, ``claim:NAME``) names in ``request``."""
    kind, _, name = spec.partition(":")
    if kind == "header":
        value = request.headers.get(name)
    elif kind == "path":
        segments = [s for s in request.path.split("/") if s]
        index = int(name) if name.isdigit() else 0
        value = segments[index - 1] if 0 < index <= len(segments) else None
    elif kind == "claim":
        claims = request.state.get("claims") or _unverified_claims(request)
        value = claims.get(name) if isinstance(claims, dict) else None
        value = None if value is None else str(value)
    else:
        value = None
    return value or None


def _unverified_claims(request: Request) -> dict[str, Any] | None:
    # Routing only: the instance's own sidecar verifies the token (its jwt plugin).
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    parts = token.split(".")
    if scheme.lower() != "bearer" or len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


@dataclass
class _Instance:
    key: str
    ready: asyncio.Future[tuple[str, int]]
    state: str = "starting"
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)


class KeyedFront:
    """The front of one keyed service; see the module docstring."""

    def __init__(self, config: MeshConfig, service: str, *, start: StartInstance,
                 stop: StopInstance, identity: Identity | None, host: str = "127.0.0.1",
                 port: int = 0, limits: ServerLimits | None = None) -> None:
        spec = config.services[service]
        assert spec.instances is not None
        self.config = config
        self.service = service
        self.settings: Instances = spec.instances
        self.identity = identity
        self.policy = Policy(config.routes, config.mode)
        self.pool = Pool(verify_peer=self._verify_peer)
        self._start = start
        self._stop = stop
        self.instances: dict[str, _Instance] = {}
        self.listener = Listener(self._handle, name=f"{service}.front", host=host, port=port,
                                 tls=identity.server if identity else None, limits=limits)
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._sleeping: dict[str, asyncio.Task[None]] = {}  # key -> its instance being stopped

    @property
    def address(self) -> str:
        return self.listener.address

    async def start(self) -> None:
        await self.listener.start()
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.listener.stop()
        for key in list(self.instances):
            self._put_to_sleep(key, "the mesh is stopping")
        await asyncio.gather(*self._stopping, return_exceptions=True)
        await self.pool.close()

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"key": i.key, "state": i.state, "in_flight": i.in_flight,
                 "idle_for": round(now - i.last_used, 1) if i.in_flight == 0 else 0.0}
                for i in self.instances.values()]

    # requests

    async def _handle(self, request: Request, raw: Any) -> Response:
        try:
            return await self._serve(request, raw)
        except Exception as exc:
            return error_response(exc, request)

    async def _serve(self, request: Request, raw: Any) -> Response:
        if self.identity is not None:
            peer = self.identity.peer(raw.transport)
            request.headers.popall(PEER_HEADER, None)
        else:
            peer = request.headers.get(PEER_HEADER)
        strip_hop_by_hop(request.headers)
        request.id = request_id(request.headers, request.id)
        decision = self.policy.check(peer, self.service, request.method, request.path)
        if not decision.allowed:
            return short_error(403, decision.reason, request.id)
        key = key_of(request, self.settings.key)
        if key is None:
            return short_error(400, f"'{self.service}' needs a key in the request ({self.settings.key})",
                               request.id)
        instance = await self._ensure(key)
        host, port = await self._wait_ready(instance)
        instance.in_flight += 1
        instance.last_used = time.monotonic()
        try:
            response = await self._forward(Endpoint(host, port, self.identity.client if self.identity else None,
                                                     self.service), request, peer)
        except BaseException:
            self._done(instance)
            raise
        if isinstance(response.body, bytes):
            self._done(instance)
        else:
            response.body = self._tracked(response, instance)
        return response

    async def _forward(self, endpoint: Endpoint, request: Request, peer: str | None) -> Response:
        if peer:
            # The instance's sidecar trusts this only from its own service: us.
            request.headers[PEER_HEADER] = peer
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await connect_websocket(endpoint, request.target, request.headers,
                                           self.settings.start_timeout)
        return await self.pool.request(endpoint, request.method, request.target, request.headers,
                                       request.body, timeout=self.config.services[self.service].timeout)

    async def _tracked(self, response: Response, instance: _Instance) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.stream():
                yield chunk
        finally:
            self._done(instance)

    def _done(self, instance: _Instance) -> None:
        instance.in_flight -= 1
        instance.last_used = time.monotonic()

    def _verify_peer(self, endpoint: Endpoint, transport: Any) -> str | None:
        found = self.identity.peer(transport) if self.identity else None
        if found != self.service:
            return f"a '{self.service}' instance presented the identity of {found!r}"
        return None

    # instances

    async def _ensure(self, key: str) -> _Instance:
        instance = self.instances.get(key)
        if instance is not None:
            return instance
        if len(self.instances) >= self.settings.max:
            idle = [i for i in self.instances.values() if i.state == "running" and i.in_flight == 0]
            if not idle:
                raise UpstreamError(503, f"'{self.service}' is at its {self.settings.max} instances, all busy")
            victim = min(idle, key=lambda i: i.last_used)
            self._put_to_sleep(victim.key, f"making room for a new key ({self.settings.max} instances)")
        loop = asyncio.get_running_loop()
        instance = self.instances[key] = _Instance(key, loop.create_future())
        task = asyncio.ensure_future(self._boot(instance))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        return instance

    async def _boot(self, instance: _Instance) -> None:
        previous = self._sleeping.get(instance.key)
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)  # one instance per key, ever
        log.info("%s: starting the instance for key %r", self.service, instance.key)
        try:
            address = await self._start(instance.key)
        except Exception as exc:
            log.error("%s: the instance for key %r failed to start: %s", self.service, instance.key, exc)
            if self.instances.get(instance.key) is instance:
                del self.instances[instance.key]
            instance.ready.set_exception(UpstreamError(503, f"the instance for this key failed to start: {exc}"))
            instance.ready.exception()  # retrieved: waiters may have given up
            return
        instance.state = "running"
        instance.last_used = time.monotonic()
        log.info("%s: key %r ready in %.2fs at %s:%s", self.service, instance.key,
                 time.monotonic() - instance.started, *address)
        instance.ready.set_result(address)

    async def _wait_ready(self, instance: _Instance) -> tuple[str, int]:
        try:
            return await asyncio.wait_for(asyncio.shield(instance.ready), self.settings.start_timeout)
        except TimeoutError:
            raise UpstreamError(504, f"the instance for this key was not ready within "
                                     f"{self.settings.start_timeout:g}s") from None

    def _put_to_sleep(self, key: str, reason: str) -> None:
        instance = self.instances.pop(key, None)
        if instance is None:
            return
        instance.state = "stopping"
        log.info("%s: key %r goes to sleep: %s", self.service, key, reason)

        async def stop() -> None:
            if not instance.ready.done():
                await asyncio.gather(instance.ready, return_exceptions=True)
            if instance.ready.exception() is None:
                await self._stop(key)

        task = asyncio.ensure_future(stop())
        self._stopping.add(task)
        self._sleeping[key] = task

        def forget(done: asyncio.Task[None]) -> None:
            self._stopping.discard(done)
            if self._sleeping.get(key) is done:
                del self._sleeping[key]

        task.add_done_callback(forget)

    async def _sweep(self) -> None:
        interval = max(0.05, min(1.0, self.settings.sleep_after / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for instance in list(self.instances.values()):
                if (instance.state == "running" and instance.in_flight == 0
                        and now - instance.last_used >= self.settings.sleep_after):
                    self._put_to_sleep(instance.key, f"idle for {self.settings.sleep_after:g}s")
