"""The OpenAI Images API over an engine dir: what the official `openai` client sends to `base_url`.

    POST /v1/images/generations  JSON: prompt, n, size "WxH" or "auto", response_format b64_json, model, user;
                                 sdrt's own fields (steps, seed, sampler, negative_prompt, ...) as extras
    POST /v1/images/edits        multipart: image, optional mask, prompt, ... (img2img; inpainting with a mask)
    GET  /v1/models              the one model this server holds

Masks follow OpenAI: where the mask (or, without one, the image itself) is fully transparent is repainted.
A mask without an alpha channel is read as sdrt's masks are (white: repaint). Images come back inline
(`b64_json`); `url` is refused, since sdrt stores nothing. `quality`, `style`, `moderation` and `user` are
accepted and have no effect on a Stable Diffusion model.
"""

from __future__ import annotations

import re
import time

from fastapi import APIRouter, Request

from sdrt.errors import InputError
from sdrt.serve.inputs import make_request, open_image, parse_json
from sdrt.serve.responses import png_b64

router = APIRouter(prefix="/v1", tags=["OpenAI Images API"])

IGNORED = ("user", "safety_identifier", "quality", "style", "moderation", "input_fidelity")
# OpenAI fields with the values sdrt can honour (None: not sent)
LIMITED = {"response_format": (None, "b64_json"), "output_format": (None, "png"), "stream": (None, False, "false"),
           "background": (None, "auto", "opaque"), "partial_images": (None, 0, "0"), "output_compression": (None,)}


def _values(fields: dict, service) -> dict:
    """GenerateRequest values from OpenAI's fields (and sdrt's own, passed through)."""
    fields = dict(fields)
    model = fields.pop("model", None)
    if model not in (None, "", service.model_name):
        raise InputError(f"model: {model!r} is not served here; GET /v1/models lists {service.model_name!r}")
    for name, allowed in LIMITED.items():
        value = fields.pop(name, None)
        if value not in allowed:
            raise InputError(f"{name}: {value!r} is not supported by sdrt (accepted: "
                             f"{', '.join(repr(a) for a in allowed if a is not None) or 'leave it out'})")
    for name in IGNORED:
        fields.pop(name, None)
    if not isinstance(fields.get("prompt"), str):
        raise InputError("prompt is required (a string)")
    n = fields.pop("n", None)
    if n is not None:
        fields["num_images"] = n
    fields.update(_size(fields.pop("size", None)))
    return fields


def _size(size) -> dict:
    if size in (None, "auto"):
        return {}
    found = re.fullmatch(r"(\d{1,5})x(\d{1,5})", str(size))
    if not found:
        raise InputError(f"size: expected 'WIDTHxHEIGHT' such as '512x512', or 'auto'; got {str(size)[:40]!r}")
    return {"width": int(found[1]), "height": int(found[2])}


async def _answer(result, prompt: str) -> dict:
    images = await png_b64(result)
    return {"created": int(time.time()), "data": [{"b64_json": b, "revised_prompt": prompt} for b in images],
            "sdrt": {"seeds": result.seeds, "parameters": result.parameters}}


@router.post("/images/generations")
async def generations(request: Request):
    """Text to image."""
    s = request.app.state.service
    values = _values(parse_json(await request.body()), s)
    req = make_request(values, s.config.max_images)
    result, _ = await s.generate(req, request, "/v1/images/generations")
    return await _answer(result, req.prompt)


@router.post("/images/edits")
async def edits(request: Request):
    """Image to image, or inpainting with a mask (multipart form, as the openai client sends it)."""
    s = request.app.state.service
    form = await request.form(max_files=4, max_fields=64)
    images = form.getlist("image") + form.getlist("image[]")
    if len(images) != 1 or isinstance(images[0], str):
        raise InputError(f"image: exactly one image file is needed, got {len(images)}")
    image = open_image("image", await images[0].read())
    fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]", "mask")}
    mask = form.get("mask")
    if mask is not None and isinstance(mask, str):
        raise InputError("mask: expected an image file")
    mask = open_image("mask", await mask.read()) if mask is not None else None
    values = _values(fields, s)
    req = make_request(values, s.config.max_images, text=True)
    repaint = _repaint_mask(mask, True) if mask is not None else _repaint_mask(image, False)
    req = req.replace(image=image.convert("RGB"), mask=repaint)
    result, _ = await s.generate(req, request, "/v1/images/edits")
    return await _answer(result, req.prompt)


def _repaint_mask(im, is_mask: bool):
    """sdrt's mask (white: repaint) from OpenAI's: the fully transparent pixels of the mask, or of the
    image when no mask is sent (an image with none is img2img: None). A mask without alpha is sdrt's own."""
    if "A" not in im.getbands() and "transparency" not in im.info:
        return im.convert("L") if is_mask else None
    alpha = im.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] > 0:
        if is_mask:
            raise InputError("mask: no fully transparent pixel, so nothing to repaint")
        return None
    return alpha.point(lambda a: 255 if a == 0 else 0)


@router.get("/models")
def models(request: Request):
    s = request.app.state.service
    return {"object": "list", "data": [_model(s)]}


@router.get("/models/{model_id}")
def model(model_id: str, request: Request):
    s = request.app.state.service
    if model_id != s.model_name:
        raise InputError(f"model: {model_id!r} is not served here; this server holds {s.model_name!r}")
    return _model(s)


def _model(s) -> dict:
    created = int((s.config.engines / "manifest.json").stat().st_mtime)
    return {"id": s.model_name, "object": "model", "created": created, "owned_by": "sdrt"}
