"""The front of a keyed service: one instance per key, booted on its first request, asleep when idle.

For a service with ``instances = { key = "header:X-Session", sleep_after = "1m", max = 100 }``
the controller (`mesh.control.keyed`) runs a `KeyedFront`: the address other
sidecars reach the service at. It takes the caller's identity from its
certificate and checks route policy like any receiving sidecar, reads the
key from the request (`key_of`), and forwards to that key's instance,
starting it first if it is not running:

- concurrent first requests for a key start exactly one instance; the
  others wait for it to be ready (up to ``start_timeout``);
- the idle timer starts when the last request in flight for an instance
  ends; after ``sleep_after`` the instance is stopped, and a later request
  starts it again, transparently to the caller;
- at ``max`` instances the least recently used idle one is put to sleep to
  make room; when every instance is busy the request gets 503 with
  ``Retry-After`` (never an unbounded queue).

Starting and stopping are the front's owner's (``start(key)`` returns the new
instance's address, ``stop(key)`` stops it), so the front works the same on
every runtime.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.chain import error_response, short_error
from mesh.config import Instances, MeshConfig
from mesh.errors import UpstreamError
from mesh.http.client import Endpoint, Pool
from mesh.http.headers import PEER_HEADER, request_id, set_forwarded, strip_keeping_upgrade
from mesh.http.server import Listener, ServerLimits
from mesh.messages import Request, Response
from mesh.sidecar.identity import Identity, fresh_pool
from mesh.sidecar.routes import Policy

__all__ = ["AskIdle", "KeyedFront", "StartInstance", "StopInstance", "key_of"]

log = logging.getLogger("mesh.keyed")

StartInstance = Callable[[str], Awaitable[tuple[str, int]]]
StopInstance = Callable[[str], Awaitable[None]]
AskIdle = Callable[[str], Awaitable[bool]]  # may the idle instance of this key sleep?


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


def _prepare(request: Request) -> None:
    strip_keeping_upgrade(request.headers)
    request.id = request_id(request.headers, request.id)


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
                 port: int = 0, limits: ServerLimits | None = None, public_port: int | None = None,
                 public_host: str = "127.0.0.1", ask_idle: AskIdle | None = None) -> None:
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
        self._ask_idle = ask_idle
        self.instances: dict[str, _Instance] = {}
        self.listener = Listener(self._handle, name=f"{service}.front", host=host, port=port,
                                 tls=identity.server if identity else None, limits=limits)
        # An exposed keyed service: outside requests are routed by key the same way.
        self.public: Listener | None = None
        if public_port is not None:
            self.public = Listener(self._handle_public, name=f"{service}.public", host=public_host,
                                   port=public_port, limits=limits)
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._sleeping: dict[str, asyncio.Task[None]] = {}  # key -> its instance being stopped

    @property
    def address(self) -> str:
        return self.listener.address

    @property
    def public_url(self) -> str | None:
        return f"http://{self.public.address}" if self.public is not None else None

    async def start(self) -> None:
        await self.listener.start()
        if self.public is not None:
            try:
                await self.public.start()
            except BaseException:
                await self.listener.stop()
                raise
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.listener.stop()
        if self.public is not None:
            await self.public.stop()
        for key in list(self.instances):
            self._put_to_sleep(key, "the mesh is stopping")
        await asyncio.gather(*self._stopping, return_exceptions=True)
        await self.pool.close()

    async def reload_certificates(self) -> None:
        """Load the identity's files again: new connections, both ways, use them; none kept alive
        under the trust of before carries another request."""
        if self.identity is not None:
            self.identity.reload()
            self.pool = await fresh_pool(self.pool)

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

    async def _handle_public(self, request: Request, raw: Any) -> Response:
        try:
            request.headers.popall(PEER_HEADER, None)  # SECURITY: only the mesh says who a peer is
            _prepare(request)
            set_forwarded(request.headers, request.client, request.scheme)
            # An outside caller: the instance's sidecar sees the front (its own service) calling.
            return await self._route(request, None)
        except Exception as exc:
            return error_response(exc, request)

    async def _serve(self, request: Request, raw: Any) -> Response:
        if self.identity is not None:
            peer = self.identity.peer(raw.transport)
            request.headers.popall(PEER_HEADER, None)
        else:
            peer = request.headers.get(PEER_HEADER)
        _prepare(request)
        decision = self.policy.check(peer, self.service, request.method, request.path)
        if not decision.allowed:
            return short_error(403, decision.reason, request.id)
        return await self._route(request, peer)

    async def _route(self, request: Request, peer: str | None) -> Response:
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
            response.body = self._tracked(response.body, instance)
        return response

    async def _forward(self, endpoint: Endpoint, request: Request, peer: str | None) -> Response:
        if peer:
            # The instance's sidecar trusts this only from its own service: us.
            request.headers[PEER_HEADER] = peer
        spec = self.config.services[self.service]
        return await self.pool.request(endpoint, request.method, request.target, request.headers,
                                       request.body, timeout=spec.timeout,
                                       idle_timeout=spec.stream_idle_timeout, informational=request._interim)

    async def _tracked(self, stream: AsyncIterable[bytes], instance: _Instance) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self._done(instance)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

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
                    if self._ask_idle is not None and not await self._ask_idle(instance.key):
                        instance.last_used = time.monotonic()  # kept: ask again after sleep_after
                        continue
                    if instance.in_flight == 0 and self.instances.get(instance.key) is instance:
                        self._put_to_sleep(instance.key, f"idle for {self.settings.sleep_after:g}s")
