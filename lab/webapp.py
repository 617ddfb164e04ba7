"""A tiny demo web app: `GET /` answers its instance id, `GET /health` answers its health status.

Run it as `python -m lab.webapp --port 8080 --id web-1`. Tests start it in-process through
`start_webapp`, which returns a handle whose health status they can change.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class WebAppState:
    instance_id: str
    health_status: int = 200
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, keep-alive clients stall ~40 ms each.
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        """As GET, once the body is read: a request HAProxy never sends twice (not idempotent)."""
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(min(length, 1 << 20))
        self.do_GET()

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            state.requests += 1
        if self.path.rstrip("/").endswith("/health"):
            self._answer(state.health_status, f"{'ok' if state.health_status < 400 else 'failing'}\n")
        elif self.path.startswith("/slow/"):  # /slow/MS: answers after MS milliseconds (timeouts, queues)
            delay = self.path.removeprefix("/slow/").split("/")[0]
            time.sleep(min(int(delay), 10_000) / 1000 if delay.isdigit() else 0)
            self._answer(200, f"{state.instance_id}\n")
        else:
            self._answer(200, f"{state.instance_id}\n")

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Instance", self.server.state.instance_id)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a load test would otherwise print a line per request."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Python's default listen backlog is 5: under 16 load connections the kernel dropped new
    # connections, and the template's `observe layer4 error-limit 3` rightly took three failed
    # connects in a row for a dead server (the bench's soak failed 14-67% of its requests that
    # way, its only live server marked DOWN). Real servers listen with 128 or more.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (health checkers, load tools) are normal here: no traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def __init__(self, address: tuple[str, int], state: WebAppState) -> None:
        self.state = state
        super().__init__(address, _Handler)


class _Server6(_Server):
    address_family = socket.AF_INET6


@dataclass
class WebApp:
    """A running web app: its address, its state, and a way to stop it."""

    server: _Server
    thread: threading.Thread

    @property
    def state(self) -> WebAppState:
        return self.server.state

    @property
    def host(self) -> str:
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def set_health(self, status: int) -> None:
        self.state.health_status = status

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_webapp(instance_id: str, host: str = "127.0.0.1", port: int = 0) -> WebApp:
    """Start a web app on a thread; port 0 picks a free port."""
    server_class = _Server6 if ":" in host else _Server
    server = server_class((host, port), WebAppState(instance_id))
    thread = threading.Thread(target=server.serve_forever, name=f"webapp-{instance_id}", daemon=True)
    thread.start()
    return WebApp(server, thread)


def main() -> None:
    parser = argparse.ArgumentParser(description="consul-renderer demo web app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--id", default=socket.gethostname(), help="instance id it answers with (default: hostname)")
    args = parser.parse_args()
    app = start_webapp(args.id, args.host, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"webapp {args.id} listening on http://{app.host}:{app.port}/", flush=True)
    while not stop.wait(0.5):  # a timed wait: signal handlers run promptly
        pass
    app.stop()


if __name__ == "__main__":
    main()
