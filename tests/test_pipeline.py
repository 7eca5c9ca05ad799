"""Pipeline behaviour beyond parity: seeds, batching, guidance, callbacks, warnings, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.errors import InputError, SdrtError
from sdrt.runtime import samplers

ARGS = dict(steps=3, width=64, height=48)


@pytest.fixture(scope="module")
def pipe(engines):
    with sdrt.Pipeline.load(engines["eps"]) as p:
        yield p


def _unet_batches(pipe, monkeypatch):
    unet = pipe.engine("unet")
    seen = []
    real = unet._run

    def spy(feeds):
        seen.append(feeds["sample"].shape[0])
        return real(feeds)

    monkeypatch.setattr(unet, "_run", spy)
    return seen


@pytest.mark.parametrize("sampler,eta", [(name, None) for name, s in samplers.SAMPLERS.items()
                                         if not s.deterministic] + [("ddim", 0.8)])
def test_stochastic_samplers_are_reproducible(pipe, sampler, eta):
    """Same seed: identical images; another seed: different ones (latents fixed, so only the
    sampler's own noise differs)."""
    latents = np.random.default_rng(0).standard_normal((1, 4, 6, 8))
    a = pipe("a dog", seed=10, sampler=sampler, eta=eta, latents=latents, **ARGS).pixels
    b = pipe("a dog", seed=10, sampler=sampler, eta=eta, latents=latents, **ARGS).pixels
    c = pipe("a dog", seed=11, sampler=sampler, eta=eta, latents=latents, **ARGS).pixels
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_image_i_uses_seed_plus_i_whatever_the_batch(pipe):
    batch = pipe("a dog", seed=20, num_images=3, sampler="euler_a", **ARGS)
    assert batch.seeds == [20, 21, 22]
    single = pipe("a dog", seed=21, sampler="euler_a", **ARGS)
    np.testing.assert_allclose(batch.pixels[1], single.pixels[0], atol=1e-4)
    assert "Seed: 21" in batch.parameters[1]


def test_random_seed_is_reported(pipe):
    r = pipe("a dog", **ARGS)
    again = pipe("a dog", seed=r.seeds[0], **ARGS)
    np.testing.assert_array_equal(r.pixels, again.pixels)


@pytest.mark.parametrize("guidance,per_call", [(7.5, 4), (1.0, 2), (0.5, 2)])
def test_guidance_le_1_runs_conditional_pass_only(pipe, monkeypatch, guidance, per_call):
    seen = _unet_batches(pipe, monkeypatch)
    pipe("a dog", num_images=2, guidance_scale=guidance, **ARGS)
    assert seen == [per_call] * ARGS["steps"]


def test_callback_and_img2img_step_count(pipe):
    calls = []
    pipe("a dog", steps=5, width=64, height=48, callback=lambda i, n, x, x0: calls.append((i, n, x.shape)))
    assert calls == [(i, 5, (1, 4, 6, 8)) for i in range(5)]
    calls.clear()
    init = Image.new("RGB", (64, 48), "blue")
    r = pipe("a dog", steps=10, image=init, strength=0.35, callback=lambda i, n, x, x0: calls.append(n))
    assert calls == [3] * 3  # int(10 * 0.35) steps run, as diffusers
    assert r.pixels.shape == (1, 48, 64, 3) and "Denoising strength: 0.35" in r.parameters[0]


def test_callback_gets_the_denoised_estimate(pipe):
    """`denoised` is the step's x0: Euler's last step lands on it exactly, earlier ones do not, and
    decoding the last one gives the image."""
    seen = []
    r = pipe("a dog", steps=4, width=64, height=48, sampler="euler", seed=3,
             callback=lambda i, n, x, x0: seen.append((x.copy(), x0.copy())))
    assert len(seen) == 4
    np.testing.assert_allclose(seen[-1][0], seen[-1][1], rtol=0, atol=1e-12)
    assert np.abs(seen[0][0] - seen[0][1]).max() > 1e-3
    np.testing.assert_allclose(pipe.decode(seen[-1][1]), r.pixels, atol=1e-6)


def test_text_embeddings_are_cached_per_prompt_and_clip_skip(pipe, monkeypatch):
    """A prompt seen before costs no text-encoder call and gives the same rows; the cache keeps the
    most recent EMBEDDING_CACHE prompts."""
    from sdrt.runtime import pipeline as pipeline_module

    pipe._embeddings.clear()
    engine = pipe.engine("text_encoder")
    calls = []
    real = engine._run
    monkeypatch.setattr(engine, "_run", lambda feeds: calls.append(feeds["input_ids"].shape[0]) or real(feeds))
    first = pipe.encode_prompts(["a cat", "a dog"], 1)
    again = pipe.encode_prompts(["a dog", "a cat", "a cat"], 1)
    assert calls == [2] and np.array_equal(again, first[[1, 0, 0]])
    pipe.encode_prompts(["a dog", "a bird"], 2)  # another clip skip: another embedding
    assert calls == [2, 2]
    monkeypatch.setattr(pipeline_module, "EMBEDDING_CACHE", 3)
    pipe.encode_prompts(["a fish"], 1)
    assert len(pipe._embeddings) == 3 and (tuple(pipe.tokenizer(["a cat"]).ids[0]), 1) not in pipe._embeddings


@pytest.mark.parametrize("img2img", [False, True])
def test_memory_is_released_between_phases_not_between_steps(pipe, monkeypatch, img2img):
    """CPU sessions keep their arena from call to call (a UNet step re-faulting its pages after a
    shrink was 13% slower); the pipeline hands it back between phases."""
    from sdrt.runtime import pipeline as pipeline_module

    events = []
    for name in ("text_encoder", "vae_encoder", "unet", "vae_decoder"):
        engine = pipe.engine(name)
        real = engine._run
        monkeypatch.setattr(engine, "_run", lambda feeds, real=real, name=name: events.append(name) or real(feeds))
    monkeypatch.setattr(pipeline_module, "release_free_memory", lambda: events.append("release"))
    pipe._embeddings.clear()  # earlier tests' prompts
    image = Image.new("RGB", (64, 48), "blue") if img2img else None
    pipe("a dog", steps=4, width=64, height=48, image=image, strength=1.0)
    phases = ["text_encoder", "release"] + (["vae_encoder", "release"] if img2img else [])  # one call: both prompts
    assert events == phases + ["unet"] * 4 + ["release", "vae_decoder", "release"]


def test_release_shrinks_the_shared_arena(engines, monkeypatch):
    """Every CPU session allocates from the one shared arena, and a release runs the no-op session
    that asks ONNX Runtime to shrink it (what that hands back is measured in docs/kernels.md, "Memory")."""
    import onnxruntime as ort

    from sdrt.runtime.backends import MEMORY

    shrinks = []
    real_run = ort.InferenceSession.run

    def run(self, outputs, feeds, run_options=None):
        if run_options is not None and "x" in feeds and feeds["x"].shape == (1,):
            shrinks.append(run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage"))
        return real_run(self, outputs, feeds, run_options)

    with sdrt.Pipeline.load(engines["eps"]) as p:
        p.engine("unet")
        assert "cpu" in MEMORY.shared
        monkeypatch.setattr(ort.InferenceSession, "run", run)
        MEMORY.release()
    assert shrinks == ["cpu:0"]


def test_noop_model_is_what_onnx_builds():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from sdrt.runtime.backends.memory import NOOP_MODEL

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "release",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, ir_version=7, opset_imports=[helper.make_opsetid("", 13)], producer_name="")
    onnx.checker.check_model(model)
    assert model.SerializeToString() == NOOP_MODEL


def test_strength_zero_returns_the_encoded_image(pipe):
    init = np.zeros((48, 64, 3), np.float32) + 0.5
    r = pipe("a dog", steps=4, image=init, strength=0.0, seed=1)
    assert r.pixels.shape == (1, 48, 64, 3)


def test_init_image_is_resized_to_requested_size(pipe):
    r = pipe("a dog", steps=2, image=Image.new("RGB", (100, 70)), width=64, height=64, strength=0.5)
    assert r.pixels.shape == (1, 64, 64, 3)
    r = pipe("a dog", steps=2, image=Image.new("RGB", (70, 50)), strength=0.5)
    assert r.pixels.shape == (1, 48, 64, 3)  # rounded down to multiples of 8


def test_long_prompt_is_read_in_chunks(pipe, engines, tmp_path):
    """Past 75 tokens a prompt goes on in another 77-token chunk (A1111), not truncated; an engine dir
    whose UNet takes one chunk (exported before long prompts) says so and how to fix it."""
    import json
    import shutil

    long = "a very detailed painting of " + "a red apple and " * 30
    r = pipe(long, seed=1, **ARGS)
    cut = pipe(pipe.tokenizer._tok.decode(pipe.tokenizer([long]).ids[0][1:76].tolist()), seed=1, **ARGS)
    assert np.abs(r.pixels - cut.pixels).max() > 1e-3  # the words past token 75 count
    old = tmp_path / "old"
    shutil.copytree(engines["eps"], old)
    m = json.loads((old / "manifest.json").read_text())
    unet = m["components"]["unet"]
    unet["inputs"][2]["shape"][1] = 77
    unet["dims"].pop("c")
    (old / "manifest.json").write_text(json.dumps(m))
    with sdrt.Pipeline.load(old) as p:
        assert np.array_equal(p("a red apple", seed=1, **ARGS).pixels, pipe("a red apple", seed=1, **ARGS).pixels)
        with pytest.raises(InputError, match=r"2 chunks of 75 tokens .* takes at most 1 \(exported before"):
            p(long, seed=1, **ARGS)


@pytest.mark.parametrize("kwargs,message", [
    ({"latents": np.zeros((1, 4, 5, 8))}, "latents: shape"),
    ({"mask": Image.new("L", (64, 48))}, "a mask needs an init image"),
    ({"num_images": 0}, "num_images: 0 is out of range"),
    ({"guidance_scale": -1.0}, "guidance_scale: -1.0 is out of range"),
    ({"height": 0}, "height 0: must be a multiple of 8"),
    ({"width": 4096}, "width 4096: must be a multiple of 8 .* from 8 to 2048"),
    ({"steps": 100_000}, "steps: 100000 is out of range"),
    ({"seed": -2}, "seed: -2 is out of range"),
    ({"sampler": "nope"}, "unknown sampler 'nope'"),
    ({"bogus": 1}, "unknown argument.*bogus"),
])
def test_bad_arguments(pipe, kwargs, message):
    args = ARGS | kwargs
    with pytest.raises(InputError, match=message):
        pipe("a dog", **args)


def test_unknown_provider(engines):
    with pytest.raises(InputError, match="unknown provider"):
        sdrt.Pipeline.load(engines["eps"], provider="metal")


@pytest.mark.parametrize("provider,tol", [("openvino-fp32", 1e-4), ("openvino", 0.1)])
def test_openvino_provider(engines, provider, tol):
    """Same ONNX files through OpenVINO: fp32 equals ONNX Runtime; bf16 within bf16's precision."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (pip install sdrt[openvino])")
    with sdrt.Pipeline.load(engines["eps"], provider=provider) as ov, sdrt.Pipeline.load(engines["eps"]) as cpu:
        for kwargs in ({}, {"image": Image.new("RGB", (64, 48), "green"), "strength": 0.6}):
            a = ov("a dog", seed=1, **ARGS, **kwargs).pixels
            b = cpu("a dog", seed=1, **ARGS, **kwargs).pixels
            assert np.abs(a - b).max() < tol


def test_gpu_provider_that_falls_back_is_an_error(engines, monkeypatch):
    """ONNX Runtime falls back to the CPU when a GPU provider's libraries are missing, with a line on
    stdout; sdrt names the provider and the libraries instead of running a GPU job on the CPU."""
    import onnxruntime as ort

    real = ort.InferenceSession

    class FellBack(real):
        def __init__(self, path, opts=None, providers=None, **kw):
            super().__init__(path, opts, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    with sdrt.Pipeline.load(engines["eps"], provider="cuda") as gpu:
        with pytest.raises(SdrtError, match="could not start CUDAExecutionProvider .* fell back to "
                                            "CPUExecutionProvider; it needs .*CUDA.* and cuDNN 9"):
            gpu("a dog", seed=1, **ARGS)


@pytest.mark.parametrize("installed,says", [({"onnxruntime"}, "on a machine with an NVIDIA GPU"),
                                            ({"onnxruntime", "onnxruntime-gpu"}, "both installed")])
def test_missing_gpu_provider_says_how_to_install_it(monkeypatch, installed, says):
    from importlib import metadata

    import onnxruntime as ort

    from sdrt.runtime.backends import check_provider

    def version(dist):
        if dist not in installed:
            raise metadata.PackageNotFoundError(dist)
        return "1.31.1"

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(SdrtError, match=f"no CUDAExecutionProvider .*{says}.*pip install 'onnxruntime-gpu"):
        check_provider("cuda")


def test_bad_gpu_memory_setting_is_named(monkeypatch):
    from sdrt.runtime.backends import check_provider
    from sdrt.runtime.backends.memory import gpu_memory_mode

    monkeypatch.delenv("SDRT_GPU_MEMORY", raising=False)
    assert gpu_memory_mode() == "low"  # the default: one CUDA arena, shrunk between phases
    monkeypatch.setenv("SDRT_GPU_MEMORY", "fast")
    assert gpu_memory_mode() == "fast"
    monkeypatch.setenv("SDRT_GPU_MEMORY", "lots")
    with pytest.raises(InputError, match="SDRT_GPU_MEMORY='lots': choose one of low, fast"):
        check_provider("cuda")


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_providers(engines, provider):
    import onnxruntime as ort

    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    if wanted not in ort.get_available_providers():
        pytest.skip(f"{wanted} not available: needs onnxruntime-gpu and an NVIDIA GPU")
    with sdrt.Pipeline.load(engines["eps"], provider=provider) as gpu, sdrt.Pipeline.load(engines["eps"]) as cpu:
        try:
            a = gpu("a dog", seed=1, **ARGS).pixels
        except SdrtError as e:  # ONNX Runtime lists the TensorRT provider wherever it was built with it
            if "could not start TensorrtExecutionProvider" not in str(e):
                raise
            pytest.skip(f"TensorRT's libraries are not installed: {e}")
        b = cpu("a dog", seed=1, **ARGS).pixels
    assert np.abs(a - b).max() < 2e-2  # TensorRT runs fp16


@pytest.mark.parametrize("mode", ["cheap", "vae"])
def test_cli_previews_are_the_steps_denoised_estimates(engines, pipe, tmp_path, mode):
    """`sdrt generate --preview-every N` writes, every N steps before the last, the callback's
    denoised estimate as A1111's cheap latent->RGB map or a full decode (sdrt.runtime.preview, which
    the server's progress endpoint uses too)."""
    from sdrt.cli import main
    from sdrt.runtime.preview import preview_images

    out = tmp_path / "x.png"
    assert main(["-q", "generate", "a dog", "--engines", str(engines["eps"]), "--steps", "5", "--width", "64",
                 "--height", "48", "--seed", "3", "--preview-every", "2", "--preview-decode", mode,
                 "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-step0002.png", "x-step0004.png", "x.png"]
    seen = {}
    pipe("a dog", steps=5, width=64, height=48, seed=3, callback=lambda i, n, x, x0: seen.setdefault(i + 1, x0))
    for step in (2, 4):
        (want,) = preview_images(pipe, seen[step], mode)
        got = Image.open(tmp_path / f"x-step{step:04d}.png")
        assert got.size == (64, 48) and np.array_equal(np.asarray(got), np.asarray(want.convert("RGB")))
