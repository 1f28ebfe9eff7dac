"""The control plane: what `mesh up` runs.

`controller` (one run of a mesh), `instances` (the one API through which
everything adds, starts, stops and certifies instances), `ca` (the mesh
CA: certificates are issued here only), `supervisor` (restarts and
lifecycle hooks), `autoscale`, `keyed` (per-key instances), `state` (what
`mesh ps` and `mesh down` read without a running controller), `runtimes/`
(process and Docker) and `docker/` (the engine, images, containers).
"""
