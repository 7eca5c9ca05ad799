"""Reading what clients send: JSON bodies, base64 or uploaded images (their size checked from the
header, before any pixel is decoded), form fields, and the native /generate request. Every problem is
an InputError that names the field; nothing here trusts a client with a file path."""

from __future__ import annotations

import base64
import binascii
import io
import json

from sdrt.errors import InputError, first_line

MAX_BODY = 32 << 20  # bytes: two base64 images of a few megapixels
MAX_INPUT_PIXELS = 4096 * 4096  # an init image or mask; it is resized to at most 2048 px a side anyway


def parse_json(body: bytes) -> dict:
    """A JSON object from BODY; InputError for anything else (deep nesting, huge numbers included)."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise InputError(f"body is not JSON: {first_line(e)}") from None
    if not isinstance(obj, dict):
        raise InputError("body must be a JSON object")
    return obj


def open_image(field: str, data: bytes | str):
    """A PIL image from file bytes or base64 text (a `data:image/...;base64,` prefix is allowed, as A1111
    clients send), loaded in its own mode; too many pixels is refused from the header alone."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{field}: not base64") from None
    unreadable = InputError(f"{field}: not an image Pillow can read (a PNG or JPEG file)")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own limit, checked from the header
        raise InputError(f"{field}: too many pixels ({first_line(e)}); the limit is {MAX_INPUT_PIXELS:,}") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        raise unreadable from None
    w, h = im.size
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(f"{field}: {w}x{h} is {w * h:,} pixels; the limit is {MAX_INPUT_PIXELS:,}")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError):
        raise unreadable from None
    return im


def to_rgb(field: str, data):
    return open_image(field, data).convert("RGB")


def to_mask(field: str, data):
    return open_image(field, data).convert("L")


def request_fields() -> dict:
    """The JSON fields of POST /generate: GenerateRequest's, less the Python-only ones."""
    from sdrt.runtime.request import GenerateRequest

    return {f.name: f for f in GenerateRequest.fields(python_only=False)}


def make_request(values: dict, max_images: int, *, text: bool = False):
    """A GenerateRequest from client VALUES named as its fields (images as base64 or bytes; with TEXT,
    numbers as text, as an HTML form sends them); num_images at most MAX_IMAGES."""
    from sdrt.runtime.request import GenerateRequest, from_text

    fields = request_fields()
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        kind = fields[name].metadata["kind"]
        if kind == "image" and value is not None:
            if not isinstance(value, (str, bytes)):
                raise InputError(f"{name}: expected base64 of a PNG or JPEG file")
            value = {"mask": to_mask, "depth_map": open_image}.get(name, to_rgb)(name, value)  # depth: 16 bit kept
        elif kind == "loras" and value is not None:
            value = lora_names(value)
        elif text:
            value = from_text(fields[name], value)
        kwargs[name] = value
    request = GenerateRequest.make(**kwargs)
    if request.num_images > max_images:
        raise InputError(f"num_images: at most {max_images} per request (sdrt serve --max-images)")
    return request


def lora_names(value) -> list[tuple]:
    """`loras` from a client: [[NAME, WEIGHT], ...] or [{"name": NAME, "weight": WEIGHT}, ...], each NAME a
    file of the server's --lora-dir (a client names no path on the server)."""
    if not isinstance(value, list):
        raise InputError("loras: expected a list of [name, weight] pairs")
    out = []
    for item in value:
        if isinstance(item, dict):
            item = [item.get("name"), item.get("weight", 1.0)]
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            raise InputError(f"loras: expected [name, weight] pairs, got {item!r:.60}")
        if not item[0] or "/" in item[0] or "\\" in item[0] or item[0].startswith("."):
            raise InputError(f"loras: {item[0]!r}: a LoRA name from the server's --lora-dir, not a path")
        out.append(tuple(item))
    return out


def parse_request(body: bytes, max_images: int):
    """A GenerateRequest from a POST /generate body."""
    values = parse_json(body)
    if "prompt" not in values:
        raise InputError("prompt is required")
    return make_request(values, max_images)


def request_schema() -> dict:
    """POST /generate's JSON schema for the OpenAPI docs, from the same declaration as the CLI's flags."""
    from pydantic import Field, create_model

    types = {"text": str, "int": int, "number": float, "image": str, "loras": list}
    model_fields = {}
    for name, f in request_fields().items():
        m = f.metadata
        kind = types.get(m["kind"], str)
        limits = {"max_length": m["hi"]} if m["kind"] == "text" else {"ge": m["lo"], "le": m["hi"]}
        if m["choices"]:
            limits["examples"] = list(m["choices"])
        help = m["help"] + (" (base64 of a PNG or JPEG file)" if m["kind"] == "image" else "")
        default = ... if name == "prompt" else f.default
        model_fields[name] = (kind | None if m["optional"] else kind,
                              Field(default, description=help, **{k: v for k, v in limits.items() if v is not None}))
    return create_model("GenerateRequest", **model_fields).model_json_schema()
