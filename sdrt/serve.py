"""`sdrt serve`: one engine dir behind a small HTTP/JSON API, on the standard library alone.

    GET  /health    {"status": "ok"} (answers while a generation runs)
    GET  /info      the model, provider, samplers and limits
    POST /generate  JSON in (sdrt.runtime.request.GenerateRequest's fields), JSON out: base64 PNGs
                    (with A1111 metadata), seeds, parameters, seconds

One pipeline serves every request; generations run one at a time (each already uses every core or
the whole GPU), others wait their turn. Bad input is a 400 with {"error": "..."} naming the problem;
an unknown path 404, a wrong method 405, a body over the limit 413. A failure inside the engines is
a 500 with its one-line message, and the server goes on serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sdrt.errors import InputError, SdrtError, first_line, one_line

log = logging.getLogger(__name__)

MAX_BODY = 32 << 20  # bytes: two base64 images of a few megapixels


def _decode_image(field: str, text: str):
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("L" if field == "mask" else "RGB")
    except (binascii.Error, ValueError):
        raise InputError(f"{field}: not base64") from None
    except (OSError, UnidentifiedImageError):
        raise InputError(f"{field}: not an image Pillow can read (base64 of a PNG or JPEG file)") from None


def request_fields() -> dict:
    """The JSON fields of POST /generate: GenerateRequest's, less the Python-only ones."""
    from sdrt.runtime.request import GenerateRequest

    return {f.name: f for f in GenerateRequest.fields(python_only=False)}


def parse_request(body: bytes, max_images: int):
    """A GenerateRequest from a /generate body; InputError names what is wrong."""
    from sdrt.runtime.request import GenerateRequest

    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise InputError(f"body is not JSON: {first_line(e)}") from None
    if not isinstance(req, dict):
        raise InputError("body must be a JSON object")
    fields = request_fields()
    unknown = sorted(set(req) - set(fields))
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(fields)}")
    if "prompt" not in req:
        raise InputError("prompt is required")
    kwargs = {}
    for name, value in req.items():
        if fields[name].metadata["kind"] == "image" and value is not None:
            if not isinstance(value, str):
                raise InputError(f"{name}: expected base64 of a PNG or JPEG file")
            value = _decode_image(name, value)
        kwargs[name] = value
    request = GenerateRequest.make(**kwargs)
    if request.num_images > max_images:
        raise InputError(f"num_images: at most {max_images} per request (sdrt serve --max-images)")
    return request


class Server:
    """The pipeline and its lock; `make_http_server` puts it behind HTTP."""

    def __init__(self, engine_dir: str | Path, provider: str = "cpu", max_images: int = 4):
        from sdrt.runtime.pipeline import Pipeline
        from sdrt.runtime.request import MAX_IMAGES

        if not 1 <= max_images <= MAX_IMAGES:
            raise InputError(f"--max-images must be from 1 to {MAX_IMAGES}, got {max_images}")
        self.engine_dir, self.provider, self.max_images = Path(engine_dir), provider, max_images
        self.pipe = Pipeline.load(engine_dir, provider=provider)
        self.lock = threading.Lock()

    def warmup(self) -> None:
        """Create every session now, so the first request doesn't pay for it."""
        self.pipe.warmup()

    def info(self) -> dict:
        from sdrt.runtime import samplers

        m = self.pipe.manifest
        return {"engine_dir": str(self.engine_dir), "provider": self.provider, "pipeline": m.pipeline,
                "source": m.source.get("name"), "prediction_type": m.prediction_type,
                "default_size": m.default_image_size, "max_images": self.max_images,
                "samplers": list(samplers.SAMPLERS), "default_sampler": samplers.DEFAULT_SAMPLER,
                "fields": list(request_fields())}

    def generate(self, body: bytes) -> dict:
        from sdrt.runtime.images import png_bytes

        request = parse_request(body, self.max_images)
        t0 = time.perf_counter()
        with self.lock:
            waited = time.perf_counter() - t0
            result = self.pipe(request)
        images = [base64.b64encode(png_bytes(image, text)).decode()
                  for image, text in zip(result.images, result.parameters)]
        return {"images": images, "seeds": result.seeds, "parameters": result.parameters,
                "seconds": round(time.perf_counter() - t0 - waited, 3), "queued_seconds": round(waited, 3)}

    def close(self) -> None:
        self.pipe.close()


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 JSON handler over a Server (the `app` attribute, set by make_http_server)."""

    protocol_version = "HTTP/1.1"
    app: Server

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": one_line(message)})

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/info":
            self._send(200, self.app.info())
        elif self.path == "/generate":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST /generate with a JSON body")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path}; try /generate, /info, /health")

    def _body(self) -> bytes | None:
        """The request body, or None after answering why it can't be read (the connection then closes:
        an unread body would be taken for the next request)."""
        if self.path != "/generate":
            self.close_connection = True
            if self.path in ("/health", "/info"):
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"use GET {self.path}")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path}; try POST /generate")
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return None
        if length > MAX_BODY:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; the limit is {MAX_BODY}")
            return None
        return self.rfile.read(length)

    def do_POST(self):  # noqa: N802
        body = self._body()
        if body is None:
            return
        try:
            status, payload = 200, self.app.generate(body)
        except InputError as e:
            status, payload = HTTPStatus.BAD_REQUEST, {"error": str(e)}
        except SdrtError as e:
            log.error("generate failed: %s", e)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(e)}
        except Exception as e:  # an engine or library failure: say what, keep serving
            log.exception("generate failed")
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"generation failed: {type(e).__name__}: {e}"}
        if "error" in payload:
            payload["error"] = one_line(payload["error"])
        try:
            self._send(status, payload)
        except (BrokenPipeError, ConnectionResetError):  # the client left before its answer
            log.info("%s left before its answer", self.address_string())

    def log_message(self, fmt, *args):  # through logging, not bare stderr
        log.info("%s %s", self.address_string(), fmt % args)


def make_http_server(server: Server, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"app": server})
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
