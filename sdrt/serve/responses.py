"""Error answers in each API's own shape (OpenAI's error object under /v1, A1111's under /sdapi, sdrt's
{"error": "..."} elsewhere), always one line, never a traceback; and images as base64 PNGs."""

from __future__ import annotations

import asyncio
import base64
from http import HTTPStatus

from starlette.responses import JSONResponse

from sdrt.errors import one_line


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict:
    message = one_line(message)
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": HTTPStatus(status).phrase}}
    if path.startswith("/sdapi/"):
        return {"error": HTTPStatus(status).phrase, "detail": message, "body": "", "errors": message}
    return {"error": message}


def error_response(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    param = message.split(":", 1)[0] if ":" in message and " " not in message.split(":", 1)[0] else None
    return JSONResponse(error_body(path, status, message, param), status_code=status, headers=headers)


async def png_b64(result) -> list[str]:
    """A sdrt Result's images as base64 PNGs, each with its A1111 `parameters` text chunk (compressed in a
    thread: the event loop goes on answering meanwhile)."""
    from sdrt.runtime.images import png_bytes

    def encode():
        return [base64.b64encode(png_bytes(im, text)).decode() for im, text in zip(result.images, result.parameters)]

    return await asyncio.to_thread(encode)
