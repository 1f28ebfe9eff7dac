"""Typed keys of ``request.state``: what mesh's layers and plugins hand each other.

``request.state`` is a plain dict that travels down the chain. What mesh
itself puts there or reads from it goes under these keys, each with the
type of its value::

    from mesh import DEADLINE, UPSTREAM

    request.state[UPSTREAM] = "orders"                 # forward to orders instead
    left = request.state[DEADLINE] - time.monotonic()  # seconds left, if a deadline is set

A `StateKey` is a ``str`` (the name below), so ``request.state[UPSTREAM]``
and ``request.state["upstream"]`` are the same entry. The constants say
the type and cannot be misspelt; mesh's own keys that are not meant to
be written by hand start with ``mesh.``.

=================  ==================  =====================================================
key                value               set by, read by
=================  ==================  =====================================================
``UPSTREAM``       ``str``             the service a request goes to: the outbound listener
                                       (the name the app called), a plugin such as
                                       ``router`` (``to``); read by the terminal and the
                                       outbound layers. Unset on the inbound side: the own app
``CLAIMS``         ``dict``            a verified token's claims (``jwt``)
``DEADLINE``       ``float``           when the response head is due, in `time.monotonic`
                                       seconds: the caller's deadline (inbound) or the call's
                                       (outbound); bounds every try
``TIMEOUT``        ``float``           this request's whole-call timeout in seconds, all tries
                                       included, in place of the route's (``0``: none); read
                                       by the outbound `Deadline` layer, and bounds a call to
                                       the own app too
``RETRIES``        `Retries`           this request's retry policy, over the route's (keys left
                                       None come from it); read by the `Retry` layer, and
                                       makes a call to the own app retried too
``LISTENER``       ``str``             where the request came in: ``"mesh"`` (another
                                       sidecar), ``"public"`` (outside, ``expose``) or
                                       ``"outbound"`` (the app)
``TRY_TIMEOUT``    ``float``           the bound of one try (`Retry` -> terminal)
``BACKEND``        instance or None    the instance the terminal sent the current try to
                                       (terminal -> `Retry`)
``AVOID``          list of instances   instances earlier tries went to (`Retry` -> balancer)
``LOG_FIELDS``     ``dict``            fields a plugin adds to the request's access log line
                                       (``request.state.setdefault(LOG_FIELDS, {})["user"] = ...``);
                                       mesh's own fields win over a plugin's of the same name
=================  ==================  =====================================================
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from mesh.config import Retries
    from mesh.sidecar.balancer import Backend

__all__ = ["AVOID", "BACKEND", "CLAIMS", "DEADLINE", "LISTENER", "LOG_FIELDS", "RETRIES", "StateKey", "TIMEOUT",
           "TRY_TIMEOUT", "UPSTREAM"]

T = TypeVar("T")


class StateKey(str, Generic[T]):
    """A key of ``request.state`` (or of `Context.state`) whose values are ``T``.

    ``StateKey("upstream")`` is the string ``"upstream"`` itself: a plugin
    that still writes ``request.state["upstream"]`` and one that reads
    ``request.state[UPSTREAM]`` share the entry. The type parameter is for
    the type checker; at run time a key is a plain, interned ``str``, so the
    dicts on the request path keep their all-string fast lookups.
    """

    __slots__ = ()

    def __new__(cls, name: str) -> StateKey[T]:
        return sys.intern(name)  # type: ignore[return-value]


UPSTREAM: StateKey[str] = StateKey("upstream")
CLAIMS: StateKey[dict[str, Any]] = StateKey("claims")
DEADLINE: StateKey[float] = StateKey("deadline")
TIMEOUT: StateKey[float] = StateKey("mesh.timeout")
RETRIES: StateKey[Retries] = StateKey("mesh.retries")
LISTENER: StateKey[str] = StateKey("mesh.listener")
TRY_TIMEOUT: StateKey[float] = StateKey("mesh.try_timeout")
BACKEND: StateKey[Backend | None] = StateKey("mesh.backend")
AVOID: StateKey[list[Backend]] = StateKey("mesh.avoid")
LOG_FIELDS: StateKey[dict[str, Any]] = StateKey("mesh.log_fields")
