"""The one model adapter: a discrete-time eps / v / sample UNet with classifier-free guidance,
seen by the samplers as `denoise(x, sigma) -> x0` (k-diffusion `external.py`, sigma_data = 1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sdrt.errors import InputError


@dataclass(frozen=True)
class Prediction:
    """What a UNet parameterization means, in the sampler state x = x_t / sqrt(alpha_bar) at sigma.
    to_x0(x, out, sigma): the data estimate; from_x0(x, x0, sigma): the output that gives x0;
    to_eps(x, out, sigma): the output read as eps (diffusers' PNDM converts v this way)."""

    to_x0: Callable
    from_x0: Callable
    to_eps: Callable


def _c(sigma):
    return np.sqrt(sigma**2 + 1)


PREDICTIONS = {
    "epsilon": Prediction(to_x0=lambda x, out, s: x - s * out,
                          from_x0=lambda x, x0, s: (x - x0) / s,
                          to_eps=lambda x, out, s: out),
    # x0 = c_skip * x + c_out * v with c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
    "v_prediction": Prediction(to_x0=lambda x, out, s: x / (s**2 + 1) - out * s / _c(s),
                               from_x0=lambda x, x0, s: (x / (s**2 + 1) - x0) * _c(s) / s,
                               to_eps=lambda x, out, s: (out + s * x / _c(s)) / _c(s)),
    "sample": Prediction(to_x0=lambda x, out, s: out,
                         from_x0=lambda x, x0, s: x0,
                         to_eps=lambda x, out, s: (x - out) / s),
}
PREDICTION_TYPES = tuple(PREDICTIONS)


class Denoiser:
    """cond / uncond: (N, 77, D) text embeddings; uncond None means no guidance (one UNet pass).
    extra: (N, C, h, w) channels appended to every UNet input after the latents' scaling (an
    inpainting UNet's mask and masked-image latents, as diffusers concatenates them).
    last_x0 is the latest data estimate (a step's denoised preview)."""

    def __init__(self, unet, schedule, prediction_type: str, cond: np.ndarray,
                 uncond: np.ndarray | None, guidance_scale: float, extra: np.ndarray | None = None):
        if prediction_type not in PREDICTIONS:
            raise InputError(f"prediction type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.unet = unet  # callable(sample, timestep, encoder_hidden_states) -> model output
        self.prediction = PREDICTIONS[prediction_type]
        self.guided = uncond is not None
        # [uncond; cond] in one batch, as diffusers orders it
        self.context = np.concatenate([uncond, cond]) if self.guided else cond.copy()
        # read-only: the same array every step, so a GPU backend keeps it on the device
        # (sdrt.runtime.backends.binding)
        self.context.setflags(write=False)
        self.guidance_scale = guidance_scale
        self.extra = None if extra is None else extra.astype(np.float32)
        # the UNet timestep of every level the schedule names; other levels (midpoint samplers) by
        # interpolation in log sigma, as diffusers' _sigma_to_t
        self._t = {float(s): float(t) for s, t in zip(schedule.sigmas, schedule.timesteps)}
        self._table = schedule.table
        self.last_x0 = None

    def timestep(self, sigma: float, interpolate: bool = False) -> float:
        t = None if interpolate else self._t.get(float(sigma))
        return t if t is not None else float(self._table.sigma_to_t(np.array(sigma)))

    def raw_output(self, x: np.ndarray, x0: np.ndarray, sigma: float) -> np.ndarray:
        """The model output (in its own parameterization) that gives x0 at (x, sigma)."""
        return self.prediction.from_x0(x, x0, sigma)

    def eps_from_raw(self, x: np.ndarray, out: np.ndarray, sigma: float) -> np.ndarray:
        """A model output read as eps at (x, sigma)."""
        return self.prediction.to_eps(x, out, sigma)

    def __call__(self, x: np.ndarray, sigma: float, *, midpoint: bool = False) -> np.ndarray:
        """midpoint: a level between two steps (DPM2, DPM++ SDE); its timestep is interpolated even
        where it equals a schedule level (DPM2 a's midpoint is exactly the next one), as diffusers does."""
        model_in = (x * (1.0 / _c(sigma))).astype(np.float32)  # c_in; (N, C, h, w)
        if self.extra is not None:
            model_in = np.concatenate([model_in, self.extra], axis=1)
        if self.guided:
            model_in = np.concatenate([model_in, model_in])
        t = np.full(len(model_in), self.timestep(sigma, interpolate=midpoint), dtype=np.float32)
        out = self.unet(model_in, t, self.context).astype(np.float64)
        if self.guided:
            uncond, cond = np.split(out, 2)
            out = uncond + self.guidance_scale * (cond - uncond)
        self.last_x0 = self.prediction.to_x0(x, out, sigma)
        return self.last_x0
