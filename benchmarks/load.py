"""A bounded load generator for `sdrt serve`: CLIENTS threads send REQUESTS requests in all (each client
on its own keep-alive connection) to a server on this machine only, then it stops and prints throughput,
latency percentiles and a count of each status. Standard library only.

    python benchmarks/load.py http://127.0.0.1:8000 --clients 16 --requests 200 \\
        --body '{"prompt": "a cat", "steps": 2}' [--health] [--slowloris 50] [--server-pid PID] [--json out.json]

--health probes GET /health every 50 ms meanwhile (its worst latency is reported); --slowloris N holds N
connections that send a header byte a second and never finish; --server-pid samples the server's RSS.
After a 429 a client waits its Retry-After (at most 10 s), as the openai client does; --no-backoff
resends at once. Statuses: the HTTP code, or `reset` / `refused` / `timeout` / `error` for a request that got no answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


class Load:
    def __init__(self, url: str, path: str, bodies: list[bytes], clients: int, requests: int, timeout: float,
                 headers: dict | None = None, backoff: bool = True):
        parts = urlsplit(url)
        if parts.hostname not in LOOPBACK:
            raise SystemExit(f"load.py sends traffic to this machine only (127.0.0.1), not {parts.hostname}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.path, self.bodies, self.clients, self.timeout = path, bodies, clients, timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.left, self.backoff = requests, backoff
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()
        self.latencies: list[float] = []  # of the 200s

    def _take(self) -> bytes | None:
        """The next request's body (the bodies in turn), or None when all are sent."""
        with self.lock:
            if self.left <= 0:
                return None
            self.left -= 1
            return self.bodies[self.left % len(self.bodies)]

    def _client(self) -> None:
        conn = None
        while (body := self._take()) is not None:
            conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            t0, wait = time.perf_counter(), 0.0
            try:
                conn.request("POST", self.path, body, self.headers)
                r = conn.getresponse()
                r.read()
                status = r.status
                wait = float(r.getheader("retry-after") or 0) if status == 429 and self.backoff else 0
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                status, conn = "reset", conn.close()
            except ConnectionRefusedError:
                status, conn = "refused", None
            except TimeoutError:
                status, conn = "timeout", conn.close()
            except OSError:
                status, conn = "error", conn.close()
            with self.lock:
                self.statuses[status] += 1
                if status == 200:
                    self.latencies.append(time.perf_counter() - t0)
            if status == 429 and self.backoff:  # as a client that honours Retry-After (the openai client does),
                if conn is not None:  # on a new connection: the server drops idle ones after 5 s
                    conn.close()
                    conn = None
                time.sleep(min(wait, 10))
        if conn is not None:
            conn.close()

    def run(self) -> dict:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        ok = self.statuses.get(200, 0)
        return {"clients": self.clients, "requests": sum(self.statuses.values()), "seconds": round(seconds, 2),
                "ok_per_second": round(ok / seconds, 4),
                "latency_s": {f"p{q}": _round(percentile(self.latencies, q)) for q in (50, 95, 99)},
                "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)}}


def _round(x):
    return None if x is None else round(x, 4)


class HealthProbe(threading.Thread):
    """GET /health every 50 ms on a fresh connection; `worst` is the slowest answer (None: none failed)."""

    def __init__(self, host: str, port: int):
        super().__init__(daemon=True)
        self.host, self.port, self.stop, self.times, self.failures = host, port, threading.Event(), [], 0

    def run(self):
        while not self.stop.wait(0.05):
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("GET", "/health")
                ok = conn.getresponse().status == 200
                conn.close()
            except OSError:
                ok = False
            self.failures += not ok
            self.times.append(time.perf_counter() - t0)

    def summary(self) -> dict:
        return {"probes": len(self.times), "failures": self.failures, "worst_s": _round(max(self.times, default=None)),
                "p99_s": _round(percentile(self.times, 99))}


class Slowloris(threading.Thread):
    """N connections that send a request line and then one header byte a second, never finishing."""

    def __init__(self, host: str, port: int, n: int):
        super().__init__(daemon=True)
        self.host, self.port, self.n, self.stop, self.open = host, port, n, threading.Event(), 0

    def run(self):
        socks = []
        for _ in range(self.n):
            try:
                s = socket.create_connection((self.host, self.port), timeout=5)
                s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
                socks.append(s)
            except OSError:
                pass
        while not self.stop.wait(1):
            for s in list(socks):
                try:
                    s.sendall(b"X")
                except OSError:
                    socks.remove(s)
            self.open = len(socks)
        for s in socks:
            s.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the server, on 127.0.0.1")
    p.add_argument("--path", default="/generate")
    p.add_argument("--body", action="append", help="JSON body; repeat it for a mix, sent in turn "
                                                   "(default: {\"prompt\": \"a cat\", \"steps\": 2})")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200, help="in all, over every client")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--health", action="store_true", help="probe /health every 50 ms meanwhile")
    p.add_argument("--slowloris", type=int, default=0, help="hold N stalled connections meanwhile")
    p.add_argument("--server-pid", type=int, help="sample this process's RSS before and after")
    p.add_argument("--no-backoff", action="store_true", help="resend at once after a 429 (a flood), instead of "
                                                              "waiting its Retry-After")
    p.add_argument("--api-key")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if not (1 <= args.clients <= 1024 and 1 <= args.requests <= 100_000):
        raise SystemExit("--clients must be 1..1024 and --requests 1..100000")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    bodies = [b.encode() for b in args.body or ['{"prompt": "a cat", "steps": 2}']]
    load = Load(args.url, args.path, bodies, args.clients, args.requests, args.timeout, headers,
                not args.no_backoff)
    probe = HealthProbe(load.host, load.port) if args.health else None
    loris = Slowloris(load.host, load.port, args.slowloris) if args.slowloris else None
    rss0 = rss_mb(args.server_pid) if args.server_pid else None
    for t in (probe, loris):
        if t:
            t.start()
    result = load.run()
    for t in (probe, loris):
        if t:
            t.stop.set()
    if probe:
        result["health"] = probe.summary()
    if loris:
        result["slowloris_open"] = loris.open
    if args.server_pid:
        result["server_rss_mb"] = {"before": _round(rss0), "after": _round(rss_mb(args.server_pid))}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
