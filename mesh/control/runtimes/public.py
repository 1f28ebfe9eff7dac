"""The public sockets of exposed services: opened and held by the controller, handed to every sidecar.

The process and docker runtimes open the public socket of each exposed
service once (bound to 127.0.0.1:``expose`` and listening, when its first
instance starts) and hold it while the mesh runs. Every instance of the
service serves it: the runtime offers it on a unix socket before the
sidecar starts (`mesh.sidecar.handoff.Offer`; the sidecar runs with
``--public-handoff`` and connects there as it starts) and hands it over
(`hand_over`) once the instance's app is ready, so that a sidecar joining
others takes no outside requests before its app can answer them; or, when
no other sidecar serves the socket (the mesh starting, a lone instance
started again), as soon as the sidecar is ready, so that callers get its
503 with ``Retry-After`` while the app starts instead of a wait. The
instances of a service then share its public port: during a replacement the
old and the new sidecar both accept, the old one stops when it drains, and
while no sidecar accepts the kernel queues connections (up to the backlog)
rather than refusing them.

A socket is closed once no instance holds it and the mesh no longer exposes
the service on that port (a reload changed ``expose`` or removed the
service), and when the run ends. Keyed services are not here: their front,
in the controller, serves ``expose`` itself (`mesh.control.keyed`).
"""

from __future__ import annotations

import socket
from pathlib import Path

from mesh.config import MeshConfig
from mesh.control.runtimes.base import Instance, StartFailed
from mesh.sidecar.handoff import Offer

__all__ = ["HANDOFF_TIMEOUT", "PublicSockets"]

HANDOFF_TIMEOUT = 10.0  # seconds a ready sidecar may take to be found connected to its offer
_BACKLOG = 1024  # connections the kernel queues while no sidecar accepts (capped by net.core.somaxconn)


class PublicSockets:
    """The public sockets of one run, by (service, port), and the offers of the sidecars starting.

    ``folder``: where the offers' unix sockets go, ``<folder>/<label>/public.sock`` (`offer`).
    """

    def __init__(self, folder: Path, *, peer_role: str | None = None) -> None:
        self.folder = folder
        # Where the app runs as the sidecar's user (the process runtime), the offer gives the socket
        # only to the process of this role (`Offer.give`'s ``peer``); a container reaches no offer but its own.
        self.peer_role = peer_role
        self._sockets: dict[tuple[str, int], socket.socket] = {}
        self._holders: dict[tuple[str, int], set[str]] = {}  # instance labels given (or offered) it
        self._serving: dict[tuple[str, int], set[str]] = {}  # instance labels given it
        self._offers: dict[str, Offer] = {}  # label -> the offer its sidecar connects to

    def offer_folder(self, instance: Instance) -> Path:
        """The folder of the instance's offer (a container mounts it, and nothing else of the host's)."""
        return self.folder / instance.label

    def offer(self, instance: Instance) -> Path:
        """Before the instance's sidecar starts: its service's public socket opened if it is not yet
        (`StartFailed` if the port cannot be had), and an offer made for the sidecar; its path."""
        key = self._key(instance)
        if key not in self._sockets:
            try:
                self._sockets[key] = socket.create_server(("127.0.0.1", key[1]), backlog=_BACKLOG)
            except OSError as exc:
                raise StartFailed(instance.label, f"cannot expose it on 127.0.0.1:{key[1]}: {exc.strerror or exc} "
                                  f"(services.{instance.service}.expose)") from None
        self.withdraw(instance)
        path = self.offer_folder(instance) / "public.sock"
        try:
            self._offers[instance.label] = Offer(path)
        except OSError as exc:
            raise StartFailed(instance.label, f"cannot make {path} to hand its sidecar the public socket: "
                              f"{exc}") from None
        self._holders.setdefault(key, set()).add(instance.label)
        return path

    async def hand_over(self, instance: Instance, *, app_ready: bool) -> None:
        """Give the instance's sidecar (ready) the public socket if it is time (see the module docstring):
        ``app_ready``, or no other sidecar serves it. Nothing if it has it already; `StartFailed` if
        the sidecar does not take it."""
        key = self._key(instance)
        serving = self._serving.setdefault(key, set())
        if instance.label not in self._offers or (serving and not app_ready):
            return
        offer = self._offers.pop(instance.label)
        serving.add(instance.label)
        try:
            peer = instance.pids.get(self.peer_role) if self.peer_role is not None else None
            if self.peer_role is not None and peer is None:
                raise OSError(f"no {self.peer_role} process to hand it to")
            await offer.give(self._sockets[key], "public", HANDOFF_TIMEOUT, peer=peer)
        except OSError as exc:
            serving.discard(instance.label)
            raise StartFailed(instance.label, f"its sidecar did not take the public socket: "
                              f"{type(exc).__name__}: {exc}") from None
        finally:
            offer.close()

    def withdraw(self, instance: Instance) -> None:
        """Its offer, if still open, closed (a start that failed or was cancelled)."""
        offer = self._offers.pop(instance.label, None)
        if offer is not None:
            offer.close()

    def release(self, instance: Instance, config: MeshConfig) -> None:
        """The instance's sidecar stopped: it holds its public socket no longer; the socket is closed
        if no other instance holds it and ``config`` no longer exposes the service on its port."""
        self.withdraw(instance)
        if "public" not in instance.ports:
            return
        key = self._key(instance)
        self._serving.get(key, set()).discard(instance.label)
        holders = self._holders.get(key, set())
        holders.discard(instance.label)
        spec = config.services.get(instance.service)
        if not holders and (spec is None or spec.expose != key[1]) and key in self._sockets:
            self._sockets.pop(key).close()
            self._holders.pop(key, None)
            self._serving.pop(key, None)

    def close(self) -> None:
        """Every socket and offer closed (the run ends)."""
        for offer in self._offers.values():
            offer.close()
        self._offers.clear()
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._holders.clear()
        self._serving.clear()

    @staticmethod
    def _key(instance: Instance) -> tuple[str, int]:
        return instance.service, instance.ports["public"]
