"""Samplers as plain functions over NumPy arrays (the k-diffusion style).

Contract: `sampler(denoise, x, schedule, *, noise, callback) -> x`, where `denoise(x, sigma) -> x0`,
x is the sampler state x_t / sqrt(alpha_bar_t) at level schedule.sigmas[0], `noise(shape)` draws
standard normal noise (the caller seeds it) and `callback(i, x)` runs after step i. Multistep
history lives in local variables. Each function matches the diffusers scheduler named in SAMPLERS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sdrt.errors import InputError
from sdrt.runtime import schedules


def _noop(i, x):
    return None


def sample_euler(denoise, x, schedule, *, noise=None, callback=_noop):
    """Euler (Karras et al. 2022, Algorithm 2 without churn): EulerDiscreteScheduler."""
    s = schedule.sigmas
    for i in range(len(schedule)):
        d = (x - denoise(x, s[i])) / s[i]
        x = x + d * (s[i + 1] - s[i])
        callback(i, x)
    return x


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split a step into a deterministic part down to sigma_down and fresh noise of size sigma_up."""
    if not eta or not sigma_to:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def sample_euler_ancestral(denoise, x, schedule, *, noise, callback=_noop):
    """Euler ancestral: EulerAncestralDiscreteScheduler."""
    s = schedule.sigmas
    for i in range(len(schedule)):
        x0 = denoise(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1])
        x = x + (x - x0) / s[i] * (down - s[i])
        if up:
            x = x + noise(x.shape) * up
        callback(i, x)
    return x


def sample_dpmpp_2m(denoise, x, schedule, *, noise=None, callback=_noop):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095): DPMSolverMultistepScheduler, order 2.

    First-order on the first step and onto sigma 0, as diffusers' lower_order_final."""
    s = schedule.sigmas
    old_x0 = None
    for i in range(len(schedule)):
        x0 = denoise(x, s[i])
        if s[i + 1] == 0:
            x = x0
        else:
            h = np.log(s[i]) - np.log(s[i + 1])  # lambda = -log(sigma)
            if old_x0 is not None:
                r = (np.log(s[i - 1]) - np.log(s[i])) / h
                x0_mix = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            else:
                x0_mix = x0
            x = (s[i + 1] / s[i]) * x - np.expm1(-h) * x0_mix
        old_x0 = x0
        callback(i, x)
    return x


def sample_ddim(denoise, x, schedule, *, noise=None, callback=_noop):
    """DDIM, eta = 0 (Song et al. 2020): DDIMScheduler. Each step is Euler onto sigmas_prev[i]; the
    state is then re-expressed at sigmas[i + 1], which differs only under `linspace` spacing."""
    s, prev = schedule.sigmas, schedule.sigmas_prev
    for i in range(len(schedule)):
        x0 = denoise(x, s[i])
        x = x0 + (x - x0) * (prev[i] / s[i])
        if prev[i] != s[i + 1]:  # x_t = sqrt(alpha_bar) * state, so rescale between levels
            x = x * np.sqrt((1 + s[i + 1] ** 2) / (1 + prev[i] ** 2))
        callback(i, x)
    return x


@dataclass(frozen=True)
class Sampler:
    name: str
    display: str  # the A1111 name
    fn: Callable
    schedule: Callable  # (scheduler_config, steps, karras) -> Schedule
    karras: bool
    deterministic: bool
    # how diffusers scales the initial noise: "vp" schedulers start from x_T = noise (the sampler
    # state is noise * sqrt(1 + sigma_max^2)); "ve" ones use their init_noise_sigma
    space: str
    diffusers: tuple[str, dict] = field(default=("", {}))  # matching scheduler class and overrides

    def make_schedule(self, config: dict, steps: int):
        return self.schedule(config, steps, self.karras)


_TABLE = [
    Sampler("ddim", "DDIM", sample_ddim, schedules.ddim_schedule, False, True, "vp", ("DDIMScheduler", {})),
    Sampler("euler", "Euler", sample_euler, schedules.euler_schedule, False, True, "ve",
            ("EulerDiscreteScheduler", {})),
    Sampler("euler_a", "Euler a", sample_euler_ancestral, schedules.euler_schedule, False, False, "ve",
            ("EulerAncestralDiscreteScheduler", {})),
    Sampler("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, schedules.dpm_schedule, False, True, "vp",
            ("DPMSolverMultistepScheduler", {})),
    Sampler("dpmpp_2m_karras", "DPM++ 2M Karras", sample_dpmpp_2m, schedules.dpm_schedule, True, True, "vp",
            ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})),
]
SAMPLERS = {s.name: s for s in _TABLE}
DEFAULT_SAMPLER = "dpmpp_2m_karras"


def get_sampler(name: str) -> Sampler:
    """By sdrt name or A1111 display name (case-insensitive)."""
    key = name.strip().lower()
    for s in _TABLE:
        if key in (s.name, s.display.lower()):
            return s
    raise InputError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def initial_state(sampler: Sampler, schedule, config: dict, noise: np.ndarray) -> np.ndarray:
    """Scale unit noise into the sampler state the way the diffusers scheduler's init_noise_sigma does."""
    s0 = schedule.sigmas[0]
    if sampler.space == "ve" and config.get("timestep_spacing", "leading") in ("linspace", "trailing"):
        return noise * s0
    return noise * np.sqrt(1 + s0**2)


def final_latents(sampler: Sampler, schedule, x: np.ndarray) -> np.ndarray:
    """The latents diffusers' loop ends with: "vp" schedulers return x_t, i.e. state * sqrt(alpha_bar)."""
    if sampler.space == "vp":
        return x / np.sqrt(1 + schedule.sigmas[-1] ** 2)
    return x
