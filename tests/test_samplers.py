"""Every sampler + schedule against the diffusers scheduler loop, step by step, on a synthetic model.

No ONNX here: the model is a smooth NumPy function of (x_t, t), so both loops see the same model and
any difference comes from the schedule or the update rule. Stochastic samplers get the same noise
draws on both sides (diffusers' randn_tensor / Brownian-tree sampler patched to hand out sdrt's).
"""

from __future__ import annotations

import itertools
from contextlib import ExitStack

import numpy as np
import pytest

from sdrt.errors import InputError
from sdrt.export.architectures import SD15_SCHEDULER
from sdrt.runtime import noise, samplers
from sdrt.runtime.denoiser import Denoiser
from tests.reference import patch_noise, scheduler_for

CONFIG = {k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"}
RTOL = 1e-5
_W = np.random.default_rng(0).standard_normal((4, 4)) * 0.3
def model(x_t: np.ndarray, t: float) -> np.ndarray:
    """Stand-in for a UNet: (B, 4, h, w) -> (B, 4, h, w), depends on x and t."""
    return np.tanh(np.einsum("ij,bjhw->bihw", _W, x_t)) * (1 + t / 1000) + 0.1 * x_t


class _Unet:
    def __call__(self, sample, timestep, context):
        return model(sample.astype(np.float64), float(timestep[0]))


def run_diffusers(name, config, steps, x_init, draws, schedule_type=None, eta=None):
    import torch

    sch = scheduler_for(config, name, schedule_type)
    sch.set_timesteps(steps)
    x = torch.from_numpy(x_init) * sch.init_noise_sigma
    states = []
    step_kwargs = {} if eta is None else {"eta": eta}
    with ExitStack() as stack:
        patch_noise(stack, draws)
        for k, t in enumerate(sch.timesteps):
            x_in = sch.scale_model_input(x, t)
            out = torch.from_numpy(model(x_in.numpy(), float(t)))
            x = sch.step(out, t, x, **step_kwargs).prev_sample
            last = k == len(sch.timesteps) - 1
            if last or getattr(sch, "state_in_first_order", True) and not (name == "pndm" and k == 0):
                states.append(x.numpy().copy())  # a whole step is done (2nd-order ones take two calls)
    return states


def run_sdrt(name, config, steps, x_init, draws, schedule_type=None, eta=None):
    smp = samplers.get_sampler(name)
    schedule = smp.make_schedule(config, steps, schedule_type)
    denoise = Denoiser(_Unet(), schedule, config["prediction_type"], np.zeros((1, 77, 8)), None, 1.0)
    states = []

    def in_diffusers_terms(i, x):  # "vp" schedulers hold x_t = state * sqrt(alpha_bar)
        states.append(x / np.sqrt(1 + schedule.sigmas[i + 1] ** 2) if smp.space == "vp" else x)
        return x

    x = samplers.initial_state(smp, schedule, x_init)
    smp.fn(denoise, x, schedule, noise=draws, callback=in_diffusers_terms, **smp.options_for(eta))
    return states


def float32_split_slack(name, config, steps, x_init, ours, schedule_type=None):
    """Per step, how far the float32 ancestral split alone moves DPM2 a's state (0 for other samplers).

    DPM2 a splits each step in float32, as k-diffusion and diffusers do: sigma_down = sqrt(sigma_to^2 -
    sigma_up^2) cancels for big steps (2 linspace steps: ~1e-6 of sigma_to^2 survives, so float32 leaves
    sigma_down ~1% uncertain), and the midpoint's 1 / sigma_mid amplifies that. Float32 pow and sqrt
    round differently from CPU to CPU (torch's vectorized kernels, numpy's), so two correct float32
    splits may differ by as much as either differs from the exact split: the slack is the distance
    between sdrt's float32 run and the same run with the split in float64."""
    if not samplers.get_sampler(name).options.get("ancestral"):
        return [0.0] * len(ours)
    real = samplers.ancestral_step
    try:
        samplers.ancestral_step = lambda a, b, eta=1.0: real(float(a), float(b), eta)
        exact = run_sdrt(name, config, steps, x_init, noise.Noise("sdrt", [1, 2]).sampler(), schedule_type)
    finally:
        samplers.ancestral_step = real
    return [float(np.abs(a - b).max()) for a, b in zip(ours, exact)]


def _compare(name, config, steps, schedule_type=None, eta=None, rtol=RTOL):
    x_init = np.random.default_rng(steps).standard_normal((2, 4, 3, 3))
    ref = run_diffusers(name, config, steps, x_init, noise.Noise("sdrt", [1, 2]).sampler(), schedule_type, eta)
    ours = run_sdrt(name, config, steps, x_init, noise.Noise("sdrt", [1, 2]).sampler(), schedule_type, eta)
    assert len(ours) == len(ref) == steps
    slack = float32_split_slack(name, config, steps, x_init, ours, schedule_type)
    for i, (a, b) in enumerate(zip(ours, ref)):
        scale = max(np.abs(b).max(), 1e-3)
        err = np.abs(a - b).max() / scale
        assert err < rtol + 4 * slack[i] / scale, f"step {i}: {err:.2e} (float32 split slack {slack[i] / scale:.1e})"


DETERMINISTIC = ["ddim", "pndm", "lms", "lms_karras", "euler", "heun", "dpm2", "dpm2_karras", "dpmpp_2m",
                 "dpmpp_2m_karras", "unipc", "deis"]
STOCHASTIC = ["euler_a", "dpm2_a", "dpm2_a_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_sde",
              "dpmpp_sde_karras", "ddpm", "lcm"]
SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction"]


def test_the_table_is_the_contract():
    assert set(DETERMINISTIC + STOCHASTIC) == set(samplers.SAMPLERS)
    for name in DETERMINISTIC:
        assert samplers.SAMPLERS[name].deterministic, name
    for name in STOCHASTIC:
        assert not samplers.SAMPLERS[name].deterministic, name


@pytest.mark.parametrize("name,spacing,prediction,steps",
                         list(itertools.product(DETERMINISTIC, SPACINGS, PREDICTIONS, [1, 2, 3, 10, 25, 50])))
def test_deterministic_every_step_matches_diffusers(name, spacing, prediction, steps):
    _compare(name, CONFIG | {"timestep_spacing": spacing, "prediction_type": prediction}, steps)


@pytest.mark.parametrize("name,spacing,prediction,steps",
                         list(itertools.product(STOCHASTIC, SPACINGS, PREDICTIONS, [1, 2, 3, 10, 25])))
def test_stochastic_with_the_same_noise_matches_diffusers(name, spacing, prediction, steps):
    _compare(name, CONFIG | {"timestep_spacing": spacing, "prediction_type": prediction}, steps)


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_with_eta(eta, spacing):
    _compare("ddim", CONFIG | {"timestep_spacing": spacing}, 10, eta=eta)


@pytest.mark.parametrize("schedule_type", ["karras", "exponential", "sgm_uniform"])
@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpm2", "dpm2_a", "dpmpp_2m", "dpmpp_2m_sde",
                                  "dpmpp_sde", "unipc", "deis"])
def test_schedule_types_match_diffusers(name, schedule_type):
    for steps in (3, 20):
        _compare(name, CONFIG, steps, schedule_type=schedule_type)


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"prediction_type": "sample"},
    {"set_alpha_to_one": True},
    {"clip_sample": True, "clip_sample_range": 0.5},
], ids=["linear", "cosine", "sample-prediction", "alpha-to-one", "clip-sample"])
@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "ddpm", "lcm", "unipc"])
def test_config_variants_match_diffusers(name, config):
    _compare(name, CONFIG | config, 10)


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "unipc", "ddim", "ddpm", "lcm"])
def test_zero_terminal_snr(name):
    """rescale_betas_zero_snr: Euler-type schedulers clamp alpha_bar_T to 2**-24 as diffusers' Euler
    does; the x_t-based diffusers schedulers keep it at 0, which the state x_t / sqrt(alpha_bar) can't
    hold, so those agree to the clamp's size only."""
    config = CONFIG | {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                       "prediction_type": "v_prediction"}
    exact = samplers.get_sampler(name).space == "ve"
    _compare(name, config, 10, rtol=RTOL if exact else 1e-2)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
@pytest.mark.parametrize("strength", [0.0, 0.3, 0.5, 0.75, 1.0])
def test_img2img_start_matches_diffusers(name, strength):
    """The first step that runs and its noise level, as diffusers' get_timesteps + add_noise give them."""
    import torch

    steps = 10
    smp = samplers.get_sampler(name)
    sch = scheduler_for(CONFIG, name)
    sch.set_timesteps(steps)
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0) * sch.order
    schedule = smp.make_schedule(CONFIG, steps).tail(smp.img2img_start(steps, strength))
    if not len(schedule):
        assert start >= len(sch.timesteps)
        return
    np.testing.assert_allclose(schedule.timesteps[0], float(sch.timesteps[start]), atol=1e-3)  # float32 there
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(start)
    one = sch.add_noise(torch.zeros(1), torch.ones(1), sch.timesteps[start:start + 1])
    alpha = 1 / np.sqrt(1 + schedule.sigmas[0] ** 2) if smp.space == "vp" else 1
    np.testing.assert_allclose(float(one), schedule.sigmas[0] * alpha, rtol=1e-5)


def test_sampler_names():
    assert samplers.get_sampler("DPM++ 2M Karras").name == "dpmpp_2m_karras"
    assert samplers.get_sampler("euler a").name == "euler_a"
    assert samplers.get_sampler("PLMS").name == "pndm"
    with pytest.raises(InputError, match="choose one of: ddim, pndm"):
        samplers.get_sampler("k_lms_typo")


def test_bad_options():
    with pytest.raises(InputError, match="does not take schedule type"):
        samplers.get_sampler("ddim").make_schedule(CONFIG, 10, "karras")
    with pytest.raises(InputError, match="does not take schedule type"):
        samplers.get_sampler("dpmpp_2m_karras").make_schedule(CONFIG, 10, "exponential")
    with pytest.raises(InputError, match="eta applies to the ddim sampler only"):
        samplers.get_sampler("euler").options_for(0.5)
    with pytest.raises(InputError, match="at most 50 steps"):
        samplers.get_sampler("lcm").make_schedule(CONFIG, 60)


def test_karras_sigmas_formula():
    from sdrt.runtime import schedules

    s = schedules.karras_sigmas(5, 0.1, 10.0)
    assert s[0] == pytest.approx(10.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s) < 0)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_a_config_without_clip_sample_clips_as_diffusers(name):
    """diffusers' DDIM and DDPM default to clip_sample=True where the config has none (one saved from
    a PNDMScheduler, say); the toy model's x0 leaves [-1, 1], so clipping shows."""
    config = {k: v for k, v in CONFIG.items() if k != "clip_sample"}
    _compare(name, config, 5)
