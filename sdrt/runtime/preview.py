"""Cheap step previews: latents -> RGB by one 4x3 linear map per model family, no VAE (A1111's
"Approx cheap" preview; the coefficients are the published fit for SD 1.x / 2.x latents)."""

from __future__ import annotations

import numpy as np

from sdrt.runtime.images import from_model_output

# rows: latent channels 0-3; columns: R, G, B (SD 1.x and 2.x share the VAE's latent space)
SD_LATENT_RGB = np.array([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


def cheap_rgb(latents: np.ndarray) -> np.ndarray | None:
    """(N, 4, h, w) latents (the UNet's space) -> (N, h, w, 3) uint8 at latent resolution; None for
    latents of another family (channel count), which have no fitted map here."""
    if latents.ndim != 4 or latents.shape[1] != SD_LATENT_RGB.shape[0]:
        return None
    rgb = np.einsum("nchw,cr->nhwr", latents, SD_LATENT_RGB)
    return (from_model_output(rgb) * 255).round().astype(np.uint8)


def cheap_png(latents: np.ndarray, index: int = 0) -> bytes | None:
    """Image INDEX of a batch as PNG bytes (a server's progress endpoint), or None."""
    import io

    from PIL import Image

    rgb = cheap_rgb(latents[index : index + 1])
    if rgb is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(rgb[0]).save(buf, format="PNG")
    return buf.getvalue()


PREVIEW_MODES = ("cheap", "vae")


def preview_images(pipe, denoised: np.ndarray, mode: str = "cheap") -> list:
    """A step's denoised estimate (N, 4, h, w) as PIL images at the output size: `cheap`, the linear
    map above (nearest-upscaled from latent resolution), or `vae`, a full decode."""
    from PIL import Image

    if mode == "vae":
        from sdrt.runtime.images import to_pil

        return to_pil(pipe.decode(denoised))
    rgb = cheap_rgb(denoised)
    if rgb is None:
        return []
    f = pipe.scale_factor
    return [Image.fromarray(x).resize((x.shape[1] * f, x.shape[0] * f), Image.NEAREST) for x in rgb]
