"""Replay recorded traffic (``mesh tap --save FILE``) through plugins, and compare their answers.

Each record holds what a sidecar saw: the request as the chain passed it
on, the response, which plugins ran, and which one answered when one
answered itself. `replay` rebuilds each request, runs it through the
plugins under test behind the sidecar's error boundary, and checks that
they decide as they did then:

- a request one of them answered must be answered again, by the same
  plugin, with the same status;
- a request they passed on must be passed on again (the stand-in upstream
  answers with the recorded response) and end with the recorded status.
  (Where a request one of them answered is now passed on, the stand-in
  answers an empty 200: the record holds no answer of the app's.)

Only records in which one of the plugins ran are replayed; the others
are counted as skipped. With ``headers``, those response headers must
match too. Requests are replayed in the file's order, one at a time, so
stateful plugins (a rate limit, a cache) see them as the sidecar did,
apart from the time between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.chain import ANSWERED_BY, Chain
from mesh.keys import LISTENER
from mesh.messages import Request, Response
from mesh.observe.metrics import Metrics, PluginMetrics
from mesh.observe.tap import REDACTED, body_bytes, read_records
from mesh.plugin import Plugin

__all__ = ["ReplayReport", "Replayed", "replay"]

_NOT_FORWARDED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


@dataclass
class Replayed:
    """One record, replayed: what it recorded, what the plugins did now, and what differs."""

    record: dict[str, Any]
    status: int
    answered_by: str | None
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        record = self.record
        then = (f"answered {record['status']} by {record['answered_by']}" if record.get("answered_by")
                else f"passed on, {record['status']}")
        now = f"answered {self.status} by {self.answered_by}" if self.answered_by else f"passed on, {self.status}"
        return (f"{record['method']} {record['path']} (request {record.get('request_id')}): then {then}; "
                f"now {now}: {'; '.join(self.problems)}")


@dataclass
class ReplayReport:
    """What `replay` found: each replayed record, and how many were skipped."""

    results: list[Replayed]
    skipped: int
    warnings: list[str]

    @property
    def mismatches(self) -> list[Replayed]:
        return [result for result in self.results if result.problems]

    @property
    def ok(self) -> bool:
        """Every replayed record decided as recorded (and at least one was replayed)."""
        return bool(self.results) and not self.mismatches

    def explain(self) -> str:
        """A summary for an assertion message: counts, warnings, each mismatch."""
        lines = [f"{len(self.results)} replayed, {len(self.mismatches)} differ, {self.skipped} skipped "
                 f"(none of the plugins ran)"]
        lines += [f"warning: {text}" for text in self.warnings]
        lines += [result.describe() for result in self.mismatches]
        return "\n".join(lines)


class _Meter:
    """Measured layers mark which plugin answered (``ANSWERED_BY``); nothing is counted."""

    per_request = False

    def record(self, name: str, own: float, answered: int | None, failed: bool) -> None:
        pass

    def plugin_metrics(self, name: str) -> PluginMetrics:
        return PluginMetrics(Metrics(), "plugin", name)


def _label(cls: type) -> str:
    return cls.__name__.lower()


def _named(plugins: Plugin | Mapping[str, Plugin] | Sequence[tuple[str, Plugin]], name: str | None,
           records: list[dict[str, Any]]) -> list[tuple[str, Plugin]]:
    if isinstance(plugins, Plugin):
        if name is None:
            seen = {p["name"] for record in records for p in record.get("plugins", ())}
            wanted = _label(type(plugins))
            found = sorted(n for n in seen if n.rsplit(":", 1)[-1].split(".")[0].lower() == wanted)
            if len(found) != 1:
                raise ValueError(f"which plugin of the records is {type(plugins).__name__}? give name= "
                                 f"(the records name: {', '.join(sorted(seen)) or 'none'})")
            name = found[0]
        return [(name, plugins)]
    if isinstance(plugins, Mapping):
        return list(plugins.items())
    return list(plugins)


def _request(record: dict[str, Any]) -> Request:
    headers = [(k, v) for k, v in record.get("request_headers", ())]
    body = body_bytes(record, "request") or b""
    return Request(record["method"], record["path"], query=record.get("query") or "", headers=headers, body=body,
                   peer=record.get("peer"), service=record.get("service") or "",
                   id=record.get("request_id"), state={LISTENER: _LISTENERS.get(record.get("direction", ""))})


_LISTENERS = {"inbound": "mesh", "public": "public", "outbound": "outbound"}


def _recorded_response(record: dict[str, Any]) -> Response:
    headers = [(k, v) for k, v in record.get("response_headers", ()) if k.lower() not in _NOT_FORWARDED]
    return Response(record["status"], body_bytes(record, "response") or b"", headers)


def _records(source: str | Path | Iterable[str] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(source, str | Path):
        return list(read_records(source))
    items: list[Any] = list(source)
    if items and isinstance(items[0], dict):
        return items
    return list(read_records(items))


async def replay(source: str | Path | Iterable[str] | Iterable[dict[str, Any]],
                 plugins: Plugin | Mapping[str, Plugin] | Sequence[tuple[str, Plugin]], *,
                 name: str | None = None, headers: Sequence[str] = ()) -> ReplayReport:
    """Replay the records of ``source`` through ``plugins`` (see the module docstring).

    ``source``: a ``mesh tap --save`` file, its lines, or records. ``plugins``: one plugin
    (``name``: the name the records give it, found from its class when left out), or
    ``{name: plugin}`` / ``[(name, plugin)]`` for several, first outermost. Start them first
    (`mesh.testing.started`). ``headers``: response headers that must match as well.
    """
    records = _records(source)
    chain_plugins = _named(plugins, name, records)
    names = {n for n, _ in chain_plugins}
    warnings: list[str] = []
    if any(value == REDACTED for record in records for _, value in record.get("request_headers", ())):
        warnings.append("some credentials were recorded as <redacted> (record with `mesh tap --secrets` "
                        "to replay them)")
    current: list[dict[str, Any]] = []  # the record being replayed, and whether its upstream was reached
    reached: list[bool] = []

    async def upstream(request: Request) -> Response:
        reached.append(True)
        record = current[0]
        if record.get("answered_by") in names:  # it never reached the app: there is no answer of its to give
            return Response(200, b"", {"x-mesh-replay": "no recorded upstream answer"})
        return _recorded_response(record)

    chain = Chain(chain_plugins, upstream, _Meter())
    results: list[Replayed] = []
    skipped = 0
    for record in records:
        ran = {p["name"] for p in record.get("plugins", ())} | {record.get("answered_by")}
        if not names & ran:
            skipped += 1
            continue
        current[:] = [record]
        reached.clear()
        request = _request(record)
        response = await chain(request)
        by = request.state.get(ANSWERED_BY) if not reached else None
        result = Replayed(record, response.status, by)
        expected_by = record.get("answered_by") if record.get("answered_by") in names else None
        if by != expected_by:
            result.problems.append("a different decision")
        if response.status != record["status"]:
            result.problems.append(f"status {response.status}, recorded {record['status']}")
        recorded_headers = {k.lower(): v for k, v in record.get("response_headers", ())}
        for header in headers:
            if response.headers.get(header) != recorded_headers.get(header.lower()):
                result.problems.append(f"{header}: {response.headers.get(header)!r}, "
                                       f"recorded {recorded_headers.get(header.lower())!r}")
        await response.aclose()
        results.append(result)
    return ReplayReport(results, skipped, warnings)
