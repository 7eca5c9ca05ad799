"""Helpers for the server tests: a real uvicorn server in a thread, raw HTTP, and a gate that holds a
generation at its first step (so queueing, batching and cancelling are tested without timing luck)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

from sdrt.serve import create_app, listen, server


class LiveServer:
    """create_app(CONFIG) on uvicorn, on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, config):
        self.app = create_app(config)
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = server(self.app, access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not (self.server.started and self.service.ready.is_set()):
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    @property
    def service(self):
        return self.app.state.service

    def stop(self):
        self.server.should_exit = True
        self.thread.join(120)


def call(url: str, path: str, body=None, method: str | None = None, headers: dict | None = None, timeout=120):
    """(status, JSON answer, headers)."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def raw_http(port: int, data: bytes, timeout: float = 60) -> tuple[int, bytes]:
    """Send DATA as is; (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: *(\d+)", head, re.I)
            if sep and length and len(body) >= int(length[1]):
                break
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def post_raw(port: int, path: str, body: bytes, extra: bytes = b"") -> tuple[int, bytes]:
    head = b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
    return raw_http(port, head % (path.encode(), len(body), extra) + body)


class Gate:
    """Wraps a Pipeline so every generation waits at its first step until `release` is set, calling the
    scheduler's step callback meanwhile (so cancellation is seen as at a real step)."""

    def __init__(self, pipe):
        self.pipe, self.running, self.release = pipe, threading.Event(), threading.Event()
        self.calls = []  # the request count of each generation

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def _hold(self, callback):
        def step(i, total, x, x0):
            if i == 0:
                self.running.set()
                while not self.release.wait(0.02):
                    callback(i, total, x, x0)
            callback(i, total, x, x0)
        return step

    def __call__(self, req, callback=None):
        self.calls.append(1)
        return self.pipe(req, callback=self._hold(callback))

    def generate_batch(self, reqs, callback=None):
        self.calls.append(len(reqs))
        return self.pipe.generate_batch(reqs, callback=self._hold(callback))
