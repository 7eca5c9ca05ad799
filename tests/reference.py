"""diffusers as the reference: the same checkpoint, scheduler and noise as an sdrt call."""

from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

from sdrt.runtime.samplers import get_sampler


@functools.cache
def _pipelines(path: str):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    txt = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    txt.set_progress_bar_config(disable=True)
    te = txt.text_encoder
    if not hasattr(te, "text_model"):
        # diffusers 0.42's clip_skip path reads text_encoder.text_model.final_layer_norm, which
        # transformers 5 flattened away (diffusers 0.42 still reaches for it); alias it without registering a submodule
        object.__setattr__(te, "text_model", te)
    img = StableDiffusionImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    return txt, img, dict(txt.scheduler.config)


def scheduler_for(config: dict, sampler: str, schedule_type: str | None = None):
    """The diffusers scheduler an sdrt sampler name maps to, from the checkpoint's own config."""
    import diffusers

    cls, overrides = get_sampler(sampler).diffusers_config(schedule_type)
    return getattr(diffusers, cls).from_config(config, **overrides)


def _negative(pipe, negative_prompt, guidance_scale, clip_skip) -> dict:
    """diffusers applies clip_skip to the prompt only and encodes the negative prompt from CLIP's last
    layer (its own SDXL fix, PRs #13796 / #13973, calls this a bug); sdrt applies it to both, as
    A1111 does. So with clip_skip the reference gets negative embeddings from diffusers' own
    encode_prompt with the same clip_skip."""
    if clip_skip == 1 or guidance_scale <= 1:
        return {"negative_prompt": negative_prompt}
    embeds, _ = pipe.encode_prompt(negative_prompt or "", "cpu", 1, False, clip_skip=clip_skip - 1)
    return {"negative_prompt_embeds": embeds}


# diffusers modules whose noise draws are replaced by sdrt's
NOISE_MODULES = ["scheduling_euler_ancestral_discrete", "scheduling_k_dpm_2_ancestral_discrete",
                 "scheduling_dpmsolver_multistep", "scheduling_ddpm", "scheduling_lcm", "scheduling_ddim"]


def patch_noise(stack, draws):
    """Within `stack`, every noise draw of a diffusers scheduler returns draws(shape) instead."""
    import torch
    from diffusers import schedulers as mods

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(draws(tuple(shape)).astype(np.float32 if dtype == torch.float32 else np.float64))

    for name in NOISE_MODULES:
        stack.enter_context(mock.patch.object(getattr(mods, name), "randn_tensor", randn))

    class Brownian:  # DPMSolverSDEScheduler's noise sampler: one draw per call
        def __init__(self, x, *args, **kwargs):
            self.shape, self.dtype = tuple(x.shape), x.dtype

        def __call__(self, sigma, sigma_next):
            return randn(self.shape, dtype=self.dtype)

    stack.enter_context(mock.patch.object(mods.scheduling_dpmsolver_sde, "BrownianTreeNoiseSampler", Brownian))


def generators(seeds: list[int] | None):
    """diffusers' `generator`: one torch CPU generator per image, seeded s + i (None: none)."""
    import torch

    return None if seeds is None else [torch.Generator("cpu").manual_seed(s) for s in seeds]


def txt2img(path: Path, *, prompt, negative_prompt, steps, sampler, guidance_scale, width, height,
            num_images, clip_skip, latents: np.ndarray | None = None, draws=None, schedule_type=None, eta=None,
            seeds: list[int] | None = None) -> np.ndarray:
    """draws: sdrt's sampler noise (noise.Noise(...).sampler()) to feed diffusers' stochastic
    schedulers; seeds: no latents or draws, diffusers' own noise from generators seeded with them."""
    import torch

    pipe, _, config = _pipelines(str(path))
    pipe.scheduler = scheduler_for(config, sampler, schedule_type)
    with ExitStack() as stack:
        if draws is not None:
            patch_noise(stack, draws)
        out = pipe(prompt, **_negative(pipe, negative_prompt, guidance_scale, clip_skip), num_inference_steps=steps,
                   guidance_scale=guidance_scale, width=width, height=height, num_images_per_prompt=num_images,
                   clip_skip=None if clip_skip == 1 else clip_skip - 1,  # diffusers counts skipped layers
                   latents=None if latents is None else torch.from_numpy(latents.astype(np.float32)),
                   generator=generators(seeds), output_type="np", **({} if eta is None else {"eta": eta}))
    return out.images


@contextmanager
def _fixed_noise(posterior_noise: np.ndarray, noise: np.ndarray):
    """Make diffusers' img2img draw our VAE-posterior noise and our initial noise."""
    import torch
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod

    def retrieve(encoder_output, generator=None, sample_mode="sample"):
        d = encoder_output.latent_dist
        return d.mean + d.std * torch.from_numpy(posterior_noise.astype(np.float32))

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == noise.shape, (shape, noise.shape)
        return torch.from_numpy(noise.astype(np.float32))

    with mock.patch.object(mod, "retrieve_latents", retrieve), mock.patch.object(mod, "randn_tensor", randn):
        yield


def img2img(path: Path, *, image, strength, prompt, negative_prompt, steps, sampler, guidance_scale,
            num_images, clip_skip, posterior_noise: np.ndarray | None = None, latents: np.ndarray | None = None,
            seeds: list[int] | None = None) -> np.ndarray:
    """posterior_noise and latents: sdrt's draws; or seeds: diffusers' own, from generators."""
    _, pipe, config = _pipelines(str(path))
    pipe.scheduler = scheduler_for(config, sampler)
    with _fixed_noise(posterior_noise, latents) if seeds is None else ExitStack():
        out = pipe(prompt, image=image, strength=strength,
                   **_negative(pipe, negative_prompt, guidance_scale, clip_skip),
                   num_inference_steps=steps, guidance_scale=guidance_scale, num_images_per_prompt=num_images,
                   clip_skip=None if clip_skip == 1 else clip_skip - 1, output_type="np",
                   generator=generators(seeds))
    return out.images


@functools.cache
def _inpaint_pipeline(path: str):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


def inpaint(path: Path, *, image, mask, strength, prompt, negative_prompt, steps, sampler, guidance_scale,
            width, height, num_images, posterior_noise: np.ndarray | None = None,
            masked_noise: np.ndarray | None = None, latents: np.ndarray | None = None,
            seeds: list[int] | None = None) -> np.ndarray:
    """StableDiffusionInpaintPipeline drawing sdrt's noise: `latents` as its initial noise (not passed
    as `latents=`, which would make diffusers ignore strength), `posterior_noise` for the init image's
    VAE sample, then `masked_noise` for the masked image's."""
    import torch
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as mod

    pipe, config = _inpaint_pipeline(str(path))
    pipe.scheduler = scheduler_for(config, sampler)
    if seeds is not None:  # diffusers' own noise
        return pipe(prompt, image=image, mask_image=mask, strength=strength,
                    **_negative(pipe, negative_prompt, guidance_scale, 1), num_inference_steps=steps,
                    guidance_scale=guidance_scale, width=width, height=height, num_images_per_prompt=num_images,
                    output_type="np", generator=generators(seeds)).images
    # diffusers' encode order: the init image (below full strength, or always for a 4-channel UNet,
    # whose loop blends the image's latents back in), then the masked image (used by 9-channel UNets)
    image_encoded = strength < 1 or pipe.unet.config.in_channels == 4
    draws = ([posterior_noise] if image_encoded else []) + [masked_noise]

    def retrieve(encoder_output, generator=None, sample_mode="sample"):
        d = encoder_output.latent_dist
        return d.mean + d.std * torch.from_numpy(draws.pop(0).astype(np.float32))

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == latents.shape, (shape, latents.shape)
        return torch.from_numpy(latents.astype(np.float32))

    with mock.patch.object(mod, "retrieve_latents", retrieve), mock.patch.object(mod, "randn_tensor", randn):
        out = pipe(prompt, image=image, mask_image=mask, strength=strength,
                   **_negative(pipe, negative_prompt, guidance_scale, 1), num_inference_steps=steps,
                   guidance_scale=guidance_scale, width=width, height=height, num_images_per_prompt=num_images,
                   output_type="np")
    assert not draws, "diffusers encoded fewer images than expected"
    return out.images


def cycle(path: Path, *, image, prompt, source_prompt, strength, steps, guidance_scale, source_guidance_scale,
          eta, seed: int) -> np.ndarray:
    """diffusers' CycleDiffusionPipeline (DDIM, its own noise from a generator seeded SEED)."""
    import torch
    from diffusers import CycleDiffusionPipeline, DDIMScheduler

    txt, _, config = _pipelines(str(path))
    parts = {k: v for k, v in txt.components.items() if k not in ("image_encoder",)}
    pipe = CycleDiffusionPipeline(**{**parts, "scheduler": DDIMScheduler.from_config(config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, source_prompt, image=image, strength=strength, num_inference_steps=steps,
                guidance_scale=guidance_scale, source_guidance_scale=source_guidance_scale, eta=eta,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images


@functools.cache
def _depth_pipeline(path: str):
    from diffusers import StableDiffusionDepth2ImgPipeline

    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


def depth2img(path: Path, *, image, prompt, negative_prompt, strength, steps, sampler, guidance_scale,
              num_images, seeds: list[int], depth_map: np.ndarray | None = None) -> np.ndarray:
    """StableDiffusionDepth2ImgPipeline with its own noise (generators seeded SEEDS); depth_map (1, H, W)
    replaces its estimator's."""
    import torch

    pipe, config = _depth_pipeline(str(path))
    pipe.scheduler = scheduler_for(config, sampler)
    return pipe(prompt, image=image, negative_prompt=negative_prompt, strength=strength, num_inference_steps=steps,
                guidance_scale=guidance_scale, num_images_per_prompt=num_images, generator=generators(seeds),
                depth_map=None if depth_map is None else torch.from_numpy(depth_map), output_type="np").images


class _HfTokenizer:
    """transformers' CLIPTokenizer with the interface sdrt.runtime.prompts.chunks reads."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_id, self.eos_id, self.pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self.comma_id = tok.get_vocab()[",</w>"]

    def encode_plain(self, texts):
        return self.tok(texts, truncation=False, add_special_tokens=False)["input_ids"]


def a1111_embeddings(path: Path, texts: list[str], clip_skip: int, emphasis: str) -> list[np.ndarray]:
    """A1111's conditioning with the PyTorch text encoder: the prompt's 77-token chunks (sdrt's parse and
    chunks, checked on their own in test_prompts, over transformers' tokenizer), CLIP per chunk (layer
    -clip_skip, then the final LayerNorm), the weights applied in torch as A1111's emphasis mode does,
    the chunks concatenated, and the shorter texts padded with the empty prompt's chunk."""
    import torch

    from sdrt.runtime import prompts

    pipe, _, _ = _pipelines(str(path))
    te, tok = pipe.text_encoder, _HfTokenizer(pipe.tokenizer)
    norm = getattr(te, "final_layer_norm", None) or te.text_model.final_layer_norm

    def encode(text):
        c = prompts.chunks(tok, text, emphasis)
        zs = []
        with torch.no_grad():
            for ids, weights in zip(c.ids, c.weights):
                out = te(torch.from_numpy(ids[None]), output_hidden_states=True)
                z = (out.last_hidden_state if clip_skip == 1 else norm(out.hidden_states[-clip_skip]))[0]
                if emphasis in ("Original", "No norm"):
                    mean = z.mean()
                    z = z * torch.tensor(weights, dtype=torch.float32)[:, None]
                    z = z * (mean / z.mean()) if emphasis == "Original" else z
                zs.append(z)
        return torch.cat(zs)

    embs = [encode(t) for t in texts]
    longest, empty = max(len(e) for e in embs), encode("")
    return [torch.cat([e, *[empty] * ((longest - len(e)) // len(empty))]).numpy() for e in embs]


def txt2img_embeds(path: Path, cond: np.ndarray, uncond: np.ndarray, *, steps, sampler, guidance_scale, width,
                   height, seeds: list[int]) -> np.ndarray:
    """diffusers' StableDiffusionPipeline given prompt_embeds and negative_prompt_embeds (T, D)."""
    import torch

    pipe, _, config = _pipelines(str(path))
    pipe.scheduler = scheduler_for(config, sampler)
    return pipe(prompt_embeds=torch.from_numpy(cond[None]), negative_prompt_embeds=torch.from_numpy(uncond[None]),
                num_inference_steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                generator=generators(seeds), output_type="np").images


def txt2img_with_embeddings(path: Path, *, prompt, negative_prompt, files: dict, steps, seed, width, height,
                            sampler) -> np.ndarray:
    """diffusers' StableDiffusionPipeline with textual-inversion FILES ({token: file}) loaded by
    load_textual_inversion (a fresh pipeline: the loaded tokens stay in its tokenizer)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for token, f in files.items():
        pipe.load_textual_inversion(str(f), token=token)
    pipe.scheduler = scheduler_for(dict(pipe.scheduler.config), sampler)
    return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, width=width, height=height,
                generator=generators([seed]), output_type="np").images
