"""First-party mesh plugins, written only against the public `mesh` API.

Installed as the package ``mesh_plugins``; mesh.toml names them by their
short names (see `mesh.loader.FIRST_PARTY`).
"""
