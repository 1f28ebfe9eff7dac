"""The data plane: what a sidecar runs on every request.

`sidecar` (the listeners and the two chains), `inbound` and `resilience`
(the built-in chain layers), `routes` (route policy), `registry` and
`balancer` (instances and picking one), `identity` (mutual TLS), `admin`
(the admin listener) and `front` (a keyed service's front). Nothing here
imports `mesh.control`.
"""
