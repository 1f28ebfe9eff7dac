"""A service only other services reach: it greets, and tells who called it.

Its sidecar passes the caller's identity as the ``x-mesh-peer`` header.
``/admin`` exists but no route allows anyone to call it through the mesh.
"""

import os
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GREETING = os.environ.get("GREETING", "Hello")


class Greeter(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/healthz":
            self.reply(200, "ok\n")
        elif url.path == "/hello":
            name = urllib.parse.parse_qs(url.query).get("name", ["world"])[0]
            caller = self.headers.get("x-mesh-peer", "someone outside the mesh")
            self.reply(200, f"{GREETING}, {name}! (called by {caller})\n")
        elif url.path == "/admin":
            self.reply(200, "greeter's admin page: the mesh should never let a call get here\n")
        else:
            self.reply(404, "try /hello\n")

    def reply(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else '?'}", flush=True)


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    host = os.environ.get("BIND", "127.0.0.1")  # examples/docker-hello binds greeter to 0.0.0.0
    print(f"greeter listening on {host}:{port}", flush=True)
    ThreadingHTTPServer((host, port), Greeter).serve_forever()
