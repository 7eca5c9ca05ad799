"""sdrt export + sdrt.Pipeline == diffusers' pipelines on the same weights and noise (pixels, 2e-3 max abs)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.runtime import noise, samplers
from tests import reference
from tests.conftest import CHECKPOINTS, SIZES

TOL = 2e-3  # max abs on pixels in [0, 1]
STEPS = 4
PROMPT = "a photo of an astronaut riding a horse on mars"


def all_pairs(*factors) -> list[tuple]:
    """A covering array of strength 2: every pair of values of any two factors appears in some row.
    Greedy (each row the product's row that covers most uncovered pairs), deterministic. Interactions
    between options come in pairs (guidance x batch, clip skip x negative prompt ...); the full
    product of six options would be 144 rows for the same pairs."""
    rows = list(itertools.product(*factors))
    todo = {(i, a, j, b) for i, j in itertools.combinations(range(len(factors)), 2)
            for a in factors[i] for b in factors[j]}
    chosen = []
    while todo:
        best = max(rows, key=functools.partial(_pairs_covered, todo))
        chosen.append(best)
        todo -= _pairs(best)
    return chosen


def _pairs(row) -> set:
    return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(row)), 2)}


def _pairs_covered(todo: set, row) -> int:
    return len(_pairs(row) & todo)


MATRIX = all_pairs(CHECKPOINTS, ("ddim", "euler_a", "dpmpp_2m_karras"), (None, "blurry, low quality"), (1, 3),
                   (1.0, 7.5), (1, 2))
IDS = [f"{c}-{s}-{'neg' if n else 'noneg'}-b{b}-g{g}-skip{k}" for c, s, n, b, g, k in MATRIX]


@functools.cache
def _pipe(path):
    return sdrt.Pipeline.load(path)


def _latents(kind, pipe, batch, seed=7):
    w, h = SIZES[kind]
    f = pipe.scale_factor
    return noise.randn([seed + i for i in range(batch)], noise.INITIAL, (batch, 4, h // f, w // f))


@pytest.mark.parametrize("kind,sampler,negative,batch,guidance,clip_skip", MATRIX, ids=IDS)
def test_txt2img_matches_diffusers(engines, checkpoints, kind, sampler, negative, batch, guidance, clip_skip):
    """From seeds alone: torch-cpu noise (the default) against diffusers' generators."""
    pipe = _pipe(engines[kind])
    w, h = SIZES[kind]
    args = dict(prompt=PROMPT, negative_prompt=negative, steps=STEPS, sampler=sampler,
                guidance_scale=guidance, width=w, height=h, clip_skip=clip_skip)
    ours = pipe(**args, num_images=batch, seed=7).pixels
    ref = reference.txt2img(checkpoints[kind], **args, num_images=batch, seeds=[7 + i for i in range(batch)])
    assert ours.shape == ref.shape == (batch, h, w, 3)
    err = np.abs(ours - ref).max()
    assert err < TOL, f"max abs pixel error {err:.2e}"


def _init_image(w, h):
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 3.0)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.mark.parametrize("kind,sampler,negative,batch,guidance,clip_skip", MATRIX, ids=IDS)
def test_img2img_matches_diffusers(engines, checkpoints, kind, sampler, negative, batch, guidance, clip_skip):
    """From seeds alone (the init image's posterior sample, then the noise, as diffusers draws them)."""
    pipe = _pipe(engines[kind])
    w, h = SIZES[kind]
    image = _init_image(w, h)
    args = dict(prompt=PROMPT, negative_prompt=negative, steps=STEPS, sampler=sampler,
                guidance_scale=guidance, clip_skip=clip_skip, strength=0.6)
    ours = pipe(**args, image=image, num_images=batch, seed=11).pixels
    ref = reference.img2img(checkpoints[kind], **args, image=image, num_images=batch,
                            seeds=[11 + i for i in range(batch)])
    assert ours.shape == ref.shape == (batch, h, w, 3)
    err = np.abs(ours - ref).max()
    assert err < TOL, f"max abs pixel error {err:.2e}"


# DPM++ SDE: diffusers draws its noise from torchsde's Brownian tree, seeded apart from the
# generator (its `noise_sampler_seed`), which no noise source reproduces: tested with sdrt's draws
BROWNIAN = {"dpmpp_sde", "dpmpp_sde_karras"}


@pytest.mark.parametrize("kind", ["eps", "vpred"])
@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_every_sampler_end_to_end(engines, checkpoints, kind, sampler):
    """Every sampler through sdrt.Pipeline equals StableDiffusionPipeline with the matching diffusers
    scheduler from the same seeds alone (noise="torch-cpu", the default; batch 3 on the epsilon model,
    1 on the v-prediction one); DPM++ SDE with diffusers handed sdrt's noise draws."""
    pipe = _pipe(engines[kind])
    w, h = SIZES[kind]
    batch = 3 if kind == "eps" else 1
    seeds = [5 + i for i in range(batch)]
    args = dict(prompt=PROMPT, negative_prompt="ugly", steps=STEPS + 1, sampler=sampler, guidance_scale=7.5,
                width=w, height=h, clip_skip=1)
    if sampler in BROWNIAN:
        latents = _latents(kind, pipe, batch, seed=5)
        ours = pipe(**args, num_images=batch, seed=5, latents=latents, noise="sdrt").pixels
        ref = reference.txt2img(checkpoints[kind], **args, num_images=batch, latents=latents,
                                draws=noise.Noise("sdrt", seeds).sampler())
    else:
        ours = pipe(**args, num_images=batch, seed=5).pixels
        ref = reference.txt2img(checkpoints[kind], **args, num_images=batch, seeds=seeds)
    err = np.abs(ours - ref).max()
    assert err < TOL, f"max abs pixel error {err:.2e}"


@pytest.mark.parametrize("options", [{"sampler": "ddim", "eta": 0.7}, {"sampler": "euler", "schedule_type": "karras"},
                                     {"sampler": "dpmpp_2m", "schedule_type": "exponential"},
                                     {"sampler": "unipc", "schedule_type": "sgm_uniform"}])
def test_sampler_options_end_to_end(engines, checkpoints, options):
    pipe = _pipe(engines["eps"])
    w, h = SIZES["eps"]
    latents = _latents("eps", pipe, 1)
    args = dict(prompt=PROMPT, negative_prompt=None, steps=STEPS, guidance_scale=7.5, width=w, height=h, clip_skip=1)
    ours = pipe(**args, **options, num_images=1, seed=5, latents=latents, noise="sdrt").pixels
    ref = reference.txt2img(checkpoints["eps"], **args, **options, num_images=1, latents=latents,
                            draws=noise.Noise("sdrt", [5]).sampler())
    assert np.abs(ours - ref).max() < TOL


@pytest.mark.parametrize("kind,eta,guidance,source_guidance", [("eps", 0.1, 7.5, 1.0), ("eps", 0.0, 1.0, 1.0),
                                                                ("eps", 0.5, 5.0, 2.0)])
def test_cycle_diffusion_matches_diffusers(engines, checkpoints, kind, eta, guidance, source_guidance):
    """A source prompt (CycleDiffusion) equals diffusers' CycleDiffusionPipeline from the same seed.
    Epsilon models only: diffusers' pipeline reads the UNet's output as noise when it derives the
    source noise (compute_noise), which a v-prediction model's is not; sdrt uses the model's own
    parameterization there (sdrt.runtime.cycle)."""
    pipe = _pipe(engines[kind])
    w, h = SIZES[kind]
    image = _init_image(w, h)
    args = dict(prompt="a blue horse in the snow", source_prompt=PROMPT, strength=0.8, steps=STEPS + 2,
                guidance_scale=guidance, source_guidance_scale=source_guidance, eta=eta)
    ours = pipe(**args, image=image, sampler="ddim", seed=3).pixels
    ref = reference.cycle(checkpoints[kind], **args, image=image, seed=3)
    assert ours.shape == ref.shape == (1, h, w, 3)
    err = np.abs(ours - ref).max()
    assert err < TOL, f"max abs pixel error {err:.2e}"


@pytest.mark.parametrize("args,words", [
    (dict(sampler="ddim"), "needs an init image"),
    (dict(sampler="euler", image="IMG"), "runs DDIM, not euler"),
    (dict(sampler="ddim", image="IMG", mask="IMG"), "no mask"),
])
def test_cycle_diffusion_refuses_what_it_cannot_take(engines, args, words):
    from sdrt.errors import InputError

    w, h = SIZES["eps"]
    args = {k: (_init_image(w, h) if v == "IMG" else v) for k, v in args.items()}
    with pytest.raises(InputError, match=words):
        _pipe(engines["eps"])("a horse", source_prompt="a cat", steps=2, **args)


def test_exports_take_torch_exports_fast_capture(engines, checkpoints, tmp_path):
    """torch.export's non-strict capture takes every component of the SD 2 layout (no fall back to
    torch.onnx's slower strict one, onnx_export._capture), and the graphs name their axes as the spec
    does, as the fall back's did."""
    import onnx
    import torch

    from sdrt.components import Dim
    from sdrt.export import onnx_export, sources
    from sdrt.manifest import Manifest

    pipe = sources.load_source(str(checkpoints["vpred"]), tmp_path).pipe
    manifest = Manifest.read(engines["vpred"])
    for name, entry in manifest.components.items():
        spec = entry.spec
        with torch.no_grad():
            captured = onnx_export._capture(name, onnx_export.wrap(name, pipe), onnx_export.example_inputs(spec), spec)
        assert isinstance(captured, torch.export.ExportedProgram), name
        graph = onnx.load(engines["vpred"] / entry.files[0], load_external_data=False).graph
        for t, value in zip(spec.inputs, graph.input):
            named = [d.name for d in t.shape if isinstance(d, Dim)]  # B, h, w, c ("77*c": the c)
            params = [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
            assert [p.split("*")[-1] for p in params] == named, (name, t.name, params)
