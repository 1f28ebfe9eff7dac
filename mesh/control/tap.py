"""`mesh tap`: the requests a service's sidecars answer, live, merged across its instances.

`TapClient` reads a running mesh's state (`mesh.control.state.status`),
subscribes to ``GET /tap`` on the admin listener of every running instance
of the service with the run's admin token (`mesh.sidecar.admin`), and
looks again every second, so instances that start later (a pool growing,
a keyed instance waking) are tapped too. Records come out in the order
they arrive; `format_record` is the readable line. `show` is the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import aiohttp

from mesh.config import MeshConfig
from mesh.control.state import status
from mesh.sidecar.admin import operator_token

__all__ = ["NotRunning", "TapClient", "format_record", "show"]

RESCAN = 1.0  # seconds between looks for instances started since


class NotRunning(Exception):
    """The mesh is not running, or has no running instance of the service."""


class TapClient:
    """Records from every running instance of ``service``, as they pass (see the module docstring).

    ``query``: the sidecar's tap parameters (``path``, ``peer``, ``status``, ``direction``,
    ``bodies``, ``secrets``); ``on_started(label)`` is called once each instance's tap is live.
    """

    def __init__(self, config: MeshConfig, service: str | None, query: dict[str, str] | None = None, *,
                 on_started: Callable[[str], None] | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.service = service
        self.query = {key: value for key, value in (query or {}).items() if value not in (None, "")}
        self.on_started = on_started or (lambda label: None)
        self.warn = warn or (lambda text: None)
        self._records: asyncio.Queue[dict[str, Any]] = asyncio.Queue(4096)
        self._tapping: dict[str, asyncio.Task[None]] = {}
        self._failed: asyncio.Future[dict[str, Any]] | None = None

    def _targets(self) -> dict[str, str]:
        """label -> admin address of each running instance of the service."""
        state = status(self.config)
        if not state["controller"].get("running"):
            raise NotRunning(f"mesh '{self.config.name}' is not running")
        return {inst["label"]: inst["addresses"]["admin"] for inst in state.get("instances", [])
                if (self.service is None or inst.get("service") == self.service)
                and inst.get("state") == "running" and inst.get("addresses", {}).get("admin")}

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        await asyncio.get_running_loop().run_in_executor(None, self._targets)  # NotRunning, before all else
        token = operator_token(self.config.state_dir)
        if token is None:
            raise NotRunning(f"cannot read the admin token of mesh '{self.config.name}' in "
                             f"{self.config.state_dir} (is it running, and are you its owner?)")
        self._failed = asyncio.get_running_loop().create_future()
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=None)
        async with aiohttp.ClientSession(timeout=timeout, headers=token.headers()) as session:
            scanning = asyncio.ensure_future(self._scan(session))
            try:
                while True:
                    getting = asyncio.ensure_future(self._records.get())
                    await asyncio.wait({getting, self._failed}, return_when=asyncio.FIRST_COMPLETED)
                    if not getting.done():
                        getting.cancel()
                        self._failed.result()  # raises what failed
                    yield getting.result()
            finally:
                scanning.cancel()
                for task in self._tapping.values():
                    task.cancel()
                await asyncio.gather(scanning, *self._tapping.values(), return_exceptions=True)

    def _fail(self, exc: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)

    async def _scan(self, session: aiohttp.ClientSession) -> None:
        first = True
        while True:
            try:
                targets = await asyncio.get_running_loop().run_in_executor(None, self._targets)
            except NotRunning as exc:
                self._fail(exc)
                return
            if first and not targets:
                self._fail(NotRunning(f"no running instance of {self.service!r} in mesh '{self.config.name}'"
                                      if self.service else f"mesh '{self.config.name}' runs no instance"))
                return
            first = False
            for label, address in targets.items():
                task = self._tapping.get(label)
                if task is None or task.done():
                    self._tapping[label] = asyncio.ensure_future(self._tap(session, label, address))
            await asyncio.sleep(RESCAN)

    async def _tap(self, session: aiohttp.ClientSession, label: str, address: str) -> None:
        try:
            async with session.get(f"http://{address}/tap", params=self.query) as response:
                if response.status != 200:
                    text = (await response.text()).strip().splitlines()
                    exc = ValueError(f"{label}: {text[0] if text else response.status}")
                    if response.status == 400:
                        self._fail(exc)  # the same parameters fail everywhere
                    else:
                        self.warn(str(exc))
                    return
                async for line in response.content:
                    if not line.strip():
                        continue  # the sidecar's heartbeat
                    record = json.loads(line)
                    if record.get("tap") == "started":
                        self.on_started(label)
                    elif record.get("tap") == "dropped":
                        self.warn(f"{label}: {record.get('count')} requests not shown (the tap fell behind)")
                    elif "tap" not in record:
                        await self._records.put(record)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self.warn(f"{label}: tap ended: {exc}")


def format_record(record: dict[str, Any]) -> str:
    """One readable line: time, instance, direction, route, method and target, status, duration, plugins."""
    time = str(record.get("time", ""))[11:23]
    target = record.get("path", "")
    if record.get("query"):
        target += f"?{record['query']}"
    plugins = " ".join(f"{p['name']}{'!' if p.get('failed') else ''}"
                       f"{'=' + str(p['answered']) if p.get('answered') is not None else ''}"
                       for p in record.get("plugins", ()))
    line = (f"{time} {record.get('instance', '')} {record.get('direction', '')} {record.get('route', '')} "
            f"{record.get('method', '')} {target} {record.get('status', '')} {record.get('duration_ms', 0):.1f}ms")
    if plugins:
        line += f" [{plugins}]"
    if record.get("answered_by"):
        line += f" answered by {record['answered_by']}"
    return line


async def _run(client: TapClient, out: IO[str], as_json: bool, count: int | None, save: IO[str] | None) -> int:
    seen = 0
    async for record in client:
        text = json.dumps(record, separators=(",", ":"))
        if save is not None:
            save.write(text + "\n")
            save.flush()
        out.write((text if as_json else format_record(record)) + "\n")
        out.flush()
        seen += 1
        if count is not None and seen >= count:
            break
    return 0


def show(config: MeshConfig, service: str | None, query: dict[str, str], *, as_json: bool = False,
         count: int | None = None, save: str | None = None) -> int:
    """`mesh tap`: print records until Ctrl-C (or ``count`` of them); 1 when there is nothing to tap."""
    def started(label: str) -> None:
        print(f"tapping {label}", file=sys.stderr, flush=True)

    def warn(text: str) -> None:
        print(f"mesh tap: {text}", file=sys.stderr, flush=True)

    client = TapClient(config, service, query, on_started=started, warn=warn)
    with contextlib.ExitStack() as stack:
        file = stack.enter_context(Path(save).open("a", encoding="utf-8")) if save else None
        try:
            return asyncio.run(_run(client, sys.stdout, as_json, count, file))
        except NotRunning as exc:
            print(f"mesh tap: {exc}", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"mesh tap: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 0
