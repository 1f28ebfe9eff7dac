"""Print a token signed with this folder's test key: ``python mint.py [sub] [--ttl 3600]``.

The keys here are for the example and for tests only. Never trust them
anywhere else: the private key is public, in this repository.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jwt

HERE = Path(__file__).resolve().parent


def mint(sub: str = "alice", ttl: int = 3600, issuer: str = "https://id.example",
         audience: str = "shop", **claims: object) -> str:
    """A token the example's ``jwt`` plugin accepts (RS256, kid ``example-1``)."""
    now = int(time.time())
    payload = {"sub": sub, "iss": issuer, "aud": audience, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, (HERE / "private.pem").read_bytes(), algorithm="RS256",
                      headers={"kid": "example-1"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sub", nargs="?", default="alice")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    args = parser.parse_args()
    print(mint(args.sub, args.ttl))
