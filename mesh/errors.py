"""The few exceptions mesh raises.

- `MeshError`: base of everything below.
  - `ConfigError`: a mesh.toml (or plugin options) with problems; ``problems``
    lists every one, each naming its key path.
  - `PluginError`: a plugin could not be loaded or started.
  - `UpstreamError`: forwarding failed; carries the HTTP status the client
    gets (502 unreachable or broken, 503 no instance, 504 timed out).
    - `mesh.http.client.ConnectFailed` (502 or 504): nothing was sent, any method may retry.
    - `mesh.http.client.UpstreamTimeout` (504): no response head in time.
  - `BodyTooLarge`: a buffered read passed its limit (413 for requests).
  - `ClientTimeout`: the client stopped sending its request body (408).
"""

from __future__ import annotations


class MeshError(Exception):
    pass


class ConfigError(MeshError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PluginError(MeshError):
    pass


class UpstreamError(MeshError):
    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


class BodyTooLarge(MeshError):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"body larger than {limit} bytes")


class ClientTimeout(MeshError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
