"""CycleDiffusion (Wu & De la Torre 2022): text-guided image-to-image from a source prompt that
describes the init image, as diffusers' CycleDiffusionPipeline.

Two DDIM trajectories start from the init image noised to the first level: a source one, sampled
from the posterior q(x_{t-1} | x_t, x_0 = the image's latents), and the target one. Each step's
target noise is the noise that carries the source state to its posterior sample under the source
prompt's DDIM step ("DPM-Encoder"), so the target keeps what the source prompt describes of the
image. In sdrt's state (x_t / sqrt(alpha_bar), with DDIM's split of a step into sigma_down and
sigma_up, sdrt.runtime.samplers.ancestral_step), per step i:

    source' = x0_img + down * (source - x0_img) / sigma_i + up * z      (posterior sample)
    z'      = (source' - (x0_src + down * eps_src)) / up                  (the noise it implies)
    target' = x0_tgt + down * eps_tgt + up * z'

Where the step lands at t <= 0, the posterior sample is the image's latents themselves (no draw).
Equal to diffusers on epsilon models (tests/test_parity.py). On v-prediction models diffusers' pipeline
reads the UNet's output as noise when it derives z' (its compute_noise); sdrt takes eps from the
model's own parameterization, so the two differ there.
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime.samplers import _clip, ancestral_step

DEFAULT_ETA = 0.1  # diffusers' CycleDiffusionPipeline default


def sample_cycle(denoise, x: np.ndarray, clean: np.ndarray, schedule, *, eta: float, noise, callback):
    """DENOISE sees [source; target] states (2N rows, the source prompt's conditioning first); x:
    the start state (both trajectories); clean: the init image's latents. Returns the target."""
    s, prev = schedule.sigmas, schedule.sigmas_prev
    n = len(x)
    src = x.copy()
    for i in range(len(schedule)):
        both = np.concatenate([src, x])
        x0 = denoise(both, s[i])
        eps = (both - x0) / s[i]
        x0 = _clip(x0, schedule)
        down, up = ancestral_step(s[i], prev[i], eta)
        if schedule.timesteps[i] - schedule.params["step_ratio"] <= 0:
            src_next = clean * np.sqrt(1 + prev[i] ** 2)  # the image's latents at that level, undrawn
        else:
            src_next = clean + down * (src - clean) / s[i] + up * noise(src.shape)
        x_next = x0[n:] + down * eps[n:]
        if up:
            x_next = x_next + (src_next - (x0[:n] + down * eps[:n]))
        if prev[i] != s[i + 1]:  # x_t = sqrt(alpha_bar) * state, so rescale between levels
            scale = np.sqrt((1 + s[i + 1] ** 2) / (1 + prev[i] ** 2))
            src_next, x_next = src_next * scale, x_next * scale
        src = src_next
        denoise.last_x0 = x0[n:]  # the target's estimate, for callbacks and previews
        x = callback(i, x_next)
    return x
