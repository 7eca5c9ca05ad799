"""`GenerateRequest`: every generation argument, declared once (name, type, default, limits, help).

The Python API (`Pipeline.__call__` keywords), the CLI (`sdrt generate` flags) and the server's JSON
fields are all derived from this declaration, and `validate` is the one place the limits are checked,
against the engine dir where they depend on it (image size from the UNet's declared dims, clip skip
from the text encoder's layers). Adding an argument means adding one field here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sdrt.errors import InputError
from sdrt.runtime import noise as noise_sources
from sdrt.runtime import prompts, samplers

MAX_STEPS = 500  # A1111's UI stops at 150; a 500-step run is already minutes of UNet calls
MAX_IMAGES = 8  # images per call; the UNet runs them in one batch (twice that with guidance)
MAX_GUIDANCE = 100.0
MAX_PROMPT_CHARS = 20_000  # CLIP reads 75 tokens a chunk; this only bounds what a client can send
MAX_SEED = 2**64 - 1  # torch's generators take 64-bit seeds; -1 means a random one, as in A1111

# what a value may be, per kind: the JSON types the server accepts and the CLI's converter
KINDS = {"text": (str,), "int": (int,), "number": (int, float), "choice": (str,), "image": (str,),
         "array": (), "loras": (list, tuple)}


def arg(default: Any = None, *, kind: str, help: str, lo: float | None = None, hi: float | None = None,
        choices: tuple = (), cli: str | None = None, optional: bool = False, python_only: bool = False):
    """A request field. kind: see KINDS ("image": a path or PIL image or array in Python, a path on the
    CLI, base64 on the server; "array": Python only; "loras": (file or name, weight) pairs, read by
    sdrt.runtime.lora.uses_from). lo / hi: inclusive limits. optional: None is a
    value (meaning "the default the engine dir or sampler implies"). cli: the flag, if not --NAME."""
    meta = {"kind": kind, "help": help, "lo": lo, "hi": hi, "choices": choices, "cli": cli,
            "optional": optional or default is None, "python_only": python_only}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str = arg("", kind="text", hi=MAX_PROMPT_CHARS, help="what to draw")
    negative_prompt: str | None = arg(None, kind="text", hi=MAX_PROMPT_CHARS, help="what to steer away from")
    steps: int = arg(20, kind="int", lo=1, hi=MAX_STEPS, help="sampling steps")
    sampler: str = arg(samplers.DEFAULT_SAMPLER, kind="choice", choices=tuple(samplers.SAMPLERS),
                       help="see `sdrt samplers`; A1111 names work too")
    schedule_type: str | None = arg(None, kind="choice", choices=samplers.SCHEDULE_TYPES,
                                    help="A1111 schedule type for the samplers that take one")
    eta: float | None = arg(None, kind="number", lo=0, hi=1, help="ddim only: noise amount (default 0)")
    guidance_scale: float = arg(7.5, kind="number", lo=0, hi=MAX_GUIDANCE,
                                help="classifier-free guidance; <= 1 runs the prompt alone")
    seed: int | None = arg(None, kind="int", lo=-1, hi=MAX_SEED,
                           help="image i uses seed + i; none or -1: a random seed")
    noise: str = arg(noise_sources.DEFAULT_SOURCE, kind="choice", choices=noise_sources.SOURCES,
                     help="where a seed's noise comes from: torch-cpu (diffusers' CPU generator), sdrt, "
                          "a1111-gpu (A1111's default), a1111-cpu")
    width: int | None = arg(None, kind="int", help="pixels, a multiple of the VAE scale factor (default: the "
                                                    "init image's, else the model's size)")
    height: int | None = arg(None, kind="int", help="pixels (as width)")
    num_images: int = arg(1, kind="int", lo=1, hi=MAX_IMAGES, cli="--batch", help="number of images")
    clip_skip: int = arg(1, kind="int", lo=1, help="1 = last CLIP layer, 2 = penultimate (A1111)")
    emphasis: str = arg(prompts.DEFAULT_EMPHASIS, kind="choice", choices=prompts.EMPHASIS,
                        help="A1111's prompt weights, (word:1.2): Original (rescaled to the mean), No norm, "
                             "Ignore (parsed, not applied), None (brackets are text)")
    image: Any = arg(None, kind="image", cli="--init-image", help="img2img / inpainting: start from this image")
    strength: float = arg(0.8, kind="number", lo=0, hi=1, help="img2img: how much to change the image")
    mask: Any = arg(None, kind="image", help="inpainting mask (white: repaint, black: keep); needs an init image")
    depth_map: Any = arg(None, kind="image", help="depth2img models: a depth map (grayscale, 8 or 16 bit, white = "
                                                  "near) instead of the estimator's from the init image")
    source_prompt: str | None = arg(None, kind="text", hi=MAX_PROMPT_CHARS,
                                    help="CycleDiffusion: what the init image shows (with --init-image, "
                                         "--sampler ddim and --eta, default 0.1); the prompt says what to make of it")
    source_guidance_scale: float = arg(1.0, kind="number", lo=0, hi=MAX_GUIDANCE,
                                       help="CycleDiffusion: guidance of the source prompt")
    loras: Any = arg(None, kind="loras", cli="--lora",
                     help="LoRAs for this request only, no re-export: FILE[:WEIGHT] (a name: from --lora-dir); "
                          "<lora:NAME:WEIGHT> in the prompt does the same")
    cache_interval: int = arg(1, kind="int", lo=1, hi=MAX_STEPS,
                              help="feature caching (DeepCache): the full UNet every N steps, its shallow "
                                   "layers on the cached deep feature between; 1 = off")
    latents: Any = arg(None, kind="array", python_only=True,
                       help="initial noise (N, C, H/f, W/f), as diffusers' `latents`")

    @classmethod
    def fields(cls, python_only: bool = True) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if python_only or not f.metadata["python_only"]]

    @classmethod
    def make(cls, **kwargs) -> GenerateRequest:
        """From keyword arguments; unknown names are an InputError listing the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InputError(f"unknown argument(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))}")
        req = cls(**kwargs)
        req.check()
        return req

    def check(self) -> None:
        """The limits that do not depend on the engine dir: types, ranges, choices."""
        for f in dataclasses.fields(self):
            check_value(f, getattr(self, f.name))
        if self.noise not in noise_sources.SOURCES:
            raise InputError(f"noise {self.noise!r}: unknown source; choose one of: {', '.join(noise_sources.SOURCES)}")

    def validate(self, manifest) -> None:
        """The limits that depend on the engine dir (sdrt.manifest.Manifest)."""
        self.check()
        f = manifest.dims.vae_scale_factor
        lo, hi = manifest.image_px
        for name in ("width", "height"):
            px = getattr(self, name)
            if px is not None and (px % f or not lo <= px <= hi):
                raise InputError(f"{name} {px}: must be a multiple of {f} (the VAE scale factor) from {lo} to {hi} "
                                 "(the engines' declared sizes)")
        layers = manifest.dims.text_layers
        if self.clip_skip > layers:
            raise InputError(f"clip_skip {self.clip_skip}: this text encoder has {layers} layers (1..{layers})")

    def replace(self, **changes) -> GenerateRequest:
        """A copy with CHANGES, checked as `make` checks keywords."""
        return GenerateRequest.make(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | changes)


def check_value(f: dataclasses.Field, value) -> None:
    """InputError naming field F when VALUE is not of its kind or outside its limits."""
    m = f.metadata
    if value is None:
        if not m["optional"]:
            raise InputError(f"{f.name}: a value is required")
        return
    kind = m["kind"]
    if kind in ("image", "array", "loras"):
        return  # read and checked where it is used (sdrt.runtime.images, sdrt.runtime.lora)
    if isinstance(value, bool) or not isinstance(value, KINDS[kind]) and not _numpy_number(value, kind):
        raise InputError(f"{f.name}: expected {_kind_words(kind)}, got {_short(value)}")
    if kind == "number" and not math.isfinite(value):
        raise InputError(f"{f.name}: expected a finite number, got {value}")
    if kind == "choice":
        return  # names are resolved (with A1111's spellings) by their owners, e.g. get_sampler
    if kind == "text" and not _encodable(value):
        raise InputError(f"{f.name}: not valid Unicode (a lone surrogate such as \\ud800)")
    size = len(value) if kind == "text" else value
    if m["lo"] is not None and size < m["lo"] or m["hi"] is not None and size > m["hi"]:
        got = f"{size} characters" if kind == "text" else _short(value)
        raise InputError(f"{f.name}: {got} is out of range ({_range(m['lo'], m['hi'])})")


def from_text(f: dataclasses.Field, text: str):
    """A field's value from text (an HTML form field, as the OpenAI client's image edits send them):
    numbers parsed, the rest as is."""
    kind = f.metadata["kind"]
    if kind not in ("int", "number") or not isinstance(text, str):
        return text
    try:
        return int(text) if kind == "int" else float(text)
    except ValueError:
        raise InputError(f"{f.name}: expected {_kind_words(kind)}, got {_short(text)}") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _range(lo, hi) -> str:
    lo, hi = (f"{x:g}" if isinstance(x, float) else str(x) for x in (lo, hi))
    if lo == "None":
        return f"at most {hi}"
    return f"at least {lo}" if hi == "None" else f"{lo} to {hi}"


def _numpy_number(value, kind: str) -> bool:
    import numbers

    if kind == "int":
        return isinstance(value, numbers.Integral)
    return kind == "number" and isinstance(value, numbers.Real)


def _kind_words(kind: str) -> str:
    return {"text": "a string", "int": "an integer", "number": "a number", "choice": "a name"}[kind]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# A1111 `parameters` keys -> request fields and how each value is read (from_parameters)
_A1111_KEYS = {"Prompt": ("prompt", str), "Negative prompt": ("negative_prompt", str), "Steps": ("steps", int),
               "Sampler": ("sampler", str), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
               "Size-1": ("width", int), "Size-2": ("height", int), "Clip skip": ("clip_skip", int),
               "Eta": ("eta", float), "Denoising strength": ("strength", float), "Emphasis": ("emphasis", str),
               "Cache interval": ("cache_interval", int)}


def from_parameters(text: str) -> dict:
    """The request fields an A1111 `parameters` text states (sdrt's PNGs and A1111's): prompt, negative
    prompt, steps, sampler, schedule type, CFG scale, seed, size, clip skip, eta, denoising strength,
    emphasis, cache interval, and the noise source from its RNG field (absent: A1111's GPU source)."""
    from sdrt.runtime.images import parse_a1111_parameters

    params = parse_a1111_parameters(text)
    if "Steps" not in params or "Seed" not in params:
        raise InputError("the PNG's parameters have no settings line (Steps, Seed, ...): not an A1111 / sdrt image")
    out = {}
    for key, (name, kind) in _A1111_KEYS.items():
        if params.get(key) not in (None, ""):
            try:
                out[name] = kind(params[key])
            except ValueError:
                raise InputError(f"the PNG's parameters: {key} {params[key]!r} is not {kind.__name__}") from None
    schedule = params.get("Schedule type", "")
    if schedule and schedule.lower() != "automatic":
        out["schedule_type"] = schedule.lower().replace(" ", "_")
    try:
        out["noise"] = noise_sources.source_from_rng_field(params.get("RNG"))
    except ValueError as e:
        raise InputError(f"the PNG's parameters: {e}") from None
    return out
