"""The one model adapter: a discrete-time eps / v / sample UNet with classifier-free guidance,
seen by the samplers as `denoise(x, sigma) -> x0` (k-diffusion `external.py`, sigma_data = 1)."""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Denoiser:
    """cond / uncond: (N, 77, D) text embeddings; uncond None means no guidance (one UNet pass)."""

    def __init__(self, unet, schedule, prediction_type: str, cond: np.ndarray,
                 uncond: np.ndarray | None, guidance_scale: float):
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.unet = unet  # callable(sample, timestep, encoder_hidden_states) -> model output
        self.prediction_type = prediction_type
        self.guided = uncond is not None
        # [uncond; cond] in one batch, as diffusers orders it
        self.context = np.concatenate([uncond, cond]) if self.guided else cond
        self.guidance_scale = guidance_scale
        # the UNet timestep of every level the schedule names; other levels (midpoint samplers) by
        # interpolation in log sigma, as diffusers' _sigma_to_t
        self._t = {float(s): float(t) for s, t in zip(schedule.sigmas, schedule.timesteps)}
        self._table = schedule.table

    def timestep(self, sigma: float) -> float:
        t = self._t.get(float(sigma))
        return t if t is not None else float(self._table.sigma_to_t(np.array(sigma)))

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        c_in = 1.0 / np.sqrt(sigma**2 + 1)
        model_in = (x * c_in).astype(np.float32)  # (N, C, h, w)
        if self.guided:
            model_in = np.concatenate([model_in, model_in])
        t = np.full(len(model_in), self.timestep(sigma), dtype=np.float32)
        out = self.unet(model_in, t, self.context).astype(np.float64)
        if self.guided:
            uncond, cond = np.split(out, 2)
            out = uncond + self.guidance_scale * (cond - uncond)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":  # x0 = c_skip * x + c_out * v
            return x / (sigma**2 + 1) - out * sigma / np.sqrt(sigma**2 + 1)
        return out
