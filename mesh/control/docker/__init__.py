"""Docker support for the Docker runtime: the engine client (`engine`), images (`images`, built on the
`rootfs` of `mesh/base-os`), container specs (`containers`), networks, the sandbox `firewall`, names and
labels (`layout`) and what `mesh ps`/`mesh down` read from the engine (`status`)."""
