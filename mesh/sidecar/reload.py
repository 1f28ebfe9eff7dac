"""A sidecar's side of `mesh reload`: new chains and settings, swapped in at once, or not at all.

The controller drives every sidecar of a mesh through the same steps, on
the admin listener (behind the admin token)::

    POST /reload/prepare  {"version": V}   load mesh.toml and the plugin code again, check that they are
                                           version V, build the new chains and start their plugins
    POST /reload/commit   {"version": V}   swap: requests from now on take V's chains, policy and
                                           settings; requests in flight finish on the old ones
    POST /reload/finish   {"version": V}   the old chains drain, then their plugins stop
    POST /reload/rollback {"version": V}   (after commit, instead of finish) swap back to the old
                                           version and stop V's plugins
    POST /reload/abort                     (before commit) stop what prepare started

It commits only once every sidecar prepared, and finishes only once every
sidecar committed; if any step fails anywhere, the sidecars that moved go
back, so a mesh never runs two versions once `mesh reload` has returned.
A swap is one synchronous step on the event loop: no request sees half of
it. What a version is: `mesh.config.version`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesh.chain import Chain
from mesh.config import MeshConfig, load
from mesh.config.version import version
from mesh.errors import ConfigError, PluginError
from mesh.plugin import Context

if TYPE_CHECKING:
    from mesh.sidecar.sidecar import Sidecar

__all__ = ["DRAIN_TIMEOUT", "Generation", "ReloadRefused", "Reloads"]

log = logging.getLogger("mesh.reload")

DRAIN_TIMEOUT = 30.0  # seconds the old chains' requests have to finish before their plugins stop anyway


class ReloadRefused(Exception):
    """A reload step that cannot be done; the message says why."""


@dataclass
class Generation:
    """One version of a sidecar's configuration: its config, the chains built from it, the attributes it sets."""

    config: MeshConfig
    version: str
    attributes: dict[str, Any]
    chains: Sequence[Chain] = field(default_factory=tuple)

    async def start(self, ctx: Context) -> None:
        started: list[Chain] = []
        try:
            for chain in self.chains:
                await chain.start(ctx)
                started.append(chain)
        except BaseException:
            for chain in reversed(started):
                await chain.stop()
            raise

    async def drain(self, timeout: float) -> bool:
        """Wait until no request runs in these chains, at most ``timeout`` seconds; whether they drained."""
        deadline = time.monotonic() + timeout
        while any(chain.inflight for chain in self.chains):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        for chain in reversed(self.chains):
            await chain.stop()


class Reloads:
    """The reload steps of one sidecar (see the module docstring)."""

    def __init__(self, sidecar: Sidecar, current: Generation) -> None:
        self.sidecar = sidecar
        self.current = current
        self.pending: Generation | None = None
        self.previous: Generation | None = None
        self._lock = asyncio.Lock()

    @property
    def version(self) -> str:
        return self.current.version

    async def prepare(self, expected: str | None) -> str:
        async with self._lock:
            if self.previous is not None:
                raise ReloadRefused(f"version {self.current.version} is committed but not finished")
            await self._drop_pending()
            try:
                config = await asyncio.get_running_loop().run_in_executor(None, load, self.sidecar.config.path)
            except ConfigError as exc:
                raise ReloadRefused("mesh.toml has problems: " + "; ".join(exc.problems)) from None
            found = version(config)
            if expected and found != expected:
                raise ReloadRefused(f"mesh.toml or the plugin code changed since it was checked (found version "
                                    f"{found}, asked for {expected}): reload again")
            if self.sidecar.service not in config.services:
                raise ReloadRefused(f"service {self.sidecar.service!r} is gone from mesh.toml")
            generation = self.sidecar.generation(config, found)
            try:
                await generation.start(self.sidecar.context(generation))
            except PluginError as exc:
                raise ReloadRefused(str(exc)) from None
            self.pending = generation
            log.info("version %s prepared", found)
            return found

    async def commit(self, expected: str) -> None:
        async with self._lock:
            pending = self._expect(self.pending, expected, "prepared")
            self.previous, self.current, self.pending = self.current, pending, None
            self.sidecar.use(pending)
            log.info("version %s serves (was %s)", pending.version, self.previous.version)

    async def finish(self, expected: str) -> None:
        async with self._lock:
            self._expect(self.current, expected, "committed")
            old, self.previous = self.previous, None
        if old is not None:
            if not await old.drain(DRAIN_TIMEOUT):
                log.warning("version %s: requests still running after %gs; its plugins stop anyway",
                            old.version, DRAIN_TIMEOUT)
            await old.stop()

    async def rollback(self, expected: str) -> None:
        async with self._lock:
            if self.previous is None or self.current.version != expected:
                return  # nothing of that version was committed here
            undone, self.current, self.previous = self.current, self.previous, None
            self.sidecar.use(self.current)
            log.warning("version %s rolled back to %s", undone.version, self.current.version)
        await undone.drain(DRAIN_TIMEOUT)
        await undone.stop()

    async def abort(self) -> None:
        async with self._lock:
            await self._drop_pending()

    async def close(self) -> None:
        """The sidecar stops: what was prepared and not committed stops too (its current chains are its own)."""
        await self.abort()
        old, self.previous = self.previous, None
        if old is not None:
            await old.stop()

    async def _drop_pending(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            await pending.stop()
            log.info("version %s dropped", pending.version)

    def _expect(self, generation: Generation | None, expected: str, what: str) -> Generation:
        if generation is None or generation.version != expected:
            have = generation.version if generation is not None else "none"
            raise ReloadRefused(f"version {expected} is not {what} here ({what}: {have})")
        return generation
