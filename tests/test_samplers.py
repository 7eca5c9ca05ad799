"""Sampler functions + schedules against the diffusers scheduler loops, step by step, on a synthetic model.

No ONNX here: the model is a smooth NumPy function of (x_t, t), so every step of both loops sees the
same model and any difference comes from the schedule or the update rule.
"""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import pytest

from sdrt.errors import InputError
from sdrt.export.sources import SD15_SCHEDULER
from sdrt.runtime import noise, samplers, schedules
from sdrt.runtime.denoiser import Denoiser
from tests.reference import scheduler_for

CONFIG = {k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"}
RTOL = 1e-5
_W = np.random.default_rng(0).standard_normal((4, 4)) * 0.3


def model(x_t: np.ndarray, t: float) -> np.ndarray:
    """Stand-in for a UNet: (B, 4, h, w) -> (B, 4, h, w), depends on x and t."""
    return np.tanh(np.einsum("ij,bjhw->bihw", _W, x_t)) * (1 + t / 1000) + 0.1 * x_t


class _Unet:
    def __call__(self, sample, timestep, context):
        return model(sample.astype(np.float64), float(timestep[0]))


def run_diffusers(name, config, steps, x_init, noise_draws):
    import torch
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea

    sch = scheduler_for(config, name)
    sch.set_timesteps(steps)
    x = torch.from_numpy(x_init) * sch.init_noise_sigma
    states = []
    with mock.patch.object(ea, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise_draws(tuple(shape)))):
        for t in sch.timesteps:
            x_in = sch.scale_model_input(x, t)
            out = torch.from_numpy(model(x_in.numpy(), float(t)))
            x = sch.step(out, t, x).prev_sample
            states.append(x.numpy().copy())
    return states


def run_sdrt(name, config, steps, x_init, noise_draws):
    smp = samplers.get_sampler(name)
    schedule = smp.make_schedule(config, steps)
    denoise = Denoiser(_Unet(), schedule, config["prediction_type"], np.zeros((1, 77, 8)), None, 1.0)
    states = []
    # diffusers' state after step i is x_t (vp) or the k-diffusion state (ve): compare in its terms
    def to_diffusers(i, x):
        sigma = schedule.sigmas[i + 1]
        states.append(x / np.sqrt(1 + sigma**2) if smp.space == "vp" else x)

    x = samplers.initial_state(smp, schedule, config, x_init)
    smp.fn(denoise, x, schedule, noise=noise_draws, callback=to_diffusers)
    return states


CASES = list(itertools.product(["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"],
                               ["leading", "trailing", "linspace"], ["epsilon", "v_prediction"],
                               [1, 2, 3, 10, 25]))


@pytest.mark.parametrize("name,spacing,prediction,steps", CASES)
def test_every_step_matches_diffusers(name, spacing, prediction, steps):
    config = CONFIG | {"timestep_spacing": spacing, "prediction_type": prediction}
    x_init = np.random.default_rng(steps).standard_normal((2, 4, 3, 3))
    ref = run_diffusers(name, config, steps, x_init, noise.ImageNoise([1, 2], noise.SAMPLER))
    ours = run_sdrt(name, config, steps, x_init, noise.ImageNoise([1, 2], noise.SAMPLER))
    assert len(ours) == len(ref) == steps
    for i, (a, b) in enumerate(zip(ours, ref)):
        scale = max(np.abs(b).max(), 1e-3)
        assert np.abs(a - b).max() / scale < RTOL, f"step {i}: {np.abs(a - b).max() / scale:.2e}"


@pytest.mark.parametrize("name", samplers.SAMPLERS)
@pytest.mark.parametrize("strength", [0.0, 0.3, 0.5, 0.75, 1.0])
def test_img2img_start_matches_diffusers(name, strength):
    """The first step that runs and its noise level, as diffusers' get_timesteps + add_noise give them."""
    steps = 10
    sch = scheduler_for(CONFIG, name)
    sch.set_timesteps(steps)
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0)
    schedule = samplers.get_sampler(name).make_schedule(CONFIG, steps).tail(schedules.strength_start(steps, strength))
    assert len(schedule) == len(sch.timesteps[start:])
    if len(schedule):
        np.testing.assert_allclose(schedule.timesteps[0], float(sch.timesteps[start]), rtol=1e-6)
        # add_noise at that timestep, in the sampler's units: x0 + sigma * noise
        import torch
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(start)
        one = sch.add_noise(torch.zeros(1), torch.ones(1), sch.timesteps[start:start + 1])
        alpha = 1 / np.sqrt(1 + schedule.sigmas[0] ** 2) if samplers.get_sampler(name).space == "vp" else 1
        np.testing.assert_allclose(float(one), schedule.sigmas[0] * alpha, rtol=1e-5)


def test_sampler_names():
    assert samplers.get_sampler("DPM++ 2M Karras").name == "dpmpp_2m_karras"
    assert samplers.get_sampler("euler a").name == "euler_a"
    with pytest.raises(InputError, match="choose one of: ddim, euler"):
        samplers.get_sampler("k_lms_typo")


def test_karras_sigmas_formula():
    s = schedules.karras_sigmas(5, 0.1, 10.0)
    assert s[0] == pytest.approx(10.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s) < 0)
