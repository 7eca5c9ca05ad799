"""The one model adapter: a discrete-time eps / v / sample UNet with classifier-free guidance,
seen by the samplers as `denoise(x, sigma) -> x0` (k-diffusion `external.py`, sigma_data = 1)."""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Denoiser:
    """cond / uncond: (N, 77, D) text embeddings; uncond None means no guidance (one UNet pass).
    extra: (N, C, h, w) channels appended to every UNet input after the latents' scaling (an
    inpainting UNet's mask and masked-image latents, as diffusers concatenates them)."""

    def __init__(self, unet, schedule, prediction_type: str, cond: np.ndarray,
                 uncond: np.ndarray | None, guidance_scale: float, extra: np.ndarray | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.unet = unet  # callable(sample, timestep, encoder_hidden_states) -> model output
        self.prediction_type = prediction_type
        self.guided = uncond is not None
        # [uncond; cond] in one batch, as diffusers orders it
        self.context = np.concatenate([uncond, cond]) if self.guided else cond
        self.guidance_scale = guidance_scale
        self.extra = None if extra is None else extra.astype(np.float32)
        # the UNet timestep of every level the schedule names; other levels (midpoint samplers) by
        # interpolation in log sigma, as diffusers' _sigma_to_t
        self._t = {float(s): float(t) for s, t in zip(schedule.sigmas, schedule.timesteps)}
        self._table = schedule.table

    def timestep(self, sigma: float, interpolate: bool = False) -> float:
        t = None if interpolate else self._t.get(float(sigma))
        return t if t is not None else float(self._table.sigma_to_t(np.array(sigma)))

    def raw_output(self, x: np.ndarray, x0: np.ndarray, sigma: float) -> np.ndarray:
        """The model output (in its own parameterization) that gives x0 at (x, sigma)."""
        if self.prediction_type == "epsilon":
            return (x - x0) / sigma
        if self.prediction_type == "v_prediction":
            return (x / (sigma**2 + 1) - x0) * np.sqrt(sigma**2 + 1) / sigma
        return x0

    def eps_from_raw(self, x: np.ndarray, out: np.ndarray, sigma: float) -> np.ndarray:
        """A model output read as eps at (x, sigma) (diffusers' PNDM converts v this way)."""
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "v_prediction":
            c = np.sqrt(sigma**2 + 1)
            return (out + sigma * x / c) / c
        return (x - out) / sigma

    def __call__(self, x: np.ndarray, sigma: float, *, midpoint: bool = False) -> np.ndarray:
        """midpoint: a level between two steps (DPM2, DPM++ SDE); its timestep is interpolated even
        where it equals a schedule level (DPM2 a's midpoint is exactly the next one), as diffusers does."""
        c_in = 1.0 / np.sqrt(sigma**2 + 1)
        model_in = (x * c_in).astype(np.float32)  # (N, C, h, w)
        if self.extra is not None:
            model_in = np.concatenate([model_in, self.extra], axis=1)
        if self.guided:
            model_in = np.concatenate([model_in, model_in])
        t = np.full(len(model_in), self.timestep(sigma, interpolate=midpoint), dtype=np.float32)
        out = self.unet(model_in, t, self.context).astype(np.float64)
        if self.guided:
            uncond, cond = np.split(out, 2)
            out = uncond + self.guidance_scale * (cond - uncond)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":  # x0 = c_skip * x + c_out * v
            return x / (sigma**2 + 1) - out * sigma / np.sqrt(sigma**2 + 1)
        return out
