"""The front service: answers on $PORT and calls `greeter` by name through its sidecar.

urllib honours HTTP_PROXY, which `mesh up` points at this instance's
sidecar, so ``http://greeter/hello`` needs no address: the sidecar finds a
greeter instance, checks that a route allows the call, and forwards it.
"""

import os
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def call(url: str, traceparent: str | None = None) -> tuple[int, str]:
    """GET ``url``; the status and body, also when the answer is an error.

    ``traceparent`` (the sidecar's span, which this request arrived with) goes
    on with the call, so web's and greeter's sidecars log one trace.
    """
    headers = {"traceparent": traceparent} if traceparent else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except urllib.error.URLError as error:
        return 502, f"cannot reach the sidecar: {error.reason}\n"


class Web(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/healthz":
            self.reply(200, "ok\n")
        elif url.path == "/":
            name = urllib.parse.parse_qs(url.query).get("name", ["world"])[0]
            status, body = call("http://greeter/hello?" + urllib.parse.urlencode({"name": name}),
                                self.headers.get("traceparent"))
            self.reply(status, f"web asked greeter, greeter said: {body}")
        elif url.path == "/forbidden":
            # No route lets web call greeter's /admin: its sidecar refuses with 403.
            status, body = call("http://greeter/admin")
            self.reply(status, f"web asked greeter for /admin, the mesh said: {body}")
        else:
            self.reply(404, "try / or /forbidden\n")

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
    print(f"web listening on {host}:{port}", flush=True)
    ThreadingHTTPServer((host, port), Web).serve_forever()
