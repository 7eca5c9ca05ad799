"""AUTOMATIC1111's web UI API (`/sdapi/v1/...`) over an engine dir: what `webuiapi` and A1111's other
clients send. A1111's field names map to sdrt's request (sdrt.runtime.request):

    prompt, negative_prompt, steps, seed (-1: random), width, height -> the same
    cfg_scale -> guidance_scale; sampler_name (or sampler_index) -> sampler, A1111's names;
    scheduler -> schedule_type ("automatic": the sampler's own); batch_size x n_iter -> num_images;
    eta -> DDIM's eta; override_settings.CLIP_stop_at_last_layers -> clip_skip, .emphasis -> emphasis
    prompts in A1111's syntax (weights, BREAK, any length; sdrt.runtime.prompts)
    noise: A1111's own (`a1111-gpu`, its default GPU source, reproduced on any device), or
    override_settings.randn_source (GPU, NV -> a1111-gpu; CPU -> a1111-cpu), so a seed gives A1111's image
    img2img: init_images[0] -> image, denoising_strength -> strength, mask (blurred by mask_blur px,
    inverted by inpainting_mask_invert, as A1111 does)

Fields for features sdrt lacks (hires fix, face restoration, tiling, variation seeds, styles, scripts)
are refused when they ask for the feature, and accepted at their off values, so clients that send
every field work. Answers carry `images`, `parameters` (the request, as A1111 echoes it) and `info`
(a JSON string, as A1111's).
"""

from __future__ import annotations

import base64
import json
import time

from fastapi import APIRouter, Request

from sdrt.errors import InputError
from sdrt.serve.inputs import MAX_INPUT_PIXELS, make_request, open_image, parse_json
from sdrt.serve.responses import png_b64

router = APIRouter(prefix="/sdapi/v1", tags=["A1111 web UI API"])

# A1111 fields sdrt can't honour, with the values that mean "off" (accepted)
OFF = {"enable_hr": (False, None), "restore_faces": (False, None), "tiling": (False, None),
       "subseed_strength": (0, None), "styles": ([], None), "script_name": (None, ""), "script_args": ([], None),
       "alwayson_scripts": ({}, None), "initial_noise_multiplier": (1, None), "s_churn": (0, None),
       "s_tmin": (0, None), "s_tmax": (0, None, float("inf")), "s_noise": (1, None), "refiner_checkpoint": (None, ""),
       "hr_checkpoint_name": (None, ""), "firstpass_image": (None, "")}
# A1111 fields with no effect here: they only matter with a feature that is off, or to A1111's UI and disk
NO_EFFECT = {"hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_sampler_name",
             "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules", "firstphase_width",
             "firstphase_height", "subseed", "seed_resize_from_h", "seed_resize_from_w", "do_not_save_samples",
             "do_not_save_grid", "override_settings_restore_afterwards", "save_images", "sampler_index",
             "resize_mode", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "include_init_images",
             "image_cfg_scale", "refiner_switch_at", "disable_extra_networks", "comments", "force_task_id",
             "infotext", "mask_round", "latent_mask", "send_images", "denoising_strength", "init_images", "mask",
             "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_mask_invert"}
DIRECT = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "seed": "seed",
          "width": "width", "height": "height", "cfg_scale": "guidance_scale"}
OVERRIDES = {"CLIP_stop_at_last_layers": "clip_skip", "randn_source": "noise", "emphasis": "emphasis"}
OVERRIDES_NO_EFFECT = {"sd_model_checkpoint", "sd_vae", "samples_format", "eta_ddim", "eta_ancestral"}


def _values(body: dict) -> dict:
    """sdrt request values from an A1111 txt2img / img2img body."""
    unknown = sorted(set(body) - set(OFF) - NO_EFFECT - set(DIRECT) - {
        "sampler_name", "scheduler", "batch_size", "n_iter", "eta", "override_settings"})
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)} (sdrt's A1111 API takes A1111's txt2img and "
                         "img2img fields)")
    for name, off in OFF.items():
        if name in body and body[name] not in off:
            raise InputError(f"{name}: {str(body[name])[:40]!r} asks for an A1111 feature sdrt does not have; "
                             f"leave it out or send {off[0]!r}")
    values = {DIRECT[k]: v for k, v in body.items() if k in DIRECT}
    values["sampler"] = body.get("sampler_name") or body.get("sampler_index") or "Euler"  # A1111's default
    values["schedule_type"] = _scheduler(body.get("scheduler"))
    values["num_images"] = _count(body, "batch_size") * _count(body, "n_iter")
    values["noise"] = "a1111-gpu"
    values.update(_overrides(body.get("override_settings") or {}))
    eta = _eta(values["sampler"], body.get("eta"))
    if eta is not None:
        values["eta"] = eta
    return values


def _count(body: dict, name: str) -> int:
    value = body.get(name, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}: expected an integer >= 1, got {str(value)[:40]!r}")
    return value


def _scheduler(value) -> str | None:
    from sdrt.runtime.samplers import SCHEDULE_TYPES

    if value is None or str(value).lower() in ("automatic", ""):
        return None
    key = str(value).lower().replace(" ", "_")
    if key not in SCHEDULE_TYPES:
        raise InputError(f"scheduler: {str(value)[:40]!r} is not one sdrt has; choose Automatic, "
                         + ", ".join(SCHEDULE_TYPES))
    return key


def _overrides(settings) -> dict:
    if not isinstance(settings, dict):
        raise InputError("override_settings: expected an object")
    unknown = sorted(set(settings) - set(OVERRIDES) - OVERRIDES_NO_EFFECT)
    if unknown:
        raise InputError(f"override_settings: sdrt does not have {', '.join(unknown)} (it takes "
                         f"{', '.join([*OVERRIDES, *sorted(OVERRIDES_NO_EFFECT)])})")
    out = {OVERRIDES[k]: v for k, v in settings.items() if k in OVERRIDES}
    if "noise" in out:
        from sdrt.runtime.noise import source_from_rng_field

        try:
            out["noise"] = source_from_rng_field(str(out["noise"]))
        except ValueError:
            got = str(out["noise"])[:40]
            raise InputError(f"override_settings.randn_source: {got!r} is not GPU, CPU or NV") from None
    return out


def _eta(sampler: str, eta):
    """A1111 passes eta to DDIM and to the ancestral samplers; sdrt's ancestral samplers run at 1."""
    from sdrt.runtime.samplers import get_sampler

    smp = get_sampler(sampler)
    if smp.name == "ddim":
        return eta
    if eta not in (None, 1, 1.0) and not smp.deterministic:
        raise InputError(f"eta: sdrt's {smp.display} runs at eta 1, got {str(eta)[:20]}")
    return None


def _img2img_images(body: dict) -> dict:
    """image, mask and strength from A1111's img2img fields."""
    from PIL import ImageFilter, ImageOps

    init = body.get("init_images")
    if not isinstance(init, list) or not init or not isinstance(init[0], str):
        raise InputError("init_images: expected a list with one base64 image")
    if len(init) > 1:
        raise InputError(f"init_images: sdrt takes one init image, got {len(init)}")
    out = {"image": open_image("init_images[0]", init[0]).convert("RGB")}
    if "denoising_strength" in body:
        out["strength"] = body["denoising_strength"]
    if body.get("mask"):
        mask = open_image("mask", body["mask"]).convert("L")
        if body.get("inpainting_mask_invert"):
            mask = ImageOps.invert(mask)
        blur = body.get("mask_blur", 0) or 0
        if not isinstance(blur, (int, float)) or isinstance(blur, bool) or not 0 <= blur <= 64:
            raise InputError(f"mask_blur: expected pixels from 0 to 64, got {str(blur)[:20]!r}")
        if blur:
            mask = mask.filter(ImageFilter.GaussianBlur(blur))
        out["mask"] = mask
    return out


async def _run(request: Request, img2img: bool) -> dict:
    s = request.app.state.service
    body = parse_json(await request.body())
    values = _values(body)
    req = make_request(values, s.config.max_images)
    if img2img:
        req = req.replace(**_img2img_images(body))
    result, _ = await s.generate(req, request, "/sdapi/v1/img2img" if img2img else "/sdapi/v1/txt2img")
    echo = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    images = await png_b64(result) if body.get("send_images", True) else []
    return {"images": images, "parameters": echo, "info": json.dumps(_info(s, req, result))}


def _info(s, req, result) -> dict:
    from sdrt.runtime.samplers import get_sampler

    source = s.pipe.manifest.source
    negative = req.negative_prompt or ""
    n = len(result.seeds)
    return {"prompt": req.prompt, "all_prompts": [req.prompt] * n, "negative_prompt": negative,
            "all_negative_prompts": [negative] * n, "seed": result.seeds[0], "all_seeds": result.seeds,
            "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
            "width": result.images[0].width, "height": result.images[0].height,
            "sampler_name": get_sampler(req.sampler).display, "cfg_scale": req.guidance_scale, "steps": req.steps,
            "batch_size": n, "restore_faces": False, "face_restoration_model": None, "sd_model_name": s.model_name,
            "sd_model_hash": source.get("sha256", "")[:10] or None, "seed_resize_from_w": -1,
            "seed_resize_from_h": -1, "denoising_strength": req.strength if req.image is not None else None,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": result.parameters, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": req.clip_skip,
            "is_using_inpainting_conditioning": s.pipe.manifest.dims.unet_in_channels == 9, "version": "sdrt"}


@router.post("/txt2img")
async def txt2img(request: Request):
    return await _run(request, img2img=False)


@router.post("/img2img")
async def img2img(request: Request):
    return await _run(request, img2img=True)


@router.get("/samplers")
def samplers_list():
    from sdrt.runtime.samplers import SAMPLERS

    return [{"name": smp.display, "aliases": [smp.name], "options": {}} for smp in SAMPLERS.values()]


@router.get("/schedulers")
def schedulers_list():
    from sdrt.runtime.samplers import SCHEDULE_TYPES

    names = ("automatic", *SCHEDULE_TYPES)
    return [{"name": n, "label": n.replace("_", " ").title(), "aliases": None, "default_rho": -1,
             "need_inner_model": False} for n in names]


@router.get("/sd-models")
def sd_models(request: Request):
    s = request.app.state.service
    digest = s.pipe.manifest.source.get("sha256", "")
    return [{"title": f"{s.model_name} [{digest[:10]}]" if digest else s.model_name, "model_name": s.model_name,
             "hash": digest[:10] or None, "sha256": digest or None, "filename": s.model_name, "config": None}]


@router.get("/loras")
def loras_list(request: Request):
    """The server's --lora-dir files, as A1111's Lora folder lists them (`<lora:NAME:W>` names them)."""
    from sdrt.runtime.lora import SUFFIXES

    d = request.app.state.service.pipe.lora_dir
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in SUFFIXES) if d is not None else []
    return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]


@router.post("/refresh-loras")
def refresh_loras():
    """Nothing to refresh: the folder is read at each request."""
    return None


@router.get("/options")
def options(request: Request):
    s = request.app.state.service
    return {"sd_model_checkpoint": s.model_name, "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0,
            "randn_source": "GPU", "emphasis": "Original",
            "eta_ancestral": 1.0, "samples_format": "png", "live_previews_enable": True,
            "show_progress_type": "Approx cheap"}


@router.get("/scripts")
def scripts():
    """No A1111 scripts or extensions (clients such as webuiapi ask at start)."""
    return {"txt2img": [], "img2img": []}


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False):
    """The running batch: progress 0..1, an ETA, A1111's state, and a cheap latent->RGB preview."""
    from sdrt.runtime.preview import cheap_png

    sched = request.app.state.service.scheduler
    p = sched.progress
    fraction = p.step / p.total if p.total else 0.0
    elapsed = time.monotonic() - p.started if p.jobs else 0.0
    eta = elapsed / fraction - elapsed if fraction else 0.0
    image = None
    if not skip_current_image and p.denoised is not None:
        png = cheap_png(p.denoised)
        image = base64.b64encode(png).decode() if png else None
    state = {"skipped": False, "interrupted": any(j.cancelled == "interrupt" for j in p.jobs), "stopping_generation":
             False, "job": "generate" if p.jobs else "", "job_count": len(p.jobs) + sched.depth(),
             "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": 0, "sampling_step": p.step,
             "sampling_steps": p.total}
    return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "state": state, "current_image": image,
            "textinfo": None, "current_task": None}


@router.post("/interrupt")
def interrupt(request: Request):
    """Stop the running generation at its next step (A1111's Interrupt); its clients get 409."""
    request.app.state.service.scheduler.interrupt()
    return {}


@router.post("/png-info")
async def png_info(request: Request):
    """The `parameters` text of a PNG (A1111's infotext), parsed, and the PNG's other text chunks."""
    from sdrt.runtime.images import parse_a1111_parameters

    body = parse_json(await request.body())
    if not isinstance(body.get("image"), str) or not body["image"]:
        raise InputError(f"image: expected base64 of a PNG file (at most {MAX_INPUT_PIXELS:,} pixels)")
    im = open_image("image", body["image"])
    items = {k: v for k, v in im.info.items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": parse_a1111_parameters(text) if text else {}}
