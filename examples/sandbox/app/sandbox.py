"""A sandbox: POST /run with Python code as the body; it runs in this instance's working directory.

One instance per session (``X-Session``), started by the mesh on the session's
first request and put to sleep after a minute idle. Each run is a child
process with limits (``resource.setrlimit``): CPU seconds, address space,
file size, open files, and a wall-clock timeout. Files a run writes stay in
the session's working directory for its next runs, also after the instance
slept: ``<session hash>`` in the session's own volume (``MESH_VOLUME``, which
the mesh gives each key with ``instances.volume``), or in ``DATA_DIR``
without one.

GET / says which process serves (pid), for which session, and since when.
"""

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CPU_SECONDS = int(os.environ.get("SANDBOX_CPU", "2"))
MEMORY = int(os.environ.get("SANDBOX_MEMORY_MB", "256")) << 20
WALL_SECONDS = float(os.environ.get("SANDBOX_WALL", "5"))
MAX_CODE = 64 * 1024
MAX_OUTPUT = 64 * 1024
DATA = Path(os.environ.get("MESH_VOLUME") or os.environ.get("DATA_DIR", "data")).resolve()
STARTED = time.time()
SESSIONS: set[str] = set()


def limits() -> None:
    """In the child, before it runs the code."""
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def workdir(session: str) -> Path:
    folder = DATA / hashlib.sha256(session.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run(code: bytes, folder: Path) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(folder), "LANG": "C.UTF-8"}
    began = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-I", "-c", code.decode("utf-8", "replace")], cwd=folder,
                              env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=WALL_SECONDS, preexec_fn=limits, start_new_session=True)
        result = {"exit": done.returncode, "stdout": done.stdout[:MAX_OUTPUT].decode("utf-8", "replace"),
                  "stderr": done.stderr[-MAX_OUTPUT:].decode("utf-8", "replace"), "timeout": False}
        if done.returncode == -9 or done.returncode == -24:  # SIGKILL / SIGXCPU: over the CPU limit
            result["limit"] = "cpu"
    except subprocess.TimeoutExpired as exc:
        result = {"exit": None, "stdout": (exc.stdout or b"")[:MAX_OUTPUT].decode("utf-8", "replace"),
                  "stderr": (exc.stderr or b"")[-MAX_OUTPUT:].decode("utf-8", "replace"),
                  "timeout": True, "limit": "wall"}
    result["seconds"] = round(time.monotonic() - began, 3)
    return result


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status: int, data: dict) -> None:
        body = json.dumps(data).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def session(self) -> str | None:
        session = self.headers.get("X-Session")
        if session:
            SESSIONS.add(session)
        return session

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.reply(200, {"ok": True})
            return
        self.reply(200, {"pid": os.getpid(), "session": self.session(), "sessions": len(SESSIONS),
                         "up": round(time.time() - STARTED, 1)})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.path != "/run":
            self.reply(404, {"error": "POST /run with Python code as the body"})
            return
        if length > MAX_CODE:
            self.reply(413, {"error": f"code over {MAX_CODE} bytes"})
            return
        code = self.rfile.read(length)
        session = self.session()
        if not session:
            self.reply(400, {"error": "X-Session header needed"})
            return
        result = run(code, workdir(session))
        result["pid"] = os.getpid()
        self.reply(200, result)

    def log_message(self, *args) -> None:
        pass


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    print(f"sandbox {os.getpid()} on {port}, data in {DATA}", flush=True)
    ThreadingHTTPServer(("127.0.0.1" if os.environ.get("SANDBOX_LOOPBACK", "1") == "1" else "0.0.0.0",
                         port), Handler).serve_forever()
