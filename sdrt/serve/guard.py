"""The ASGI middleware in front of every route: API key, body limits, and the request metrics.

Checked before the app reads anything: the key (Bearer, as the OpenAI client sends it, or HTTP Basic
with the key as password, as A1111 clients send theirs; compared in constant time), the Content-Length
(required for a body, not negative, at most max_body), and while the body streams in, its real size
and how long it takes (a client that stalls mid-body gets 408)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import time

from starlette.exceptions import HTTPException

from sdrt.serve.responses import error_response

OPEN_PATHS = ("/health", "/ready")  # probes answer without a key
# the routes that queue a generation: refused before their body is read while the queue is full
GENERATION_PATHS = ("/generate", "/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img",
                    "/sdapi/v1/img2img")


class Guard:
    def __init__(self, app, *, metrics, scheduler, routes: set[str], api_key: str | None, max_body: int,
                 body_timeout: float):
        self.app, self.metrics, self.scheduler, self.routes = app, metrics, scheduler, routes
        self.api_key, self.max_body, self.body_timeout = api_key, max_body, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0, status = scope["path"], time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        problem = self._problem(scope)
        try:
            if problem is not None:
                code, message, headers = problem
                if scope["method"] in ("POST", "PUT", "PATCH"):  # its body is left unread: don't reuse the link
                    headers = {**(headers or {}), "Connection": "close"}
                self.metrics.rejections.labels({401: "auth", 429: "queue_full"}.get(code, "body")).inc()
                await error_response(path, code, message, headers)(scope, receive, send_status)
            else:
                await self.app(scope, self._limited(receive), send_status)
        finally:
            route = path if path in self.routes else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    def _problem(self, scope) -> tuple[int, str, dict | None] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers.get("authorization")):
            return 401, "a valid API key is required (Authorization: Bearer KEY)", {"WWW-Authenticate": "Bearer"}
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        if scope["path"] in GENERATION_PATHS and self.scheduler.full():  # cheap, so a flood can't stall the loop
            retry = self.scheduler.retry_after()
            return 429, f"the queue is full; retry in {retry} s", {"Retry-After": str(retry)}
        length = headers.get("content-length")
        if length is None:
            if "chunked" in headers.get("transfer-encoding", ""):
                return None  # counted as it arrives
            return 411, "Content-Length is required", None
        if not length.isdigit():
            return 400, f"Content-Length {length[:20]!r} is not a byte count", None
        if int(length) > self.max_body:
            return 413, f"body of {int(length)} bytes; the limit is {self.max_body}", None
        return None

    def _authorized(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        given = value.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def _limited(self, receive):
        """receive() that stops a body longer than max_body (413) or stalled for body_timeout s (408)."""
        seen, done = [0], [False]

        async def limited():
            if done[0]:
                return await receive()  # after the body: disconnect polling waits as long as it likes
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the body did not arrive within {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:
                    raise HTTPException(413, f"body over the limit of {self.max_body} bytes")
                done[0] = not message.get("more_body", False)
            return message

        return limited
