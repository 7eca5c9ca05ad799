"""Inpainting (a 9-channel UNet: the image's masked latents and the mask beside the noisy latents)
against diffusers' StableDiffusionInpaintPipeline on the same tiny random-weight checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.errors import InputError
from sdrt.runtime import images
from tests import reference
from tests.conftest import SIZES
from tests.test_parity import PROMPT, STEPS, TOL, _init_image

W, H = SIZES["eps"]


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory):
    """(checkpoint dir, engine dir) of the tiny model with an inpainting UNet (in_channels 9)."""
    from diffusers import StableDiffusionInpaintPipeline

    from tests.conftest import tiny_variant

    return tiny_variant(tmp_path_factory.mktemp("inpaint"), StableDiffusionInpaintPipeline, 9, 3,
                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _mask(w, h):
    """A soft-edged blob at twice the image size: resizing and binarizing both matter."""
    yy, xx = np.mgrid[0 : 2 * h, 0 : 2 * w]
    d = np.hypot((xx - 1.2 * w) / w, (yy - 0.8 * h) / h)
    return Image.fromarray((np.clip(1.6 - 2.2 * d, 0, 1) * 255).astype(np.uint8))


CASES = [("euler_a", 1.0, 1, 7.5, None), ("dpmpp_2m_karras", 0.7, 2, 7.5, "blurry"), ("ddim", 0.5, 1, 1.0, None),
         ("ddim", 1.0, 1, 7.5, None)]


@pytest.mark.parametrize("unet", ["9-channel", "4-channel"])
@pytest.mark.parametrize("sampler,strength,batch,guidance,negative", CASES)
def test_inpaint_matches_diffusers(inpaint, checkpoints, engines, unet, sampler, strength, batch, guidance, negative):
    """9-channel: an inpainting model. 4-channel: an ordinary one, whose latents outside the mask are
    replaced after every step by the image's, noised to the next level (diffusers' legacy path)."""
    ckpt, engines = inpaint if unet == "9-channel" else (checkpoints["eps"], engines["eps"])
    image, mask = _init_image(W + 16, H + 8), _mask(W, H)  # the image is resized too
    seeds = [5 + i for i in range(batch)]
    args = dict(prompt=PROMPT, negative_prompt=negative, steps=STEPS, sampler=sampler,
                guidance_scale=guidance, strength=strength, width=W, height=H)
    with sdrt.Pipeline.load(engines) as pipe:  # seeds alone: diffusers' draws, in its order
        ours = pipe(**args, image=image, mask=mask, num_images=batch, seed=5).pixels
    ref = reference.inpaint(ckpt, **args, image=image, mask=mask, num_images=batch, seeds=seeds)
    assert ours.shape == ref.shape == (batch, H, W, 3)
    err = np.abs(ours - ref).max()
    assert err < TOL, f"max abs pixel error {err:.2e}"


def test_mask_is_binarized_and_resized_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    mask = _mask(W, H)
    theirs = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                               do_convert_grayscale=True).preprocess(mask, height=H, width=W).numpy()
    ours = images.to_mask(mask, W, H)
    assert ours.shape == (1, 1, H, W) and np.array_equal(ours, theirs)
    assert 0 < ours.mean() < 1  # both kept and repainted pixels
    arr = np.asarray(mask.resize((W, H), Image.LANCZOS), dtype=np.float32) / 255
    assert np.array_equal(images.to_mask(arr, W, H), ours)  # an array of the right size: binarized only
    assert np.array_equal(images.to_mask(arr[..., None], W, H), ours)
    with pytest.raises(InputError, match=r"mask array must be \(H, W\)"):
        images.to_mask(np.zeros((2, H, W)), W, H)


def test_inpainting_inputs_are_checked(inpaint, engines):
    _, inpaint_engines = inpaint
    image, mask = _init_image(W, H), _mask(W, H)
    with sdrt.Pipeline.load(inpaint_engines) as pipe:
        with pytest.raises(InputError, match="is an inpainting model: give it an init image and a mask"):
            pipe(PROMPT, steps=2, width=W, height=H)
        with pytest.raises(InputError, match="is an inpainting model"):
            pipe(PROMPT, steps=2, image=image)
        out = pipe(PROMPT, steps=2, image=image, mask=mask, seed=1)  # size from the image
        assert out.pixels.shape == (1, H, W, 3) and "Denoising strength: 0.8" in out.parameters[0]
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        with pytest.raises(InputError, match=r"a mask needs an init image \(--init-image\)"):
            pipe(PROMPT, steps=2, mask=mask)


def test_inpaint_cli(inpaint, tmp_path, capsys):
    from sdrt.cli import main

    _, engines = inpaint
    _init_image(W, H).save(tmp_path / "in.png")
    _mask(W, H).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--engines", str(engines), "--init-image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--steps", "2", "--seed", "3", "-o", str(out), "-q"]) == 0
    assert Image.open(out).size == (W, H)
    assert main(["generate", PROMPT, "--engines", str(engines), "--init-image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "nope.png"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read image" in err[0] and "nope.png" in err[0]


def test_single_file_inpainting_checkpoint(inpaint, tmp_path):
    """The inpainting checkpoint as an LDM-layout .safetensors exports the same weights as its folder."""
    import json

    from diffusers import StableDiffusionInpaintPipeline
    from safetensors.torch import save_file

    from sdrt.export import export
    from tests.ldm_checkpoint import to_ldm

    ckpt, engines = inpaint
    save_file(to_ldm(StableDiffusionInpaintPipeline.from_pretrained(ckpt, safety_checker=None)),
              tmp_path / "inpaint.safetensors")
    m = export(str(tmp_path / "inpaint.safetensors"), tmp_path / "out", config=ckpt, progress=False, optimize=False)
    want = json.loads((engines / "manifest.json").read_text())
    assert m.pipeline == "inpaint" and m.dims.unet_in_channels == 9
    assert m.source["sha256"] == want["source"]["sha256"]


def test_bench_refuses_an_inpainting_model(inpaint, capsys):
    from sdrt.cli import main

    _, engines = inpaint
    assert main(["bench", str(engines), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a model for inpaint; sdrt bench measures txt2img models" in err[0]
