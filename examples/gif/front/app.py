"""The public entry of the gif mesh: POST /gif forwards the upload to the `gif` pool.

`http://gif/convert` goes through this instance's sidecar (HTTP_PROXY), which
picks one of the pool's instances in rotation.
"""

import os
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Front(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.reply(200, "ok\n", "text/plain")
        else:
            self.reply(200, "curl --data-binary @video.mp4 -o out.gif http://127.0.0.1:8082/gif\n",
                       "text/plain")

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/gif":
            self.reply(404, "POST a video to /gif\n", "text/plain")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        target = "http://gif/convert" + (f"?{url.query}" if url.query else "")
        request = urllib.request.Request(target, data=body, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=130) as response:
                self.reply(response.status, response.read(), response.headers.get("Content-Type", ""),
                           response.headers.get("X-Converted-By"))
        except urllib.error.HTTPError as error:
            self.reply(error.code, error.read(), error.headers.get("Content-Type", "text/plain"))
        except OSError as exc:
            self.reply(502, f"the gif pool did not answer: {exc}\n", "text/plain")

    def reply(self, status: int, body: bytes | str, kind: str, by: str | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if by:
            self.send_header("X-Converted-By", by)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), Front).serve_forever()
