"""The `gif` pool's app: POST a video to /convert, get an animated GIF back.

Query options: ``fps`` (default 10, 1-30), ``width`` (default 320, 16-1280),
``seconds`` (at most this much of the video, default 10, up to 60).
FFmpeg does the work in a child process; one conversion uses about one core,
which is what the pool scales on.
"""

import os
import shutil
import subprocess
import tempfile
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FFMPEG = shutil.which("ffmpeg")
MAX_UPLOAD = 100 * 1024 * 1024


def option(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(query.get(name, [default])[0])
    except ValueError:
        value = default
    return max(low, min(high, value))


class Convert(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if urllib.parse.urlsplit(self.path).path == "/healthz":
            # Not ready without ffmpeg: `mesh up` then says why instead of serving 500s.
            self.reply(200 if FFMPEG else 503, "ok\n" if FFMPEG else "ffmpeg not found on PATH\n")
        else:
            self.reply(404, "POST a video to /convert\n")

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/convert":
            self.reply(404, "POST a video to /convert\n")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_UPLOAD:
            self.reply(413 if length else 400, f"send a video of 1 byte to {MAX_UPLOAD} bytes\n")
            return
        query = urllib.parse.parse_qs(url.query)
        fps = option(query, "fps", 10, 1, 30)
        width = option(query, "width", 320, 16, 1280)
        seconds = option(query, "seconds", 10, 1, 60)
        with tempfile.TemporaryDirectory(prefix="gif-") as folder:
            source = os.path.join(folder, "in")
            target = os.path.join(folder, "out.gif")
            with open(source, "wb") as f:
                remaining = length
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    f.write(chunk)
                    remaining -= len(chunk)
            # One pass: a palette made from the clip itself, then used, for far better colours.
            graph = (f"fps={fps},scale={width}:-1:flags=lanczos,split[a][b];"
                     f"[a]palettegen[p];[b][p]paletteuse")
            done = subprocess.run([FFMPEG or "ffmpeg", "-nostdin", "-loglevel", "error", "-t", str(seconds),
                                   "-i", source, "-vf", graph, "-loop", "0", "-y", target],
                                  capture_output=True, timeout=300)
            if done.returncode != 0 or not os.path.exists(target):
                self.reply(422, "ffmpeg could not convert it: "
                           + done.stderr.decode(errors="replace")[-500:] + "\n")
                return
            with open(target, "rb") as f:
                body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "image/gif")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Converted-By", f"gif.{os.environ.get('MESH_INSTANCE', '?')}")
        self.end_headers()
        self.wfile.write(body)

    def reply(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    if not FFMPEG:
        print("ffmpeg not found on PATH: install it (apt-get install ffmpeg); /healthz answers 503",
              flush=True)
    ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), Convert).serve_forever()
