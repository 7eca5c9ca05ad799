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


SIGMA_TYPES = ("default", "karras", "exponential")


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # (n + 1,) decreasing, noise level before each step and after the last
    timesteps: np.ndarray  # (n,) the UNet timestep for sigmas[i]
    sigmas_prev: np.ndarray | None = None  # DDIM family: the level step i lands on (see ddim_schedule)
    table: NoiseTable | None = field(default=None, compare=False)
    # scheduler-config facts some samplers need: step_ratio (T // n), clip (x0 clip range or None),
    # timestep_scaling (LCM), variance_type (DDPM)
    params: dict = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.timesteps)

    def tail(self, start: int) -> Schedule:
        """The steps from `start` on (img2img skips the first ones)."""
        prev = None if self.sigmas_prev is None else self.sigmas_prev[start:]
        return Schedule(self.sigmas[start:], self.timesteps[start:], prev, self.table, self.params)


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
            f = [math.cos((t / n + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(n + 1)]
            betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)])
        else:
            raise InputError(f"scheduler config: beta_schedule {kind!r} is not supported")
        # diffusers keeps betas and their running product in float32; round the same way
        betas = betas.astype(np.float32)
        if config.get("rescale_betas_zero_snr"):
            betas = _zero_terminal_snr(betas)
        self.alphas_cumprod = np.cumprod(np.float32(1.0) - betas, dtype=np.float32).astype(np.float64)
        if config.get("rescale_betas_zero_snr"):
            # zero SNR makes sigma_max infinite; diffusers' Euler clamps alpha_bar to the smallest fp16
            # subnormal, and so do all samplers here (they work in sigma = sqrt((1 - a) / a))
            self.alphas_cumprod[-1] = 2.0**-24
        # like diffusers, the sigma table and its logs are float32 values: timesteps found by
        # interpolating in it (Karras / exponential levels) then agree to the last bit
        ac32 = self.alphas_cumprod.astype(np.float32)
        sigmas32 = np.sqrt((1 - ac32) / ac32)
        self.sigmas = sigmas32.astype(np.float64)
        self.log_sigmas = np.log(sigmas32).astype(np.float64)
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


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv:2305.08891) Algorithm 1: rescale betas so alpha_bar_T = 0 (float32)."""
    sqrt_ab = np.sqrt(np.cumprod(np.float32(1.0) - betas, dtype=np.float32))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1 - alphas).astype(np.float32)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM) eq. 5: n levels from sigma_max down to sigma_min, no final zero."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n levels evenly spaced in log sigma (A1111's "Exponential" schedule type)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _levels(sigma_type: str, n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    if sigma_type == "karras":
        return karras_sigmas(n, sigma_min, sigma_max)
    if sigma_type == "exponential":
        return exponential_sigmas(n, sigma_min, sigma_max)
    raise InputError(f"schedule type {sigma_type!r} is not one of {SIGMA_TYPES}")


def spaced_timesteps(config: dict, n: int, *, extra: bool = False, round_linspace: bool = True) -> np.ndarray:
    """The `timestep_spacing` rule of diffusers (Table 2 of arXiv:2305.08891), descending.

    `extra`: the multistep solvers' variant, which spaces n + 1 points and drops the smallest.
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


def _params(config: dict, n: int, clip_default: bool = False) -> dict:
    """clip_default: the clip_sample of the diffusers class when the config has none (DDIM's and
    DDPM's is True: a config saved from another scheduler, e.g. PNDM's, clips under them)."""
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", clip_default) else None
    return {"step_ratio": int(config.get("num_train_timesteps", 1000)) // n, "clip": clip,
            "spacing": config.get("timestep_spacing", "leading"),
            "timestep_scaling": float(config.get("timestep_scaling", 10.0)),
            "variance_type": config.get("variance_type", "fixed_small")}


def k_schedule(config: dict, n: int, sigma_type: str = "default", *, final_from_config: bool = False,
               round_karras: bool = False) -> Schedule:
    """The k-diffusion style schedulers (Euler, Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ SDE): sigmas
    interpolated at the spaced timesteps; Karras / exponential levels span those sigmas."""
    table = NoiseTable(config)
    t = spaced_timesteps(config, n, round_linspace=False).astype(np.float32).astype(np.float64)
    sigmas = table.sigma_at(t)
    if sigma_type != "default":
        sigmas = _levels(sigma_type, n, sigmas[-1], sigmas[0])
        t = table.sigma_to_t(sigmas)
        if round_karras and sigma_type == "karras":  # KDPM2 and KDPM2Ancestral round them
            t = t.round()
    last = float(table.sigmas[0]) if final_from_config and config.get("final_sigmas_type") == "sigma_min" else 0.0
    return Schedule(np.append(sigmas, last), t, table=table, params=_params(config, n))


def multistep_schedule(config: dict, n: int, sigma_type: str = "default", *, final: str = "config") -> Schedule:
    """DPMSolverMultistep, UniPC and DEIS: n + 1 spaced points without the last; Karras /
    exponential levels span the whole training range, Karras timesteps rounded.

    final: "config" (final_sigmas_type, DPM-Solver and UniPC) or "deis" (always sigma_min).
    """
    table = NoiseTable(config)
    t = spaced_timesteps(config, n, extra=True)
    if sigma_type != "default":
        sigmas = _levels(sigma_type, n, table.sigmas[0], table.sigmas[-1])
        t = table.sigma_to_t(sigmas)
        if sigma_type == "karras" and config.get("beta_schedule") != "squaredcos_cap_v2":
            t = t.round()
        t = np.trunc(t)  # the solvers keep int64 timesteps
    else:
        sigmas = table.sigma_at(t)
    # Karras / exponential levels end at sigma_min too, so one value serves every variant
    last = float(table.sigmas[0]) if final == "deis" or config.get("final_sigmas_type") == "sigma_min" else 0.0
    return Schedule(np.append(sigmas, last), t, table=table, params=_params(config, n))


def ddim_schedule(config: dict, n: int, sigma_type: str = "default", *, final_alpha_one: bool = False,
                  clip_default: bool = False) -> Schedule:
    """DDIM, PLMS, DDPM: integer timesteps. Step i lands on t - T // n (`sigmas_prev`), which is the
    next timestep except under `linspace` spacing; below t = 0 on the final alpha_bar (DDIM and
    PLMS: 1 or alpha_bar_0 by set_alpha_to_one; DDPM, final_alpha_one: always 1)."""
    if sigma_type != "default":
        raise InputError(f"this sampler has no {sigma_type} schedule type")
    table = NoiseTable(config)
    t = spaced_timesteps(config, n)
    if final_alpha_one or config.get("set_alpha_to_one", True):
        final_sigma = 0.0
    else:
        final_sigma = float(table.sigmas[0])
    prev = (t - table.num_train_timesteps // n).astype(np.int64)
    sigmas_prev = np.array([table.sigmas[p] if p >= 0 else final_sigma for p in prev])
    sigmas = np.append(table.sigmas[t.astype(np.int64)], final_sigma)
    return Schedule(sigmas, t, sigmas_prev, table, _params(config, n, clip_default))


def lcm_schedule(config: dict, n: int, sigma_type: str = "default") -> Schedule:
    """LCMScheduler: n of the distillation's `original_inference_steps` timesteps, evenly picked."""
    if sigma_type != "default":
        raise InputError(f"LCM has no {sigma_type} schedule type")
    table = NoiseTable(config)
    original = int(config.get("original_inference_steps", 50))
    if n > original:
        raise InputError(f"LCM: at most {original} steps (the distillation's original_inference_steps)")
    k = table.num_train_timesteps // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]
    t = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)].astype(np.float64)
    sigmas = np.append(table.sigmas[t.astype(np.int64)], 0.0)
    return Schedule(sigmas, t, table=table, params=_params(config, n))


def strength_start(n: int, strength: float) -> int:
    """img2img: index of the first step that runs (diffusers' get_timesteps)."""
    init = min(int(n * strength), n)
    return max(n - init, 0)
