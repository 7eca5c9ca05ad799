"""Noise schedules in NumPy: the timesteps and sigmas diffusers' schedulers choose, from a scheduler config.

Everything is float64 (diffusers keeps `alphas_cumprod` in float32, so we round it the same way) and
sigmas follow k-diffusion's convention: sigma = sqrt((1 - alpha_bar) / alpha_bar), the sampler state
is x / sqrt(alpha_bar) and the last sigma is appended (0 unless the config asks otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sdrt.errors import InputError

SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # (n + 1,) decreasing, noise level before each step and after the last
    timesteps: np.ndarray  # (n,) the UNet timestep for sigmas[i]
    sigmas_prev: np.ndarray | None = None  # DDIM only: the level each step lands on, see ddim_schedule
    table: NoiseTable | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.timesteps)

    def tail(self, start: int) -> Schedule:
        """The steps from `start` on (img2img skips the first ones)."""
        prev = None if self.sigmas_prev is None else self.sigmas_prev[start:]
        return Schedule(self.sigmas[start:], self.timesteps[start:], prev, self.table)


class NoiseTable:
    """The training noise levels of a scheduler config: alpha_bar and sigma for t = 0 .. T-1."""

    def __init__(self, config: dict):
        n = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], dtype=np.float64)
        elif kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float64)
        elif kind == "scaled_linear":  # the latent-diffusion schedule
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, cosine alpha_bar
            f = [math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(n + 1)]
            betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)])
        else:
            raise InputError(f"scheduler config: beta_schedule {kind!r} is not supported")
        # diffusers keeps betas and their running product in float32; round the same way
        betas = betas.astype(np.float32)
        self.alphas_cumprod = np.cumprod(np.float32(1.0) - betas, dtype=np.float32).astype(np.float64)
        self.sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        self.log_sigmas = np.log(self.sigmas)
        self.num_train_timesteps = n

    def sigma_to_t(self, sigma: np.ndarray) -> np.ndarray:
        """Fractional timestep whose sigma is `sigma` (linear interpolation in log sigma)."""
        sigma = np.asarray(sigma, dtype=np.float64)
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - self.log_sigmas[:, None]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(self.log_sigmas) - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)

    def sigma_at(self, t: np.ndarray) -> np.ndarray:
        return np.interp(t, np.arange(self.num_train_timesteps), self.sigmas)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM) eq. 5: n levels from sigma_max down to sigma_min, no final zero."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def spaced_timesteps(config: dict, n: int, *, extra: bool = False, round_linspace: bool = True) -> np.ndarray:
    """The `timestep_spacing` rule of diffusers (Table 2 of arXiv:2305.08891), descending.

    `extra`: DPM-Solver's variant, which spaces n + 1 points and drops the smallest.
    """
    total = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "leading")
    m = n + 1 if extra else n
    if spacing == "linspace":
        t = np.linspace(0, total - 1, m)
        t = t.round() if round_linspace else t
    elif spacing == "leading":
        t = (np.arange(m) * (total // m)).round() + int(config.get("steps_offset", 0))
    elif spacing == "trailing":
        return np.round(np.arange(total, 0, -total / n)) - 1
    else:
        raise InputError(f"scheduler config: timestep_spacing {spacing!r} is not one of {SPACINGS}")
    return t[::-1][:n].copy()


def _final_sigma(config: dict, table: NoiseTable) -> float:
    return float(table.sigmas[0]) if config.get("final_sigmas_type", "zero") == "sigma_min" else 0.0


def euler_schedule(config: dict, n: int, karras: bool = False) -> Schedule:
    """EulerDiscreteScheduler / EulerAncestralDiscreteScheduler: sigmas interpolated at the timesteps."""
    table = NoiseTable(config)
    t = spaced_timesteps(config, n, round_linspace=False).astype(np.float32).astype(np.float64)
    sigmas = table.sigma_at(t)
    if karras:
        sigmas = karras_sigmas(n, sigmas[-1], sigmas[0])
        t = table.sigma_to_t(sigmas)
    return Schedule(np.append(sigmas, _final_sigma(config, table)), t, table=table)


def dpm_schedule(config: dict, n: int, karras: bool = False) -> Schedule:
    """DPMSolverMultistepScheduler: Karras levels span the whole training range; timesteps rounded."""
    table = NoiseTable(config)
    t = spaced_timesteps(config, n, extra=True)
    if karras:
        sigmas = karras_sigmas(n, table.sigmas[0], table.sigmas[-1])
        t = table.sigma_to_t(sigmas)
        if config.get("beta_schedule") != "squaredcos_cap_v2":
            t = t.round()
    else:
        sigmas = table.sigma_at(t)
    return Schedule(np.append(sigmas, _final_sigma(config, table)), t, table=table)


def ddim_schedule(config: dict, n: int, karras: bool = False) -> Schedule:
    """DDIMScheduler: integer timesteps; each step lands on t - T // n (`sigmas_prev`), which is the
    next timestep except under `linspace` spacing; below t = 0 it lands on the final alpha_bar."""
    if karras:
        raise InputError("DDIM has no Karras schedule")
    table = NoiseTable(config)
    t = spaced_timesteps(config, n)
    final_ac = 1.0 if config.get("set_alpha_to_one", True) else table.alphas_cumprod[0]
    final_sigma = math.sqrt((1 - final_ac) / final_ac)
    prev = (t - table.num_train_timesteps // n).astype(np.int64)
    sigmas_prev = np.array([table.sigmas[p] if p >= 0 else final_sigma for p in prev])
    sigmas = np.append(table.sigmas[t.astype(np.int64)], final_sigma)
    return Schedule(sigmas, t, sigmas_prev, table)


def strength_start(n: int, strength: float) -> int:
    """img2img: index of the first step that runs (diffusers' get_timesteps)."""
    init = min(int(n * strength), n)
    return max(n - init, 0)
