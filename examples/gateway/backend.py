"""A backend service: answers with its name, the path it got and the caller the mesh names.

Responses are cacheable for 30 seconds, so the gateway's cache plugin serves repeats.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"service": NAME, "path": self.path, "user": self.headers.get("x-user"),
                           "peer": self.headers.get("x-mesh-peer")}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "public, max-age=30")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(f"{self.command} {self.path} -> {args[1]}", flush=True)


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
