"""Images in and out: init images to [-1, 1] arrays, pixels to PIL, A1111-style PNG metadata."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from sdrt.errors import InputError


def load_image(image):
    """A path is opened with Pillow; PIL images and arrays pass through. Unreadable files: InputError."""
    if isinstance(image, (str, Path)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"cannot read image {image}: {e}") from None
    return image


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or an (H, W, 3) / (1, H, W, 3) array."""
    if hasattr(image, "size") and not isinstance(image, np.ndarray):
        return image.size
    arr = np.asarray(image)
    return arr.shape[-2], arr.shape[-3]


def as_pil(image, what: str = "image"):
    """A PIL image as is; an (H, W[, C]) or (1, H, W, C) array in [0, 1] as an 8-bit one."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        arr = image[0] if image.ndim == 4 else image
        image = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    if not isinstance(image, Image.Image):
        raise InputError(f"{what} must be a path, PIL.Image or array, got {type(image).__name__}")
    return image


def _resized(image, mode: str, width: int, height: int, what: str) -> np.ndarray:
    """A PIL image, or an array in [0, 1], in PIL `mode` at (width, height) (Lanczos, as diffusers'
    image processors resize): float32 in [0, 1], (H, W) or (H, W, C)."""
    from PIL import Image

    image = as_pil(image, what).convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def from_model_output(x: np.ndarray) -> np.ndarray:
    """The VAE's [-1, 1] output (or an approximation of it) as [0, 1] values, clipped."""
    return np.clip(x / 2 + 0.5, 0, 1)


def to_model_input(image, width: int, height: int) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1]; resized with Lanczos when the size differs (diffusers)."""
    if isinstance(image, np.ndarray):
        arr = image[0] if image.ndim == 4 else image
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise InputError(f"init image array must be (H, W, 3) in [0, 1], got shape {image.shape}")
        if arr.shape[:2] == (height, width):
            return (arr.astype(np.float32) * 2 - 1).transpose(2, 0, 1)[None]
        image = arr
    arr = _resized(image, "RGB", width, height, "init image")
    return (arr * 2 - 1).transpose(2, 0, 1)[None]


def to_mask(mask, width: int, height: int) -> np.ndarray:
    """(1, 1, H, W) float32 of 0 / 1 (1: repaint), as diffusers' inpainting mask processor makes it:
    grayscale, resized with Lanczos when the size differs, then values >= 0.5 become 1, the rest 0.
    A path, a PIL image, or an (H, W) / (H, W, 1) array in [0, 1]."""
    mask = load_image(mask) if isinstance(mask, (str, Path)) else mask
    if isinstance(mask, np.ndarray):
        arr = mask[..., 0] if mask.ndim == 3 and mask.shape[-1] == 1 else mask
        if arr.ndim != 2:
            raise InputError(f"mask array must be (H, W) or (H, W, 1) in [0, 1], got shape {mask.shape}")
        if arr.shape == (height, width):
            return (arr >= 0.5).astype(np.float32)[None, None]
        mask = arr
    arr = _resized(mask, "L", width, height, "mask")
    return (arr >= 0.5).astype(np.float32)[None, None]


def to_pil(pixels: np.ndarray) -> list:
    """(N, H, W, 3) floats in [0, 1] -> PIL images (rounded as diffusers' numpy_to_pil)."""
    from PIL import Image

    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]


def a1111_parameters(prompt: str, negative: str, settings: dict) -> str:
    """The `parameters` text A1111 writes (and its readers parse): prompt, negatives, 'Key: value' list."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def _quote(text: str) -> str:
    """A settings value as A1111 writes it: JSON-quoted when it holds a comma, colon or newline."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


# one `Key: value` of the settings line; a value is a quoted JSON string or runs to the next comma
_SETTING = re.compile(r'\s*([\w ./+-]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> dict:
    """A1111's `parameters` text read back as its own reader does: Prompt, Negative prompt, and each
    setting of the last line ("Size: 512x768" also as Size-1 / Size-2)."""
    lines = text.strip().split("\n")
    settings = _SETTING.findall(lines[-1]) if lines else []
    if len(settings) >= 3:  # the last line is the settings line (A1111 asks for three at least)
        lines = lines[:-1]
    else:
        settings = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in settings:
        value = value.strip()
        if len(value) > 1 and value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:  # not JSON after all: keep the text as written
                pass
        out[key.strip()] = value
        size = re.fullmatch(r"(\d+)x(\d+)", value) if isinstance(value, str) else None
        if size:
            out[f"{key.strip()}-1"], out[f"{key.strip()}-2"] = size[1], size[2]
    return out


def png_bytes(image, parameters: str) -> bytes:
    """A PNG file's bytes with A1111's `parameters` text chunk (what its readers parse)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info, buf = PngInfo(), io.BytesIO()
    info.add_text("parameters", parameters)
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image, path: Path, parameters: str) -> None:
    Path(path).write_bytes(png_bytes(image, parameters))


def numbered_paths(path: Path, n: int) -> list[Path]:
    """PATH for one image; NAME-0.png, NAME-1.png ... for several."""
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]
