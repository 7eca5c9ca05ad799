"""Samplers as plain functions over NumPy arrays (the k-diffusion style).

Contract: `sampler(denoise, x, schedule, *, noise, callback, **options) -> x`, where
`denoise(x, sigma) -> x0`, x is the sampler state x_t / sqrt(alpha_bar_t) at level
schedule.sigmas[0] (sigma = sqrt((1 - alpha_bar) / alpha_bar)), `noise(shape)` draws standard normal
noise (the caller seeds it) and `x = callback(i, x)` ends step i: the loop's hook, which may return
another state to go on from (inpainting's blend does; sdrt.runtime.pipeline). Multistep history lives in
local variables. Each function matches, step for step, the diffusers scheduler SAMPLERS names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from sdrt.errors import InputError
from sdrt.runtime import schedules


def _noop(i, x):
    return x


def _clip(x0, schedule):
    r = schedule.params.get("clip")
    return x0 if r is None else np.clip(x0, -r, r)


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split a step into a deterministic part down to sigma_down and fresh noise of size sigma_up."""
    if not eta or not sigma_to:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


# -- first-order and ancestral ---------------------------------------------------------------

def sample_euler(denoise, x, schedule, *, noise=None, callback=_noop):
    """Euler (Karras et al. 2022, Algorithm 2 without churn): EulerDiscreteScheduler."""
    s = schedule.sigmas
    for i in range(len(schedule)):
        x = x + (x - denoise(x, s[i])) / s[i] * (s[i + 1] - s[i])
        x = callback(i, x)
    return x


def sample_euler_ancestral(denoise, x, schedule, *, noise, callback=_noop):
    """Euler ancestral: EulerAncestralDiscreteScheduler."""
    s = schedule.sigmas
    for i in range(len(schedule)):
        x0 = denoise(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1])
        x = x + (x - x0) / s[i] * (down - s[i])
        if up:
            x = x + noise(x.shape) * up
        x = callback(i, x)
    return x


def sample_ddim(denoise, x, schedule, *, noise=None, callback=_noop, eta=0.0):
    """DDIM (Song et al. 2020): DDIMScheduler. A step is Euler onto sigmas_prev[i] (plus noise for
    eta > 0: DDIM's sigma_t is exactly the ancestral sigma_up), then the state is re-expressed at
    sigmas[i + 1], which differs from sigmas_prev[i] only under `linspace` spacing."""
    s, prev = schedule.sigmas, schedule.sigmas_prev
    for i in range(len(schedule)):
        x0 = denoise(x, s[i])
        eps = (x - x0) / s[i]
        down, up = ancestral_step(s[i], prev[i], eta)
        x = _clip(x0, schedule) + eps * down
        if up:
            x = x + noise(x.shape) * up
        if prev[i] != s[i + 1]:  # x_t = sqrt(alpha_bar) * state, so rescale between levels
            x = x * np.sqrt((1 + s[i + 1] ** 2) / (1 + prev[i] ** 2))
        x = callback(i, x)
    return x


def sample_ddpm(denoise, x, schedule, *, noise, callback=_noop):
    """DDPM ancestral sampling (Ho et al. 2020, eq. 7): DDPMScheduler, fixed_small / fixed_large variance."""
    s, large = schedule.sigmas, schedule.params.get("variance_type") == "fixed_large"
    for i in range(len(schedule)):
        x0 = _clip(denoise(x, s[i]), schedule)
        a, a_prev = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
        beta = 1 - a / a_prev
        x_t = x * np.sqrt(a)  # posterior q(x_prev | x_t, x0) in x_t units
        mean = np.sqrt(a_prev) * beta / (1 - a) * x0 + np.sqrt(a / a_prev) * (1 - a_prev) / (1 - a) * x_t
        var = beta if large else max((1 - a_prev) / (1 - a) * beta, 1e-20)
        if s[i + 1]:
            mean = mean + np.sqrt(var) * noise(x.shape)
        x = mean / np.sqrt(a_prev)
        x = callback(i, x)
    return x


def sample_lcm(denoise, x, schedule, *, noise, callback=_noop):
    """Latent consistency sampling (Luo et al. 2023): LCMScheduler's boundary-condition scalings."""
    s, scale = schedule.sigmas, schedule.params["timestep_scaling"]
    for i in range(len(schedule)):
        x0 = _clip(denoise(x, s[i]), schedule)
        t = schedule.timesteps[i] * scale
        c_skip, c_out = 0.25 / (t**2 + 0.25), t / (t**2 + 0.25) ** 0.5  # sigma_data = 0.5
        x = c_out * x0 + c_skip * x / np.sqrt(1 + s[i] ** 2)
        if s[i + 1]:
            x = x + noise(x.shape) * s[i + 1]
        x = callback(i, x)
    return x


# -- second-order single-step --------------------------------------------------------------

def sample_heun(denoise, x, schedule, *, noise=None, callback=_noop):
    """Heun (Karras et al. 2022, Algorithm 1 without churn): HeunDiscreteScheduler."""
    s = schedule.sigmas
    for i in range(len(schedule)):
        d = (x - denoise(x, s[i])) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - denoise(x2, s[i + 1])) / s[i + 1]
            x = x + (d + d2) / 2 * dt
        x = callback(i, x)
    return x


def sample_dpm2(denoise, x, schedule, *, noise=None, callback=_noop, ancestral=False):
    """DPM-Solver-2 (Lu et al. 2022) as k-diffusion's sample_dpm_2 / sample_dpm_2_ancestral:
    KDPM2DiscreteScheduler / KDPM2AncestralDiscreteScheduler. Midpoint at the geometric mean.
    The ancestral split is taken in float32, as both references do: sigma_down = sqrt(sigma_next^2 -
    sigma_up^2) cancels badly for big steps, and the result follows the rounding."""
    s = schedule.sigmas
    for i in range(len(schedule)):
        if ancestral:
            down, up = (float(v) for v in ancestral_step(np.float32(s[i]), np.float32(s[i + 1])))
        else:
            down, up = s[i + 1], 0.0
        d = (x - denoise(x, s[i])) / s[i]
        if down == 0:
            x = x + d * (down - s[i])
        else:
            mid = np.exp(0.5 * (np.log(s[i]) + np.log(down)))
            x2 = x + d * (mid - s[i])
            x = x + (x2 - denoise(x2, mid, midpoint=True)) / mid * (down - s[i])
        if up:
            x = x + noise(x.shape) * up
        x = callback(i, x)
    return x


def sample_dpmpp_sde(denoise, x, schedule, *, noise, callback=_noop):
    """DPM-Solver++(2S) with SDE noise, r = 1/2, eta = 1 (k-diffusion sample_dpmpp_sde):
    DPMSolverSDEScheduler. Two noise draws per step, midpoint then full step."""
    s = schedule.sigmas
    for i in range(len(schedule)):
        x0 = denoise(x, s[i])
        if s[i + 1] == 0:
            x = x + (x - x0) / s[i] * (s[i + 1] - s[i])
        else:
            mid = np.sqrt(s[i] * s[i + 1])  # exp(-(t + h / 2)) with t = -log sigma
            down, up = ancestral_step(s[i], mid)
            x2 = (down / s[i]) * x - np.expm1(np.log(down) - np.log(s[i])) * x0 + noise(x.shape) * up
            x0_2 = denoise(x2, mid, midpoint=True)
            down, up = ancestral_step(s[i], s[i + 1])
            x = (down / s[i]) * x - np.expm1(np.log(down) - np.log(s[i])) * x0_2 + noise(x.shape) * up
        x = callback(i, x)
    return x


# -- multistep -------------------------------------------------------------------------------

def sample_dpmpp_2m(denoise, x, schedule, *, noise=None, callback=_noop, sde=False):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), midpoint form: DPMSolverMultistepScheduler;
    sde=True: its "sde-dpmsolver++" (eta 1). First-order on the first step and onto sigma 0."""
    s = schedule.sigmas
    old_x0 = None
    for i in range(len(schedule)):
        x0 = denoise(x, s[i])
        if s[i + 1] == 0:
            x = x0
        else:
            h = np.log(s[i]) - np.log(s[i + 1])  # lambda = -log(sigma)
            mix = x0
            if old_x0 is not None:
                r = (np.log(s[i - 1]) - np.log(s[i])) / h
                mix = x0 + (x0 - old_x0) / (2 * r)
            if sde:
                x = (s[i + 1] / s[i]) * np.exp(-h) * x - np.expm1(-2 * h) * mix
                x = x + noise(x.shape) * s[i + 1] * np.sqrt(-np.expm1(-2 * h))
            else:
                x = (s[i + 1] / s[i]) * x - np.expm1(-h) * mix
        old_x0 = x0
        x = callback(i, x)
    return x


def lms_coefficient(s, i, j, order):
    """Integral over [s[i], s[i+1]] of the Lagrange basis polynomial j on s[i], s[i-1], ... (exact)."""
    poly = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            poly *= np.poly1d([1.0, -s[i - k]]) / (s[i - j] - s[i - k])
    antiderivative = poly.integ()
    return antiderivative(s[i + 1]) - antiderivative(s[i])


def sample_lms(denoise, x, schedule, *, noise=None, callback=_noop, order=4):
    """Linear multistep on the ODE derivative, up to 4th order: LMSDiscreteScheduler."""
    s = schedule.sigmas
    ds = []
    for i in range(len(schedule)):
        ds = [*ds[-(order - 1):], (x - denoise(x, s[i])) / s[i]]
        cur = len(ds)
        x = x + sum(lms_coefficient(s, i, j, cur) * d for j, d in enumerate(reversed(ds)))
        x = callback(i, x)
    return x


def sample_deis(denoise, x, schedule, *, noise=None, callback=_noop):
    """DEIS, log-rho, order 2 (Zhang & Chen 2022): DEISMultistepScheduler. rho is our sigma;
    first-order on the first step and, under 15 steps, on the last (lower_order_final)."""
    s, n = schedule.sigmas, len(schedule)

    def ind(t, b, c):
        return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))

    old_eps = None
    for i in range(n):
        eps = (x - denoise(x, s[i])) / s[i]
        if old_eps is None or (i == n - 1 and n < 15):
            x = x + eps * (s[i + 1] - s[i])
        else:
            t, s0, s1 = s[i + 1], s[i], s[i - 1]
            x = x + (ind(t, s0, s1) - ind(s0, s0, s1)) * eps + (ind(t, s1, s0) - ind(s0, s1, s0)) * old_eps
        old_eps = eps
        x = callback(i, x)
    return x


def _unipc(x, s, i_from, i_to, x0s, order, x0_new=None):
    """One UniP (predictor) or, with x0_new, UniC (corrector) B(h) = expm1(h) update from sigma
    s[i_from] to s[i_to]; x0s[-1 - k] is the data prediction at s[i_from - k] (Zhao et al. 2023)."""
    if s[i_to] == 0:  # lower_order_final makes this a first-order step onto x0
        return x0s[-1]
    h = np.log(s[i_from]) - np.log(s[i_to])
    phi, m0 = np.expm1(-h), x0s[-1]
    rks = [(np.log(s[i_from]) - np.log(s[i_from - k])) / h for k in range(1, order)] + [1.0]
    d1s = [(x0s[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
    b, h_phi_k, fact = [], phi / -h - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / phi)
        fact *= k + 1
        h_phi_k = h_phi_k / -h - 1 / fact
    R = np.array([np.power(rks, k) for k in range(order)])
    base = (s[i_to] / s[i_from]) * x - phi * m0
    if x0_new is None:
        if not d1s:
            return base
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        return base - phi * sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
    return base - phi * (sum(r * d for r, d in zip(rhos[:-1], d1s)) + rhos[-1] * (x0_new - m0))


def sample_unipc(denoise, x, schedule, *, noise=None, callback=_noop, order=2):
    """UniPC, bh2, data prediction (Zhao et al. 2023): UniPCMultistepScheduler. Each new model
    output first corrects the previous step (UniC), then predicts the next (UniP)."""
    s, n = schedule.sigmas, len(schedule)
    x0s, x_last, last_order = [], None, 0
    for i in range(n):
        x0 = denoise(x, s[i])
        if x_last is not None:
            x = _unipc(x_last, s, i - 1, i, x0s, last_order, x0_new=x0)
        x0s = [*x0s[-(order - 1):], x0]
        last_order = min(order, n - i, len(x0s))
        x_last = x
        x = _unipc(x, s, i, i + 1, x0s, last_order)
        x = callback(i, x)
    return x


def sample_plms(denoise, x, schedule, *, noise=None, callback=_noop):
    """PLMS (Liu et al. 2022, PNDM without the Runge-Kutta warm-up): PNDMScheduler(skip_prk_steps).

    Like diffusers, the multistep combination is taken over the raw model outputs (eps or v), which
    are then read as eps against the current state; the first step is redone with the average of
    its two outputs (a Heun-like warm-up), evaluated `step_ratio` apart."""
    s, prev, n = schedule.sigmas, schedule.sigmas_prev, len(schedule)
    table, r = schedule.table, schedule.params["step_ratio"]

    def output(x, sigma):  # the raw model output at (x, sigma)
        return denoise.raw_output(x, denoise(x, sigma), sigma)

    def move(x, out, sig_from, sig_to):  # diffusers' _get_prev_sample, in state units
        return x + denoise.eps_from_raw(x, out, sig_from) * (sig_to - sig_from)

    outs = [output(x, s[0])]
    if n == 1:
        x = move(x, outs[0], s[0], prev[0])
        x = callback(0, x)
        return x
    x_pred = move(x, outs[0], s[0], prev[0]) * np.sqrt((1 + s[1] ** 2) / (1 + prev[0] ** 2))
    # step 0 again, from the level diffusers assigns it (t_1 + step_ratio), with the averaged output
    s_restart = float(table.sigmas[int(schedule.timesteps[1]) + r])
    x = move(x * np.sqrt((1 + s_restart**2) / (1 + s[0] ** 2)), (outs[0] + output(x_pred, s[1])) / 2,
             s_restart, s[1])
    x = callback(0, x)
    coefs = {2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for i in range(1, n):
        outs = [*outs[-3:], output(x, s[i])]
        out = sum(c * o for c, o in zip(coefs[len(outs)], reversed(outs)))
        x = move(x, out, s[i], prev[i])
        if prev[i] != s[i + 1]:
            x = x * np.sqrt((1 + s[i + 1] ** 2) / (1 + prev[i] ** 2))
        x = callback(i, x)
    return x


# -- the table --------------------------------------------------------------------------------

SCHEDULE_TYPES = ("karras", "exponential", "sgm_uniform")
# what each schedule type sets on the matching diffusers scheduler
DIFFUSERS_SCHEDULE_TYPE = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
                           "sgm_uniform": {"timestep_spacing": "trailing"}}


@dataclass(frozen=True)
class Sampler:
    name: str
    display: str  # the A1111 name
    fn: Callable
    schedule: Callable  # (scheduler_config, steps, sigma_type) -> Schedule
    deterministic: bool
    # how diffusers scales the initial noise and returns the result: "vp" schedulers work on x_t
    # (the state is noise * sqrt(1 + sigma_max^2)); "ve" ones on x_t / sqrt(alpha_bar)
    space: str
    diffusers: tuple[str, dict]  # the matching diffusers scheduler class and config overrides
    schedule_types: tuple[str, ...] = ("sgm_uniform",)  # the A1111 schedule types it accepts
    sigma_type: str = "default"  # fixed by the name ("karras" for the *_karras names)
    options: dict = field(default_factory=dict)  # keyword arguments for fn
    # img2img: the index of the first step that runs, from (steps, strength), as diffusers starts it
    img2img_start: Callable = schedules.strength_start

    def make_schedule(self, config: dict, steps: int, schedule_type: str | None = None):
        sigma_type = self.sigma_type
        if schedule_type is not None and schedule_type != sigma_type:
            if schedule_type not in self.schedule_types or self.sigma_type != "default":
                raise InputError(f"sampler {self.name} does not take schedule type {schedule_type!r}"
                                 f" (it takes: {', '.join(self.schedule_types) or 'none'})")
            if schedule_type == "sgm_uniform":
                config = config | {"timestep_spacing": "trailing"}
            else:
                sigma_type = schedule_type
        return self.schedule(config, steps, sigma_type)

    def options_for(self, eta: float | None = None) -> dict:
        """fn's keyword options; eta (DDIM's noise amount) is for ddim only."""
        options = dict(self.options)
        if eta is not None:
            if self.fn is not sample_ddim:
                raise InputError(f"eta applies to the ddim sampler only, not {self.name}")
            if not 0 <= eta <= 1:
                raise InputError(f"eta must be in [0, 1], got {eta}")
            options["eta"] = eta
        return options

    def diffusers_config(self, schedule_type: str | None = None) -> tuple[str, dict]:
        cls, overrides = self.diffusers
        return cls, overrides | DIFFUSERS_SCHEDULE_TYPE.get(schedule_type, {})


def _plms_start(steps: int, strength: float) -> int:
    """diffusers slices PNDM's timesteps, which repeat the second one, at the same index as others."""
    start = schedules.strength_start(steps, strength)
    return start - 1 if start >= 2 else start


_K = ("karras", "exponential", "sgm_uniform")
_k = schedules.k_schedule
_ms = schedules.multistep_schedule


def _variants(name, display, fn, schedule, deterministic, space, cls, *, types=_K, options=None, **overrides):
    """A sampler and, where diffusers has Karras sigmas for it, its `_karras` twin."""
    options = options or {}
    base = Sampler(name, display, fn, schedule, deterministic, space, (cls, overrides), types, "default", options)
    if "karras" not in types:
        return [base]
    karras = Sampler(f"{name}_karras", f"{display} Karras", fn, schedule, deterministic, space,
                     (cls, overrides | {"use_karras_sigmas": True}), (), "karras", options)
    return [base, karras]


_TABLE = [
    Sampler("ddim", "DDIM", sample_ddim, partial(schedules.ddim_schedule, clip_default=True), True, "vp",
            ("DDIMScheduler", {})),
    Sampler("pndm", "PLMS", sample_plms, schedules.ddim_schedule, True, "vp",
            ("PNDMScheduler", {"skip_prk_steps": True}), img2img_start=_plms_start),
    *_variants("lms", "LMS", sample_lms, _k, True, "ve", "LMSDiscreteScheduler"),
    Sampler("euler", "Euler", sample_euler, partial(_k, final_from_config=True), True, "ve",
            ("EulerDiscreteScheduler", {}), _K),
    Sampler("euler_a", "Euler a", sample_euler_ancestral, _k, False, "ve", ("EulerAncestralDiscreteScheduler", {})),
    Sampler("heun", "Heun", sample_heun, _k, True, "ve", ("HeunDiscreteScheduler", {}), _K),
    *_variants("dpm2", "DPM2", sample_dpm2, partial(_k, round_karras=True), True, "ve", "KDPM2DiscreteScheduler"),
    *_variants("dpm2_a", "DPM2 a", sample_dpm2, partial(_k, round_karras=True), False, "ve",
               "KDPM2AncestralDiscreteScheduler", options={"ancestral": True}),
    *_variants("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, _ms, True, "vp", "DPMSolverMultistepScheduler"),
    *_variants("dpmpp_2m_sde", "DPM++ 2M SDE", sample_dpmpp_2m, _ms, False, "vp", "DPMSolverMultistepScheduler",
               options={"sde": True}, algorithm_type="sde-dpmsolver++"),
    *_variants("dpmpp_sde", "DPM++ SDE", sample_dpmpp_sde, _k, False, "ve", "DPMSolverSDEScheduler"),
    Sampler("unipc", "UniPC", sample_unipc, _ms, True, "vp", ("UniPCMultistepScheduler", {}), _K),
    Sampler("deis", "DEIS", sample_deis, partial(_ms, final="deis"), True, "vp", ("DEISMultistepScheduler", {}), _K),
    Sampler("ddpm", "DDPM", sample_ddpm, partial(schedules.ddim_schedule, final_alpha_one=True, clip_default=True),
            False, "vp", ("DDPMScheduler", {})),
    Sampler("lcm", "LCM", sample_lcm, schedules.lcm_schedule, False, "vp", ("LCMScheduler", {})),
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


def initial_state(sampler: Sampler, schedule, noise: np.ndarray) -> np.ndarray:
    """Scale unit noise into the sampler state the way the diffusers scheduler's init_noise_sigma does."""
    s0 = schedule.sigmas[0]
    if sampler.space == "ve" and schedule.params.get("spacing") in ("linspace", "trailing"):
        return noise * s0
    return noise * np.sqrt(1 + s0**2)


def final_latents(sampler: Sampler, schedule, x: np.ndarray) -> np.ndarray:
    """The latents diffusers' loop ends with: "vp" schedulers return x_t, i.e. state * sqrt(alpha_bar)."""
    if sampler.space == "vp":
        return x / np.sqrt(1 + schedule.sigmas[-1] ** 2)
    return x
