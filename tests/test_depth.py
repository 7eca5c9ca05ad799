"""depth2img (a 5-channel UNet: latents and a depth map) against diffusers' StableDiffusionDepth2ImgPipeline
on a tiny seeded checkpoint with a tiny DPT-Hybrid depth estimator, and the NumPy parts of the depth
condition against transformers' image processor and torch's bicubic interpolation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.errors import InputError
from sdrt.runtime import depth
from tests import reference
from tests.conftest import SIZES
from tests.test_parity import PROMPT, STEPS, TOL, _init_image

W, H = SIZES["eps"]
DEPTH_PX = 64  # the tiny DPT's input side (its processor resizes every image to it)


def tiny_dpt():
    """DPT-Hybrid (a BiT backbone under a ViT, as Intel/dpt-hybrid-midas) scaled down, seeded."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(4)
    backbone = {"global_padding": "same", "layer_type": "bottleneck", "depths": [1, 1, 1],
                "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
                "hidden_sizes": [16, 32, 64, 128], "num_groups": 2}
    config = DPTConfig(image_size=DEPTH_PX, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=4,
                       backbone_out_indices=(0, 1, 2, 3), num_attention_heads=4, intermediate_size=37,
                       is_hybrid=True, backbone_config=backbone, backbone_featmap_shape=[1, 64, 4, 4],
                       neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32, reassemble_factors=[4, 2, 1, 0.5])
    return DPTForDepthEstimation(config).eval(), DPTImageProcessor(size={"height": DEPTH_PX, "width": DEPTH_PX})


@pytest.fixture(scope="module")
def depth2img(tmp_path_factory):
    """(checkpoint dir, engine dir) of the tiny model with a depth UNet (in_channels 5) and a tiny DPT."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    from tests.conftest import tiny_variant

    estimator, processor = tiny_dpt()
    return tiny_variant(tmp_path_factory.mktemp("depth"), StableDiffusionDepth2ImgPipeline, 5, 5,
                        depth_estimator=estimator, feature_extractor=processor)


def _depth_map(w, h):
    """A user's depth map: a lit sphere-like bump, nearer (brighter) at the centre, 16-bit."""
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.clip(1.2 - np.hypot((xx - 0.6 * w) / w, (yy - 0.4 * h) / h) * 2, 0, 1)
    return (d * 60000).astype(np.uint16)


CASES = [("ddim", 0.8, 1, 7.5, None), ("euler_a", 0.6, 2, 7.5, "blurry"), ("dpmpp_2m_karras", 1.0, 1, 1.0, None)]


@pytest.mark.parametrize("given", ["estimator", "depth map"])
@pytest.mark.parametrize("sampler,strength,batch,guidance,negative", CASES)
def test_depth2img_matches_diffusers(depth2img, given, sampler, strength, batch, guidance, negative):
    """From seeds alone: the posterior sample, then the noise, as diffusers draws them; the depth from
    the exported estimator (the processor on the image as given) or from the user's 16-bit map."""
    ckpt, engines = depth2img
    image = _init_image(W, H)
    user = _depth_map(2 * W + 3, 2 * H - 5) if given == "depth map" else None  # resized to the latents
    args = dict(prompt=PROMPT, negative_prompt=negative, steps=STEPS, sampler=sampler, guidance_scale=guidance,
                strength=strength)
    with sdrt.Pipeline.load(engines) as pipe:
        ours = pipe(**args, image=image, num_images=batch, seed=11,
                    depth_map=None if user is None else Image.fromarray(user)).pixels
    ref = reference.depth2img(ckpt, **args, image=image, num_images=batch, seeds=[11 + i for i in range(batch)],
                              depth_map=None if user is None else user.astype(np.float32)[None])
    assert ours.shape == ref.shape == (batch, H, W, 3)
    err = np.abs(ours - ref).max()
    assert err < TOL, f"max abs pixel error {err:.2e}"


def test_the_depth_map_changes_the_image(depth2img):
    """The depth channel is read: two depth maps, two images (same seed)."""
    _, engines = depth2img
    a = _depth_map(W, H)
    with sdrt.Pipeline.load(engines) as pipe:
        one = pipe(PROMPT, image=_init_image(W, H), steps=2, seed=1, depth_map=a).pixels
        two = pipe(PROMPT, image=_init_image(W, H), steps=2, seed=1, depth_map=a.T[:H, :W].copy()).pixels
    assert np.abs(one - two).max() > 1e-2


def test_processor_equals_transformers():
    """The estimator's input: transformers' DPTImageProcessor (PIL backend) on odd, non-square images."""
    _, processor = tiny_dpt()
    ours = depth.Processor(DEPTH_PX, DEPTH_PX)
    rng = np.random.default_rng(0)
    for w, h in ((37, 53), (200, 91)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = processor(images=[image], return_tensors="np").pixel_values
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == want.shape == (1, 3, DEPTH_PX, DEPTH_PX)
        assert np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("src,dst", [((64, 64), (6, 9)), ((5, 7), (13, 4)), ((48, 80), (48, 80)),
                                     ((384, 384), (64, 96))])
def test_resize_bicubic_equals_torch(src, dst):
    """torch.nn.functional.interpolate(bicubic, align_corners=False), down and up, edges included;
    torch computes in float32, so equal to its rounding."""
    import torch

    x = np.random.default_rng(1).standard_normal((2, *src)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=dst, mode="bicubic",
                                           align_corners=False)[:, 0].numpy()
    assert np.abs(depth.resize_bicubic(x, *dst) - want).max() < 2e-5


def test_condition_is_normalized_per_image():
    d = np.stack([np.arange(12.0).reshape(3, 4), 5 + 2 * np.arange(12.0).reshape(3, 4)])
    c = depth.normalize(d)
    assert c.min(axis=(1, 2)).tolist() == [-1, -1] and c.max(axis=(1, 2)).tolist() == [1, 1]
    np.testing.assert_allclose(c[0], c[1])
    with pytest.raises(InputError, match="constant"):
        depth.normalize(np.ones((1, 4, 4)))


def test_manifest_records_the_estimator(depth2img):
    _, engines = depth2img
    m = json.loads((engines / "manifest.json").read_text())
    assert m["pipeline"] == "depth2img" and m["unet_in_channels"] == 5
    assert m["depth_processor"]["height"] == m["depth_processor"]["width"] == DEPTH_PX
    spec = m["components"]["depth_estimator"]
    assert spec["inputs"][0]["shape"] == ["B", 3, DEPTH_PX, DEPTH_PX]
    assert spec["outputs"][0]["name"] == "predicted_depth" and spec["parity"]["max_abs_error"] < 1e-4


def test_bad_depth_input_is_one_clear_line(depth2img, engines, tmp_path, capsys):
    from sdrt.cli import main

    _, depth_engines = depth2img
    image = tmp_path / "in.png"
    _init_image(W, H).save(image)
    color = tmp_path / "color.png"
    _init_image(W, H).save(color)
    flat = tmp_path / "flat.png"
    Image.new("L", (W, H), 128).save(flat)
    (tmp_path / "text.png").write_text("not an image")
    ours = ["--engines", str(depth_engines), "x"]
    with_image = [*ours, "--init-image", str(image)]
    cases = [
        (ours, "depth2img model: give it an init image"),
        ([*with_image, "--depth-map", str(color)], "a color image"),
        ([*with_image, "--depth-map", str(flat)], "constant"),
        ([*with_image, "--depth-map", str(tmp_path / "text.png")], "not an image"),
        ([*with_image, "--mask", str(flat)], "and no mask"),
        ([*with_image, "--source-prompt", "y", "--sampler", "ddim"], "no inpainting or depth2img model"),
        (["--engines", str(engines["eps"]), "x", "--init-image", str(image), "--depth-map", str(flat)],
         "depth maps are for depth2img models"),
    ]
    for args, words in cases:
        assert main(["generate", *args, "--steps", "1", "-o", str(tmp_path / "out.png"), "-q"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
    assert not (tmp_path / "out.png").exists()


def test_depth2img_cli(depth2img, tmp_path):
    """`sdrt generate --init-image --depth-map` writes the API's image."""
    from sdrt.cli import main

    _, engines = depth2img
    _init_image(W, H).save(tmp_path / "in.png")
    Image.fromarray(_depth_map(W, H)).save(tmp_path / "depth.png")
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--engines", str(engines), "--init-image", str(tmp_path / "in.png"), "--depth-map",
                 str(tmp_path / "depth.png"), "--steps", "2", "--seed", "3", "-o", str(out), "-q"]) == 0
    with sdrt.Pipeline.load(engines) as pipe:
        want = pipe(PROMPT, image=_init_image(W, H), depth_map=_depth_map(W, H), steps=2, seed=3).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_single_file_depth_checkpoint(depth2img, tmp_path):
    """A single-file depth checkpoint (LDM layout) exports the folder's weights; with --config naming
    the diffusers folder its estimator comes along; without one (single files have none), generation
    asks for a depth map, clearly."""
    from diffusers import StableDiffusionDepth2ImgPipeline
    from safetensors.torch import save_file

    from sdrt.export import export
    from tests.ldm_checkpoint import to_ldm

    ckpt, engines = depth2img
    single = tmp_path / "depth.safetensors"
    save_file(to_ldm(StableDiffusionDepth2ImgPipeline.from_pretrained(ckpt)), single)
    m = export(str(single), tmp_path / "full", config=ckpt, progress=False, optimize=False)
    want = json.loads((engines / "manifest.json").read_text())
    assert m.pipeline == "depth2img" and "depth_estimator" in m.components
    assert m.source["sha256"] == want["source"]["sha256"]
    configs = tmp_path / "configs"  # the folder's configs without the estimator
    shutil.copytree(ckpt, configs, ignore=shutil.ignore_patterns("depth_estimator", "feature_extractor"))
    index = json.loads((configs / "model_index.json").read_text())
    (configs / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionPipeline",
                                                                  "depth_estimator": [None, None],
                                                                  "feature_extractor": [None, None]}))
    m = export(str(single), tmp_path / "bare", config=configs, progress=False, optimize=False)
    assert m.pipeline == "depth2img" and "depth_estimator" not in m.components and m.depth_processor is None
    with sdrt.Pipeline.load(tmp_path / "bare") as pipe:
        with pytest.raises(InputError, match="without a depth estimator .* give --depth-map"):
            pipe(PROMPT, image=_init_image(W, H), steps=1)
        assert pipe(PROMPT, image=_init_image(W, H), steps=1, depth_map=_depth_map(W, H)).pixels.shape == (1, H, W, 3)


def test_single_file_depth_layout_is_detected(tmp_path):
    """diffusers calls a 5-channel SD 2 UNet "v2"; sdrt tells it apart (its own SD 2 depth configs)."""
    import torch
    from safetensors.torch import save_file

    from sdrt.export import single_file

    keys = {single_file.CONV_IN: torch.zeros(320, 5, 3, 3),
            "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)}
    save_file(keys, tmp_path / "512-depth-ema.safetensors")
    assert single_file._model_type(tmp_path / "512-depth-ema.safetensors") == "depth_v2"
    save_file(keys | {single_file.CONV_IN: torch.zeros(320, 4, 3, 3)}, tmp_path / "v2.safetensors")
    assert single_file._model_type(tmp_path / "v2.safetensors") == "v2"


def test_server_takes_a_depth_map(depth2img):
    """POST /generate with base64 init image and 16-bit depth map: the API's image; a color depth map is
    a 400 naming the field's problem."""
    import base64
    import io

    from sdrt.serve import ServeConfig
    from tests.serving import LiveServer, call

    def png(image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    _, engines = depth2img
    user = Image.fromarray(_depth_map(W, H))
    server = LiveServer(ServeConfig(engines, max_images=2, max_queue=2))
    try:
        body = {"prompt": PROMPT, "steps": 2, "seed": 8, "image": png(_init_image(W, H)), "depth_map": png(user)}
        status, out, _ = call(server.url, "/generate", body)
        assert status == 200, out
        with sdrt.Pipeline.load(engines) as pipe:
            want = pipe(PROMPT, steps=2, seed=8, image=_init_image(W, H), depth_map=_depth_map(W, H)).images[0]
        got = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
        status, out, _ = call(server.url, "/generate", body | {"depth_map": png(_init_image(W, H))})
        assert status == 400 and "a color image" in json.dumps(out)
    finally:
        server.stop()
