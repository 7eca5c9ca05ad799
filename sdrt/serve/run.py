"""Running the app on uvicorn: a listening socket first (so port 0 can be reported), then uvicorn until
SIGINT / SIGTERM, which stop taking connections, let the requests in flight finish (the drain), and
stop the worker before the process exits (a second signal cancels what is still running)."""

from __future__ import annotations

import json
import socket
import sys

from sdrt.errors import InputError

BACKLOG = 2048  # connections the kernel holds while the loop is busy (http.server's 5 reset clients)


def listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def server(app, *, drain_timeout: float | None = None, access_log: bool = True):
    """A uvicorn.Server for APP (JSON answers to malformed HTTP too)."""
    import uvicorn

    config = uvicorn.Config(app, http=_http_protocol(), log_config=None, access_log=access_log, backlog=BACKLOG,
                            timeout_keep_alive=5, timeout_graceful_shutdown=drain_timeout, lifespan="on")
    return uvicorn.Server(config)


def run(app, sock: socket.socket, *, drain_timeout: float | None = None, access_log: bool = True) -> None:
    """Serve APP on SOCK until SIGINT or SIGTERM; returns after the drain and the app's shutdown (the
    signal was handled: uvicorn's re-raise of it on the way out is absorbed, so the exit is clean)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)  # what uvicorn restores and re-raises into once it is done
    sys.setswitchinterval(0.001)  # the event loop waits at most ~1 ms for the GIL (default 5 ms)
    server(app, drain_timeout=drain_timeout, access_log=access_log).run(sockets=[sock])


def _http_protocol():
    """uvicorn's HTTP protocol (httptools, the C parser, where installed; else h11), answering a request
    the parser refuses (a negative Content-Length, a bad header line) with JSON that names the problem
    instead of a plain "Invalid HTTP request received."."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class JsonErrors(Base):
        def send_400_response(self, msg: str) -> None:
            problem = sys.exc_info()[1]  # called from uvicorn's `except <parser error>`
            detail = f"invalid HTTP request: {problem}" if problem else msg
            body = json.dumps({"error": detail}).encode()
            head = (f"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                    "connection: close\r\n\r\n")
            self.transport.write(head.encode() + body)
            self.transport.close()

    return JsonErrors
