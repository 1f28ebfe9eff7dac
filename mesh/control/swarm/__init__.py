"""Docker Swarm support for the swarm runtime (`mesh.control.runtimes.swarm`): names, labels and the
record of what a run made (`layout`), each task's firewall (`firewall`) and the supervisor it runs
(`task`), the Swarm service of a mesh service (`services`), and what `mesh ps`/`mesh down` ask of
the engine (`engine`)."""
