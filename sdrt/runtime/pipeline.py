"""`sdrt.Pipeline`: text-to-image and image-to-image over exported engines, in NumPy, no torch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.errors import InputError
from sdrt.manifest import Manifest
from sdrt.runtime import images, noise, samplers
from sdrt.runtime.backends import PROVIDER_TARGETS, check_provider, load_backend, release_free_memory
from sdrt.runtime.denoiser import Denoiser
from sdrt.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)


@dataclass
class Result:
    images: list  # PIL.Image, one per image
    pixels: np.ndarray  # (N, H, W, 3) float32 in [0, 1]
    seeds: list[int]  # image i was made from seeds[i]
    parameters: list[str] = field(default_factory=list)  # A1111 `parameters` text per image


class Pipeline:
    """Engines are loaded on first use, so bad arguments fail before any session is created and an
    engine a call does not need (the VAE encoder for txt2img) costs no memory."""

    def __init__(self, engine_dir: Path, manifest: Manifest, tokenizer: ClipTokenizer, provider: str,
                 optimized: bool = True):
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.provider = provider
        # run the provider's rewritten graphs (sdrt.kernels) where the export made them
        self.targets = PROVIDER_TARGETS.get(provider, ()) if optimized else ()
        self.engines = {}  # component name -> Backend, filled by engine()

    @classmethod
    def load(cls, engine_dir: str | Path, provider: str = "cpu", optimized: bool = True) -> Pipeline:
        d = Path(engine_dir)
        manifest = Manifest.read(d)
        if not any(c.backend == "tensorrt" for c in manifest.components.values()):
            check_provider(provider)  # TensorRT engines check their own imports when loaded
        if manifest.pipeline not in ("txt2img", "inpaint"):
            raise InputError(f"{d}: a {manifest.pipeline} model; this sdrt runs txt2img / img2img and "
                             "inpainting models only")
        missing = {"text_encoder", "unet", "vae_decoder"} - set(manifest.components)
        if missing:
            raise InputError(f"{d}: manifest lacks {', '.join(sorted(missing))}")
        return cls(d, manifest, ClipTokenizer.from_dir(d / manifest.tokenizer_dir), provider, optimized)

    def engine(self, name: str):
        if name not in self.engines:
            c = self.manifest.components.get(name)
            if c is None:
                raise InputError(f"{self.engine_dir}: no {name} engine")
            if c.precision == "fp16" and self.provider == "cpu" and not any(
                    self.manifest.components[n].precision == "fp16" for n in self.engines):  # once per pipeline
                # it runs (ops without fp16 kernels compute in fp32 between casts), but at fp32's speed with
                # fp32 copies of the weights beside the fp16 ones (SD 1.5 UNet: 5.8 against 4.1 GB peak)
                log.warning("%s: the engines are fp16, made for GPUs; ONNX Runtime's CPU provider runs them no "
                            "faster than fp32 and with more memory: export with --precision fp32 for CPUs",
                            self.engine_dir)
            path = self.engine_dir / (c.files[0] if c.backend == "tensorrt" else c.file_for(self.targets))
            self.engines[name] = load_backend(path, c.spec, c.backend, self.provider)
        return self.engines[name]

    def warmup(self) -> None:
        """Create every session now (servers, benchmarks) instead of on first use."""
        for name in self.manifest.components:
            self.engine(name)

    @property
    def scale_factor(self) -> int:
        return self.manifest.dims.vae_scale_factor

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        self.engines.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- text ---------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], clip_skip: int) -> np.ndarray:
        """(len(prompts), 77, D) embeddings from CLIP layer -clip_skip (after the final LayerNorm)."""
        tok = self.tokenizer(prompts)
        for dropped in tok.truncated:
            if dropped:
                log.warning("prompt is longer than %d tokens; this part was dropped: %r",
                            self.tokenizer.max_length, dropped)
        hidden = self.engine("text_encoder")(tok.ids)  # (layers, N, 77, D)
        return hidden[-clip_skip]

    # -- generation ---------------------------------------------------------------------------
    def __call__(self, prompt: str, negative_prompt: str | None = None, steps: int = 20,
                 sampler: str = samplers.DEFAULT_SAMPLER, guidance_scale: float = 7.5,
                 seed: int | None = None, width: int | None = None, height: int | None = None,
                 num_images: int = 1, clip_skip: int = 1, image=None, strength: float = 0.8,
                 mask=None, latents: np.ndarray | None = None,
                 callback: Callable[[int, int, np.ndarray], None] | None = None,
                 schedule_type: str | None = None, eta: float | None = None) -> Result:
        """schedule_type: "karras", "exponential" or "sgm_uniform" for the samplers that take one
        (A1111's schedule types); eta: DDIM's noise amount (0 = deterministic)."""
        smp = samplers.get_sampler(sampler)
        inpaint = self.manifest.dims.unet_in_channels == 9
        if mask is not None and image is None:
            raise InputError("a mask needs an init image (--init-image) to inpaint")
        if inpaint and (image is None or mask is None):
            raise InputError(f"{self.engine_dir} is an inpainting model: give it an init image and a mask "
                             "(--init-image, --mask)")
        if image is not None:
            image = images.load_image(image)
            if "vae_encoder" not in self.manifest.components:
                raise InputError(f"{self.engine_dir}: no vae_encoder engine, needed for an init image")
            w0, h0 = images.image_size(image)
            width = width or w0 - w0 % self.scale_factor
            height = height or h0 - h0 % self.scale_factor
        width, height = self._check_size(width), self._check_size(height)
        self._check_args(steps, guidance_scale, num_images, clip_skip, strength, image is not None)
        config = self.manifest.scheduler_config
        schedule = smp.make_schedule(config, steps, schedule_type)
        options = smp.options_for(eta)
        if seed is None:
            seed = noise.new_seed()
        seeds = [int(seed) + i for i in range(num_images)]
        shape = (num_images, self.manifest.dims.latent_channels, height // self.scale_factor,
                 width // self.scale_factor)
        if latents is not None:
            latents = np.asarray(latents)
            if latents.shape != shape:
                raise InputError(f"latents: shape {latents.shape}, expected {shape}")
        else:
            latents = noise.randn(seeds, noise.INITIAL, shape)

        cond = np.repeat(self.encode_prompts([prompt], clip_skip), num_images, axis=0)
        uncond = None
        if guidance_scale > 1:  # diffusers: guidance <= 1 runs the conditional pass only
            uncond = np.repeat(self.encode_prompts([negative_prompt or ""], clip_skip), num_images, axis=0)
        release_free_memory()  # each phase (text, init image, sampling, decoding) starts from a small arena

        extra = blend = x0 = None
        if mask is not None:
            m = images.to_mask(mask, width, height)  # (1, 1, H, W), 1: repaint
            m_latent = m[:, :, ::self.scale_factor, ::self.scale_factor]  # torch's nearest resize, as diffusers
        if inpaint:  # diffusers' StableDiffusionInpaintPipeline with a 9-channel UNet: mask and masked image
            kept = images.to_model_input(image, width, height) * (m < 0.5)
            extra = np.concatenate([np.repeat(m_latent, num_images, axis=0),
                                    self._encode(kept, seeds, noise.MASKED_POSTERIOR)], axis=1)
            release_free_memory()
        if image is not None:
            schedule = schedule.tail(smp.img2img_start(steps, strength))
            if not (inpaint and strength >= 1):  # img2img's start; an ordinary model's inpainting blend
                x0 = self.encode_image(image, width, height, seeds)
                release_free_memory()
        noise0 = latents.astype(np.float64)
        if image is None or (mask is not None and strength >= 1):  # inpainting at full strength: pure noise
            x = samplers.initial_state(smp, schedule, noise0)
        else:
            x = x0 + noise0 * schedule.sigmas[0] if len(schedule) else x0
        if mask is not None and not inpaint:  # an ordinary model: keep the image outside the mask
            blend = self._blend(m_latent, x0, noise0, schedule, smp.space)

        denoise = Denoiser(self.engine("unet"), schedule, self.manifest.prediction_type, cond, uncond,
                           guidance_scale, extra)
        total = len(schedule)

        def on_step(i, x):
            if blend is not None:
                x[...] = blend(i, x)  # the samplers go on from x, as diffusers' loop from its latents
            if callback is not None:
                callback(i, total, x)

        x = smp.fn(denoise, x, schedule, noise=noise.ImageNoise(seeds, noise.SAMPLER), callback=on_step, **options)
        if len(schedule):
            x = samplers.final_latents(smp, schedule, x)
        release_free_memory()  # the UNet's working set, before the decoder's peak
        pixels = self.decode(x)
        release_free_memory()  # nothing held between generations but the weights
        info = [images.a1111_parameters(prompt, negative_prompt or "", {
            "Steps": steps, "Sampler": smp.display,
            "Schedule type": schedule_type.replace("_", " ").title() if schedule_type else None,
            "CFG scale": guidance_scale, "Seed": s,
            "Size": f"{width}x{height}", "Model hash": self.manifest.source.get("sha256", "")[:10],
            "Model": Path(str(self.manifest.source.get("name", ""))).name,
            "Clip skip": clip_skip if clip_skip != 1 else None,
            "Denoising strength": strength if image is not None else None, "Eta": eta,
        }) for s in seeds]
        return Result(images.to_pil(pixels), pixels, seeds, info)

    @staticmethod
    def _blend(mask, x0, noise0, schedule, space):
        """Inpainting with a 4-channel UNet, as diffusers' StableDiffusionInpaintPipeline: after every
        step, outside the mask (mask 0) the state becomes the init image's latents noised to the next
        level with the initial noise, and after the last step the latents themselves."""
        sigmas, n = schedule.sigmas, len(schedule)
        # the state is x_t / sqrt(alpha_bar) ("vp" samplers end at sigmas[-1], which may not be 0)
        last = np.sqrt(1 + sigmas[-1] ** 2) if space == "vp" else 1.0

        def blend(i, x):
            target = x0 + sigmas[i + 1] * noise0 if i < n - 1 else x0 * last
            return (1 - mask) * target + mask * x

        return blend

    def encode_image(self, image, width: int, height: int, seeds: list[int]) -> np.ndarray:
        """One posterior sample per image, from that image's seed: (N, 4, h, w) float64."""
        return self._encode(images.to_model_input(image, width, height), seeds, noise.POSTERIOR)

    def _encode(self, arr: np.ndarray, seeds: list[int], stream: int) -> np.ndarray:
        """(1, 3, H, W) in [-1, 1] -> a posterior sample per seed from noise stream `stream`."""
        mean, std = self.engine("vae_encoder").run({"image": arr.astype(np.float32)})
        eps = noise.randn(seeds, stream, (len(seeds), *mean.shape[1:]))
        return mean.astype(np.float64) + std.astype(np.float64) * eps

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(N, 4, h, w) latents -> (N, H, W, 3) float32 pixels in [0, 1]; one image at a time (memory)."""
        out = [self.engine("vae_decoder")(latents[i : i + 1].astype(np.float32)) for i in range(len(latents))]
        image = np.concatenate(out)
        return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)

    # -- validation ---------------------------------------------------------------------------
    def _check_size(self, px: int | None) -> int:
        f = self.scale_factor
        if px is None:
            return self.manifest.default_image_size
        if int(px) != px or px < f or px % f:
            raise InputError(f"width and height must be positive multiples of {f} (the VAE scale factor), got {px}")
        return int(px)

    def _check_args(self, steps, guidance_scale, num_images, clip_skip, strength, img2img) -> None:
        layers = self.manifest.dims.text_layers
        if int(steps) != steps or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps}")
        if not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise InputError(f"guidance scale must be >= 0, got {guidance_scale}")
        if int(num_images) != num_images or num_images < 1:
            raise InputError(f"number of images must be an integer >= 1, got {num_images}")
        if int(clip_skip) != clip_skip or not 1 <= clip_skip <= layers:
            raise InputError(f"clip skip must be between 1 and {layers}, got {clip_skip}")
        if img2img and not 0 <= strength <= 1:
            raise InputError(f"strength must be in [0, 1], got {strength}")
