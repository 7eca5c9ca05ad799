"""`sdrt.Pipeline`: text-to-image, image-to-image, inpainting, depth2img and CycleDiffusion over exported
engines, in NumPy, no torch.

A call runs in named phases: plan (validate the request against the engine dir, resolve sizes,
schedule and seeds) -> conditioning (text embeddings) -> start state (initial noise, init image
latents, inpainting inputs) -> sampling (the sampler loop, with its per-step hook) -> decode ->
metadata. Memory is handed back between phases (sdrt.runtime.backends.memory).

The UNet's input channels decide the model's kind (manifest.pipeline): 4 (txt2img and img2img), 9
(inpainting: mask and masked-image latents beside the latents), 5 (depth2img: a depth map beside them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.components import DEPTH_ESTIMATOR
from sdrt.errors import InputError, Interrupted, NonFiniteOutput
from sdrt.manifest import Manifest
from sdrt.runtime import cycle, depth, embeddings, feature_cache, images, lora, noise, prompts, samplers
from sdrt.runtime.backends import (
    PROVIDER_TARGETS,
    check_provider,
    check_weights,
    load_backend,
    release_free_memory,
    resolve_provider,
)
from sdrt.runtime.backends.guided import GuidedBackend
from sdrt.runtime.denoiser import Denoiser
from sdrt.runtime.request import GenerateRequest
from sdrt.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

FP32_FALLBACK = "fp32"  # the target name of the fp32 VAE decoder an fp16 export keeps
FP32_DECODER = "vae_decoder:fp32"  # its engine's key in Pipeline.engines
EMBEDS = "text_encoder:embeds"  # the text encoder taking token embeddings (textual inversion)
OWN_WEIGHTS = ("onnxruntime-cuda",)  # target graphs with weights of their own, which weight maps don't cover
EMBEDDING_CACHE = 64  # 77-token chunks whose CLIP outputs a pipeline keeps (servers see the same prompts often)

# callback(step, total, latents, denoised): after every step; latents is the sampler state, denoised
# the step's data estimate x0 (previews decode it); both (N, C, h, w) float64
Callback = Callable[[int, int, np.ndarray, np.ndarray], None]


@dataclass
class Result:
    images: list  # PIL.Image, one per image
    pixels: np.ndarray  # (N, H, W, 3) float32 in [0, 1]
    seeds: list[int]  # image i was made from seeds[i]
    parameters: list[str] = field(default_factory=list)  # A1111 `parameters` text per image

    def save(self, path: str | Path) -> list[Path]:
        """PNGs with their `parameters` metadata: PATH for one image, NAME-i.png for several."""
        paths = images.numbered_paths(Path(path), len(self.images))
        for image, text, p in zip(self.images, self.parameters, paths):
            images.save_png(image, p, text)
        return paths


@dataclass
class Plan:
    """A request resolved against the engine dir: what the phases run."""

    req: GenerateRequest
    sampler: samplers.Sampler
    schedule: object  # sdrt.runtime.schedules.Schedule, already cut for img2img
    options: dict  # the sampler function's keyword options
    seeds: list[int]
    width: int
    height: int
    image: object = None  # the init image, loaded
    kind: str = "txt2img"  # the model's (manifest.pipeline): "inpaint" a 9-channel UNet, "depth2img" a 5-channel one
    loras: list = field(default_factory=list)  # sdrt.runtime.lora.Use: the request's and its prompt's


@dataclass
class StartState:
    x: np.ndarray  # the sampler state before the first step, float64
    extra: np.ndarray | None = None  # channels appended to the UNet input (inpainting's, depth2img's)
    hook: Callable | None = None  # (i, x) -> x after every step (inpainting's blend)
    draws: noise.Noise | None = None  # the generation's noise, which the sampler continues
    clean: np.ndarray | None = None  # the init image's latents (CycleDiffusion's posterior)


class Pipeline:
    """Engines are loaded on first use, so bad arguments fail before any session is created and an
    engine a call does not need (the VAE encoder for txt2img) costs no memory."""

    def __init__(self, engine_dir: Path, manifest: Manifest, tokenizer: ClipTokenizer, provider: str,
                 optimized: bool = True):
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.provider = provider
        self.provider_choice = "given"  # why this provider (Pipeline.load with provider "auto": the reason)
        # run the provider's rewritten graphs (sdrt.kernels) where the export made them
        self.targets = PROVIDER_TARGETS.get(provider, ()) if optimized else ()
        self.engines = {}  # component name -> Backend, filled by engine()
        # (a chunk's token ids, clip skip) -> its (77, D) CLIP output, the most recent EMBEDDING_CACHE chunks
        self._embeddings: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._embedding_lock = threading.Lock()
        self.library = embeddings.Library(tokenizer)  # textual-inversion embeddings prompts may name
        self._token_table = None
        self.lora_dir: Path | None = None  # where <lora:NAME:W> prompts find NAME (set_lora_dir)
        self.loras = lora.Weights(engine_dir, manifest)  # the LoRA set the sessions run with
        self._lora_lock = threading.Lock()
        self._stop = threading.Event()
        # unet -> context manager yielding the UNet callable the sampler loop uses; None: the UNet itself.
        # A server's step batcher (sdrt.serve.continuous) merges concurrent generations' calls through it.
        self.unet_gate: Callable | None = None
        # guided batches run the UNet's guided graph where the export made one (sdrt.kernels.guidance);
        # False: always the plain graph (A/B measurements)
        self.share_guided = True

    @classmethod
    def load(cls, engine_dir: str | Path, provider: str = "cpu", optimized: bool = True,
             verify: bool = False) -> Pipeline:
        """verify: check every file's sha256 against the manifest (sizes are always checked)."""
        d = Path(engine_dir)
        manifest = Manifest.read(d, verify=verify)
        provider, why = resolve_provider(provider, manifest)
        if why != "given":
            log.info("provider auto: %s (%s)", provider, why)
        if not any(c.backend == "tensorrt" for c in manifest.components.values()):
            check_provider(provider)  # TensorRT engines check their own imports when loaded
        missing = {"text_encoder", "unet", "vae_decoder"} - set(manifest.components)
        if missing:
            raise InputError(f"{d}: manifest lacks {', '.join(sorted(missing))}")
        pipe = cls(d, manifest, ClipTokenizer.from_dir(d / manifest.tokenizer_dir), provider, optimized)
        pipe.provider_choice = why
        return pipe

    def engine(self, name: str):
        if name not in self.engines:
            c = self.manifest.components.get(name)
            if c is None:
                raise InputError(f"{self.engine_dir}: no {name} engine")
            if c.precision == "fp16" and self.provider == "cpu" and not any(
                    n in self.manifest.components and self.manifest.components[n].precision == "fp16"
                    for n in self.engines):  # once per pipeline
                # it runs (ops without fp16 kernels compute in fp32 between casts), but at fp32's speed with
                # fp32 copies of the weights beside the fp16 ones
                log.warning("%s: the engines are fp16, made for GPUs; ONNX Runtime's CPU provider runs them no "
                            "faster than fp32 and with more memory: export with --precision fp32 for CPUs",
                            self.engine_dir)
            weights = self.loras.arrays.get(name)
            self.engines[name] = self._load(c, self._graph_for(c, weights), c.spec, weights)
        return self.engines[name]

    def _load(self, c, file: str, spec, weights):
        """The backend for component C's graph FILE; a UNet graph with a guided variant gets the
        backend that runs it for guided batches (share_guided)."""
        provider = self._provider_for(c.backend)

        def load(path, spec):
            return load_backend(path, spec, c.backend, provider, weights)

        guided = c.guided.get(file) if self.share_guided else None
        if guided is None:
            return load(self.engine_dir / file, spec)
        return GuidedBackend(self.engine_dir / file, self.engine_dir / guided, spec, load, provider)

    def _graph_for(self, c, weights) -> str:
        """The file component C runs from: its provider's graph (one that takes WEIGHTS, if any)."""
        targets = tuple(t for t in self.targets if t not in OWN_WEIGHTS) if weights else self.targets
        return c.files[0] if c.backend == "tensorrt" else c.file_for(targets)

    def _cache_graph(self, c, weights) -> str:
        """The UNet graph whose feature-caching pair runs: the provider's, else (the CUDA graph has
        none) the best graph sharing the standard weights."""
        graph = self._graph_for(c, weights)
        return graph if graph in c.feature_cache else self._graph_for(c, True)

    def cached_unet(self, interval: int) -> feature_cache.CachedUNet:
        """The UNet with feature caching every INTERVAL steps (its full and shallow graphs, loaded on
        first use like the other engines, running the pipeline's LoRA set)."""
        c = self.manifest.components["unet"]
        weights = self.loras.arrays.get("unet")
        pair, specs = feature_cache.pair_for(c, self._cache_graph(c, weights), self.engine_dir)
        for key, file, spec, kept in ((feature_cache.FULL, pair.full, specs[0], None),
                                      (feature_cache.SHALLOW, pair.shallow, specs[1], set(pair.shallow_weights))):
            if key not in self.engines:
                own = weights if kept is None or not weights else {k: v for k, v in weights.items() if k in kept}
                self.engines[key] = self._load(c, file, spec, own)
        return feature_cache.CachedUNet(self.engines[feature_cache.FULL], self.engines[feature_cache.SHALLOW],
                                        interval, pair.feature.name)

    def _provider_for(self, backend: str) -> str:
        """The provider for one component: the pipeline's, except for an ONNX graph beside TensorRT
        engines (a depth estimator stays ONNX), which runs on ONNX Runtime's CUDA provider, or its CPU one."""
        if backend != "onnx" or self.provider != "tensorrt" or not any(
                c.backend == "tensorrt" for c in self.manifest.components.values()):
            return self.provider
        from sdrt.runtime.backends.onnxruntime import has_cuda

        return "cuda" if has_cuda() else "cpu"

    def load_embeddings(self, directory: str | Path) -> list[str]:
        """Every textual-inversion file in DIRECTORY (A1111's embeddings folder), named by its stem;
        returns the names."""
        found = embeddings.load_dir(directory)
        for e in found:
            self.library.add(e)
        return sorted(e.name for e in found)

    def add_embedding(self, source, name: str | None = None) -> str:
        """A textual-inversion embedding (a .safetensors / .pt / .bin file, or an Embedding) that
        prompts then name; returns its name."""
        e = source if isinstance(source, embeddings.Embedding) else embeddings.load(source, name)
        self.library.add(e)
        return e.name

    def set_lora_dir(self, directory: str | Path | None) -> None:
        """The folder `<lora:NAME:WEIGHT>` in prompts finds NAME in (A1111's Lora folder)."""
        if directory is not None and not Path(directory).is_dir():
            raise InputError(f"--lora-dir {directory}: not a directory")
        self.lora_dir = None if directory is None else Path(directory)

    def lora_uses(self, req: GenerateRequest) -> list:
        """REQ's LoRAs (sdrt.runtime.lora.Use): its `loras`, then those its prompt names."""
        return lora.uses_from(req.loras, self.lora_dir) + lora.split_prompt(req.prompt, self.lora_dir)[1]

    def lora_key(self, req: GenerateRequest) -> tuple:
        """What identifies REQ's LoRA set: requests with equal keys run on the same sessions."""
        return tuple(u.key for u in self.lora_uses(req))

    def use_loras(self, loras=None, load: bool = True) -> None:
        """Make the UNet's and text encoder's sessions run with LORAS (a request's `loras`; none: the
        base weights) now: a component whose set changes gets a new session over its merged weights
        (with LOAD false, on its next use: a generation loads the UNet graphs it runs, the plain ones
        or feature caching's pair). Generations do this themselves; a server or benchmark may do it
        ahead. Generations running at once must share one set (the server's scheduler sees to it)."""
        uses = lora.uses_from(loras, self.lora_dir)
        for name in lora.COMPONENTS if uses else ():  # before any session is closed
            backend = self.manifest.components[name].backend
            check_weights(backend, self._provider_for(backend))
        with self._lora_lock:
            changed = self.loras.changes(uses)
            if not changed:
                return
            self.loras.check(uses)
            for name in changed:
                for engine in [name] + ([EMBEDS] if name == "text_encoder" else []):
                    self.unload(engine)  # the UNet's feature-caching pair goes with it
                release_free_memory()  # the old session's memory goes back before the new arrays are made
                self.loras.switch(uses, name)
                if load:
                    self.engine(name)

    def warmup(self) -> None:
        """Create every session now (servers, benchmarks) instead of on first use."""
        for name in self.manifest.components:
            self.engine(name)

    def unload(self, name: str) -> None:
        """Close one component's sessions (the next call that needs them loads them again); the
        UNet's include its feature-caching pair."""
        for key in [name] + ([feature_cache.FULL, feature_cache.SHALLOW] if name == "unet" else []):
            engine = self.engines.pop(key, None)
            if engine is not None:
                engine.close()

    def interrupt(self) -> None:
        """From any thread: the running generation stops within one engine call (ONNX Runtime stops
        a call in progress) and raises sdrt.errors.Interrupted."""
        self._stop.set()
        for e in list(self.engines.values()):
            e.interrupt()

    @property
    def max_chunks(self) -> int:
        """The 77-token prompt chunks the UNet takes (1 in engine dirs exported before long prompts)."""
        d = self.manifest.components["unet"].spec.inputs[2].shape[1]
        return 1 if isinstance(d, int) else self.manifest.components["unet"].spec.dims[d.name][2]

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

    # -- generation ---------------------------------------------------------------------------
    def __call__(self, prompt: str | GenerateRequest | None = None, /, *, callback: Callback | None = None,
                 **kwargs) -> Result:
        """Generate from a GenerateRequest, or from its fields as keywords (sdrt.runtime.request:
        prompt, negative_prompt, steps, sampler, guidance_scale, seed, width, height, num_images,
        clip_skip, image, strength, mask, latents, schedule_type, eta)."""
        if isinstance(prompt, GenerateRequest):
            req = prompt.replace(**kwargs) if kwargs else prompt
        else:
            req = GenerateRequest.make(**({"prompt": prompt} if prompt is not None else {}), **kwargs)
        plan = self.plan(req)
        self._begin(plan.loras)
        cond, uncond = self._conditioning(plan)
        start = self._start_state(plan)
        x = self._sample(plan, cond, uncond, start, callback)
        pixels = self.decode(x)
        release_free_memory()  # nothing held between generations but the weights
        return Result(images.to_pil(pixels), pixels, plan.seeds, self._metadata(plan))

    def batch_key(self, req: GenerateRequest) -> tuple | None:
        """Requests with equal keys can share their UNet calls (generate_batch): the same latent size,
        schedule, sampler, guidance and noise source. Prompts, seeds, image counts and clip skip may
        differ. None: the request runs alone (an init image, a mask or its own latents)."""
        if req.image is not None or req.mask is not None or req.latents is not None:
            return None
        size = self.manifest.default_image_size
        return (req.width or size, req.height or size, req.steps, samplers.get_sampler(req.sampler).name,
                req.schedule_type, req.eta, req.guidance_scale, req.noise, self._chunk_count(req), self.lora_key(req),
                req.cache_interval)

    def generate_batch(self, requests: list[GenerateRequest], callback: Callback | None = None) -> list[Result]:
        """Several text-to-image requests with one batch_key as one sampling run: every UNet call takes
        all their images. Each image is its solo run's (its noise comes from its own seed's streams;
        only the UNet's batch differs). The callback sees the whole batch."""
        if len({self.batch_key(r) for r in requests} | {None}) != 2:
            raise InputError("generate_batch: the requests must be text-to-image with one batch_key")
        plans = [self.plan(r) for r in requests]
        self._begin(plans[0].loras)
        conds = [self._conditioning(p) for p in plans]
        cond = np.concatenate([c for c, _ in conds])
        uncond = None if conds[0][1] is None else np.concatenate([u for _, u in conds])
        merged = dataclasses.replace(plans[0], seeds=[s for p in plans for s in p.seeds])
        x = self._sample(merged, cond, uncond, self._start_state(merged), callback)
        pixels = self.decode(x)
        release_free_memory()
        results, at = [], 0
        for p in plans:
            own = pixels[at : at + len(p.seeds)]
            at += len(p.seeds)
            results.append(Result(images.to_pil(own), own, p.seeds, self._metadata(p)))
        return results

    def _begin(self, loras: list) -> None:
        """A new generation: a past interrupt() no longer applies; the sessions run with LORAS."""
        self._stop.clear()
        for e in self.engines.values():
            e.resume()
        self.use_loras(loras, load=False)

    def plan(self, req: GenerateRequest) -> Plan:
        """Validate REQ against this engine dir and resolve what it leaves open; no engine runs."""
        req.validate(self.manifest)
        smp = samplers.get_sampler(req.sampler)
        if req.emphasis not in prompts.EMPHASIS:
            raise InputError(f"emphasis {req.emphasis!r}: choose one of {', '.join(prompts.EMPHASIS)}")
        kind = self.manifest.pipeline
        if req.mask is not None and req.image is None:
            raise InputError("a mask needs an init image (--init-image) to inpaint")
        if req.source_prompt is not None:
            _check_cycle(req, smp, kind)
        if kind == "inpaint" and (req.image is None or req.mask is None):
            raise InputError(f"{self.engine_dir} is an inpainting model: give it an init image and a mask "
                             "(--init-image, --mask)")
        self._check_depth(req)
        if req.cache_interval > 1:  # the engine dir has the graphs, before any engine runs
            c = self.manifest.components["unet"]
            feature_cache.pair_for(c, self._cache_graph(c, self.loras.arrays.get("unet")), self.engine_dir)
        image, width, height = None, req.width, req.height
        if req.image is not None:
            if "vae_encoder" not in self.manifest.components:
                raise InputError(f"{self.engine_dir}: no vae_encoder engine, needed for an init image")
            image = images.load_image(req.image)
            w0, h0 = images.image_size(image)
            width = width or w0 - w0 % self.scale_factor
            height = height or h0 - h0 % self.scale_factor
            req.replace(width=width, height=height).validate(self.manifest)  # the image's own size, too
        width = width or self.manifest.default_image_size
        height = height or self.manifest.default_image_size
        schedule = smp.make_schedule(self.manifest.scheduler_config, req.steps, req.schedule_type)
        if image is not None:
            schedule = schedule.tail(smp.img2img_start(req.steps, req.strength))
        seed = noise.new_seed() if req.seed is None or req.seed == -1 else req.seed
        seeds = [int(seed) + i for i in range(req.num_images)]
        options = smp.options_for(req.eta if req.source_prompt is None or req.eta is not None else cycle.DEFAULT_ETA)
        plan = Plan(req, smp, schedule, options, seeds, width, height, image, kind, self.lora_uses(req))
        if req.latents is not None and np.shape(req.latents) != self._noise_shape(plan):
            raise InputError(f"latents: shape {np.shape(req.latents)}, expected {self._noise_shape(plan)}")
        return plan

    def _check_depth(self, req: GenerateRequest) -> None:
        """depth2img models take an init image and a depth map (the user's, or the exported estimator's
        from the image); other models take no depth map."""
        if self.manifest.pipeline != "depth2img":
            if req.depth_map is not None:
                raise InputError(f"depth_map: {self.engine_dir} is a {self.manifest.pipeline} model; depth maps are "
                                 "for depth2img models (SD 2 depth)")
            return
        if req.image is None or req.mask is not None:
            raise InputError(f"{self.engine_dir} is a depth2img model: give it an init image (--init-image) and no "
                             "mask; its depth comes from the image, or from --depth-map")
        if req.depth_map is None and DEPTH_ESTIMATOR not in self.manifest.components:
            raise InputError(f"{self.engine_dir} is a depth2img model exported without a depth estimator (single "
                             "files carry none): give --depth-map, or re-export with --config DIR naming a diffusers "
                             "depth2img folder (depth_estimator/, feature_extractor/)")

    def _noise_shape(self, plan: Plan) -> tuple:
        f = self.scale_factor
        return (len(plan.seeds), self.manifest.dims.latent_channels, plan.height // f, plan.width // f)

    # -- phases -------------------------------------------------------------------------------
    def encode_prompt(self, text: str, clip_skip: int, emphasis: str = prompts.DEFAULT_EMPHASIS) -> np.ndarray:
        """(77 * chunks, D): TEXT in A1111's syntax (sdrt.runtime.prompts), each chunk from CLIP layer
        -clip_skip (after the final LayerNorm), weighted as EMPHASIS says."""
        return self._encode_texts([text], clip_skip, emphasis)[0]

    def encode_prompts(self, texts: list[str], clip_skip: int, emphasis: str = prompts.DEFAULT_EMPHASIS) -> np.ndarray:
        """(len(texts), 77 * chunks, D): encode_prompt of each, padded to the longest (pad_chunks)."""
        return np.stack(self.pad_chunks(self._encode_texts(texts, clip_skip, emphasis), clip_skip))

    def _encode_texts(self, texts: list[str], clip_skip: int, emphasis: str) -> list[np.ndarray]:
        """Each text's (77 * chunks, D) embedding; the chunks not in the cache in one text-encoder call."""
        chunked = [self._chunks(t, emphasis) for t in texts]
        for text, c in zip(texts, chunked):
            self._check_chunks(len(c), text)
        ids = np.concatenate([c.ids for c in chunked])
        fixes = [f for c in chunked for f in c.fixes]
        plain = [i for i, f in enumerate(fixes) if not f]
        raw = np.empty((len(ids), *self._chunk_shape()), np.float32)
        if plain:
            raw[plain] = self._encode_chunks(ids[plain], clip_skip)
        if len(plain) < len(ids):
            rest = [i for i, f in enumerate(fixes) if f]
            raw[rest] = self._encode_with_vectors(ids[rest], [fixes[i] for i in rest], clip_skip)
        out, at = [], 0
        for c in chunked:
            out.append(np.concatenate([prompts.emphasize(z, w, emphasis)
                                       for z, w in zip(raw[at : at + len(c)], c.weights)]))
            at += len(c)
        return out

    def pad_chunks(self, embeddings: list[np.ndarray], clip_skip: int) -> list[np.ndarray]:
        """Prompts of fewer chunks than the longest get the empty prompt's chunk appended until they
        match (A1111's "pad prompt/negative prompt"): the UNet runs them in one batch."""
        longest = max(len(e) for e in embeddings)
        if all(len(e) == longest for e in embeddings):
            return embeddings
        empty = self.encode_prompt("", clip_skip)
        return [np.concatenate([e, *[empty] * ((longest - len(e)) // len(empty))]) for e in embeddings]

    def _chunks(self, text: str, emphasis: str) -> prompts.Chunks:
        return prompts.chunks(self.tokenizer, text, emphasis, self.library if len(self.library) else None)

    def _chunk_shape(self) -> tuple[int, int]:
        return self.manifest.dims.text_length, self.manifest.dims.text_hidden

    def _encode_with_vectors(self, ids: np.ndarray, fixes: list, clip_skip: int) -> np.ndarray:
        """Chunks holding textual-inversion embeddings: their token embeddings looked up in the token
        table, the embeddings' vectors put in after BOS + offset, through the text encoder's embeds graph."""
        engine, table = self._embeds_engine()
        x = np.asarray(table[ids], np.float32)
        for row, chunk_fixes in zip(x, fixes):
            for offset, e in chunk_fixes:
                if e.vectors.shape[1] != x.shape[2]:
                    raise InputError(f"embedding {e.name!r}: vectors of width {e.vectors.shape[1]}, this model's "
                                     f"text encoder takes {x.shape[2]} (an embedding for another model?)")
                n = min(len(row) - offset - 1, len(e.vectors))
                row[offset + 1 : offset + 1 + n] = e.vectors[:n]
        return engine.run({"inputs_embeds": x.astype(table.dtype)})[0][-clip_skip]

    def _embeds_engine(self):
        """The embeds graph's backend and the token table (memory-mapped, read-only)."""
        from sdrt.components import ComponentSpec, TensorSpec

        c, rec = self.manifest.components["text_encoder"], self.manifest.token_table
        if rec is None or "embeds" not in c.targets:
            raise InputError(f"{self.engine_dir} was exported before textual inversion (no embeds graph): "
                             "re-export it to use embeddings")
        if EMBEDS not in self.engines:
            ids = c.spec.inputs[0]
            inputs = (TensorSpec("inputs_embeds", rec["dtype"], (*ids.shape, rec["shape"][1])),)
            spec = ComponentSpec(c.spec.name, inputs, c.spec.outputs, c.spec.dims)
            path = self.engine_dir / c.targets["embeds"].file
            self.engines[EMBEDS] = load_backend(path, spec, "onnx", self._provider_for("onnx"),
                                                self.loras.arrays.get("text_encoder"))
            self._token_table = np.memmap(self.engine_dir / rec["file"], dtype=rec["dtype"], mode="r",
                                          offset=rec["offset"], shape=tuple(rec["shape"]))
        return self.engines[EMBEDS], self._token_table

    def _encode_chunks(self, ids: np.ndarray, clip_skip: int) -> np.ndarray:
        """(n, 77) token ids -> (n, 77, D) CLIP outputs, through the cache of recent chunks."""
        keys = [(tuple(row), clip_skip, self.loras.keys["text_encoder"]) for row in ids.tolist()]
        with self._embedding_lock:
            cached = {k: self._embeddings[k] for k in keys if k in self._embeddings}
        todo = sorted({k for k in keys if k not in cached}, key=keys.index)
        if todo:
            hidden = self.engine("text_encoder")(np.array([k[0] for k in todo], np.int64))  # (layers, n, 77, D)
            with self._embedding_lock:
                for k, row in zip(todo, hidden[-clip_skip]):
                    cached[k] = self._embeddings[k] = row
                    self._embeddings.move_to_end(k)
                while len(self._embeddings) > EMBEDDING_CACHE:
                    self._embeddings.popitem(last=False)
        return np.stack([cached[k] for k in keys])

    def _check_chunks(self, n: int, text: str) -> None:
        if n > self.max_chunks:
            why = " (exported before sdrt read long prompts: re-export it)" if self.max_chunks == 1 else ""
            raise InputError(f"prompt: {n} chunks of 75 tokens ({text[:40]!r}...); the UNet of {self.engine_dir} "
                             f"takes at most {self.max_chunks}{why}")

    def _chunk_count(self, req: GenerateRequest) -> int:
        texts = [lora.strip_tags(req.prompt)] + ([req.negative_prompt or ""] if req.guidance_scale > 1 else [])
        return max(len(self._chunks(t, req.emphasis)) for t in texts)

    def _conditioning(self, plan: Plan) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 77 * chunks, D) prompt embeddings, and the negative prompt's when guidance is on; all
        padded to one chunk count (pad_chunks)."""
        req, n = plan.req, len(plan.seeds)
        texts = [lora.strip_tags(req.prompt)]  # A1111 takes <lora:...> out of the prompt (not the negative one)
        if req.guidance_scale > 1:  # diffusers: guidance <= 1 runs the conditional pass only
            texts.append(req.negative_prompt or "")
        if req.source_prompt is not None:  # CycleDiffusion: [source; target] rows (sdrt.runtime.cycle)
            texts.append(req.source_prompt)
        embs = self.pad_chunks(self._encode_texts(texts, req.clip_skip, req.emphasis), req.clip_skip)
        cond = np.repeat(embs[0][None], n, axis=0)
        uncond = np.repeat(embs[1][None], n, axis=0) if req.guidance_scale > 1 else None
        if req.source_prompt is not None:
            cond = np.concatenate([np.repeat(embs[-1][None], n, axis=0), cond])
            uncond = None if uncond is None else np.concatenate([uncond, uncond])
        release_free_memory()  # each phase starts from a small arena
        return cond, uncond

    def _start_state(self, plan: Plan) -> StartState:
        """The state before the first step: noise (txt2img, inpainting at full strength) or the init
        image's latents noised to the first level; inpainting's extra channels or per-step blend.
        Draws are made in diffusers' order (sdrt.runtime.noise)."""
        req, schedule, smp = plan.req, plan.schedule, plan.sampler
        draws = noise.Noise(req.noise, plan.seeds)
        mask = None if req.mask is None else images.to_mask(req.mask, plan.width, plan.height)  # 1: repaint
        x0 = None
        if plan.image is not None and not (plan.kind == "inpaint" and req.strength >= 1):
            x0 = self.encode_image(plan.image, plan.width, plan.height, draws, shared=mask is not None)
            release_free_memory()
        latents = req.latents if req.latents is not None else draws.draw(noise.INITIAL, self._noise_shape(plan))
        noise0 = np.asarray(latents).astype(np.float64)
        if plan.image is None:
            return StartState(samplers.initial_state(smp, schedule, noise0), draws=draws)
        extra = None
        if plan.kind == "inpaint":
            extra = self._inpaint_channels(plan, mask, draws)
        elif plan.kind == "depth2img":
            extra = self._depth_channel(plan)
        elif mask is not None:  # diffusers encodes the masked image for any UNet (a 4-channel one ignores it)
            draws.skip(noise.MASKED_POSTERIOR, self._noise_shape(plan), shared=True)
        if mask is not None and req.strength >= 1:  # inpainting at full strength: pure noise
            x = samplers.initial_state(smp, schedule, noise0)
        else:
            x = x0 + noise0 * schedule.sigmas[0] if len(schedule) else x0
        hook = None
        if mask is not None and plan.kind != "inpaint":  # an ordinary model: keep the image outside the mask
            hook = inpaint_blend(self._latent_mask(mask), x0, noise0, schedule, smp.space)
        return StartState(x, extra, hook, draws, x0)

    def _latent_mask(self, mask: np.ndarray) -> np.ndarray:
        return mask[:, :, ::self.scale_factor, ::self.scale_factor]  # torch's nearest resize, as diffusers

    def _inpaint_channels(self, plan: Plan, mask: np.ndarray, draws: noise.Noise) -> np.ndarray:
        """diffusers' StableDiffusionInpaintPipeline with a 9-channel UNet: the mask and the masked
        image's latents."""
        kept = images.to_model_input(plan.image, plan.width, plan.height) * (mask < 0.5)
        m = np.repeat(self._latent_mask(mask), len(plan.seeds), axis=0)
        extra = np.concatenate([m, self._encode(kept, draws, noise.MASKED_POSTERIOR, shared=True)], axis=1)
        release_free_memory()
        return extra

    def _depth_channel(self, plan: Plan) -> np.ndarray:
        """depth2img's UNet channel, (N, 1, h, w) in [-1, 1]: the user's depth map, or the estimator's
        from the init image as given (diffusers' prepare_depth_map), resized to the latents."""
        if plan.req.depth_map is not None:
            d = depth.load_depth_map(plan.req.depth_map)
        else:
            pixels = self.manifest.depth_processor(images.as_pil(plan.image, "init image"))
            d = self.engine(DEPTH_ESTIMATOR).run({"pixel_values": pixels})[0]
            self.unload(DEPTH_ESTIMATOR)  # once per generation: its memory goes back before sampling
        f = self.scale_factor
        return np.repeat(depth.condition(d, plan.height // f, plan.width // f), len(plan.seeds), axis=0)

    def _sample(self, plan: Plan, cond, uncond, start: StartState, callback: Callback | None) -> np.ndarray:
        """The sampler loop; returns the final latents (N, C, h, w) float64. With feature caching the
        UNet calls bypass unet_gate: a server's merged calls can't mix full and shallow graphs."""
        if plan.req.cache_interval > 1:
            return self._sample_with(self.cached_unet(plan.req.cache_interval), plan, cond, uncond, start, callback)
        unet = self.engine("unet")
        with self.unet_gate(unet) if self.unet_gate else contextlib.nullcontext(unet) as unet:
            return self._sample_with(unet, plan, cond, uncond, start, callback)

    def _sample_with(self, unet, plan: Plan, cond, uncond, start: StartState, callback) -> np.ndarray:
        schedule, smp, total = plan.schedule, plan.sampler, len(plan.schedule)
        denoise = Denoiser(unet, schedule, self.manifest.prediction_type, cond, uncond, _guidance(plan), start.extra)

        def step_end(i, x):
            if self._stop.is_set():
                raise Interrupted("interrupted")
            if isinstance(unet, feature_cache.CachedUNet):
                unet.end_step(i)
            if start.hook is not None:
                x = start.hook(i, x)  # the samplers go on from x, as diffusers' loop from its latents
            if callback is not None:
                callback(i, total, x, denoise.last_x0)
            return x

        if plan.req.source_prompt is not None:
            x = cycle.sample_cycle(denoise, start.x, start.clean, schedule, eta=plan.options.get("eta", 0.0),
                                   noise=start.draws.sampler(), callback=step_end)
        else:
            x = smp.fn(denoise, start.x, schedule, noise=start.draws.sampler(), callback=step_end, **plan.options)
        if total:
            x = samplers.final_latents(smp, schedule, x)
        release_free_memory()  # the UNet's working set, before the decoder's peak
        return x

    def encode_image(self, image, width: int, height: int, draws: noise.Noise, shared: bool = False) -> np.ndarray:
        """One posterior sample per image, from that image's noise: (N, 4, h, w) float64 (shared:
        see noise.Noise.draw)."""
        return self._encode(images.to_model_input(image, width, height), draws, noise.POSTERIOR, shared)

    def _encode(self, arr: np.ndarray, draws: noise.Noise, use: int, shared: bool = False) -> np.ndarray:
        """(1, 3, H, W) in [-1, 1] -> a posterior sample per image, its noise drawn for `use`."""
        mean, std = self.engine("vae_encoder").run({"image": arr.astype(np.float32)})
        eps = draws.draw(use, (len(draws.seeds), *mean.shape[1:]), shared)
        return mean.astype(np.float64) + std.astype(np.float64) * eps

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(N, 4, h, w) latents -> (N, H, W, 3) float32 pixels in [0, 1]; one image at a time (memory)."""
        out = [self._decode_one(latents[i : i + 1].astype(np.float32)) for i in range(len(latents))]
        image = np.concatenate(out)
        return images.from_model_output(image).transpose(0, 2, 3, 1).astype(np.float32)

    def _decode_one(self, latent: np.ndarray) -> np.ndarray:
        """One image through the VAE decoder; where an fp16 decoder overflows (NaN / inf) and the
        export kept the fp32 one (FP32_FALLBACK), through that instead."""
        try:
            return self.engine("vae_decoder")(latent)
        except NonFiniteOutput:
            fallback = self.manifest.components["vae_decoder"].targets.get(FP32_FALLBACK)
            if fallback is None:
                raise
            if FP32_DECODER not in self.engines:
                log.warning("the fp16 VAE decoder overflowed on this image; decoding with the fp32 decoder")
                spec = self.manifest.components["vae_decoder"].spec
                self.engines[FP32_DECODER] = load_backend(self.engine_dir / fallback.file, spec, "onnx", self.provider)
            return self.engines[FP32_DECODER](latent)

    def _metadata(self, plan: Plan) -> list[str]:
        """A1111's `parameters` text for each image (its keys, in its order)."""
        req, source = plan.req, self.manifest.source

        def settings(seed: int) -> dict:
            return {
                "Steps": req.steps, "Sampler": plan.sampler.display,
                "Schedule type": req.schedule_type.replace("_", " ").title() if req.schedule_type else None,
                "CFG scale": req.guidance_scale, "Seed": seed, "Size": f"{plan.width}x{plan.height}",
                "Model hash": source.get("sha256", "")[:10], "Model": Path(str(source.get("name", ""))).name,
                "Clip skip": req.clip_skip if req.clip_skip != 1 else None,
                "Denoising strength": req.strength if plan.image is not None else None, "Eta": req.eta,
                "RNG": noise.RNG_FIELD[req.noise],
                # A1111 names a mode other than its default when the prompts have brackets to weigh
                "Emphasis": req.emphasis if req.emphasis != prompts.DEFAULT_EMPHASIS and any(
                    c in f"{req.prompt}{req.negative_prompt or ''}" for c in "([") else None,
                "Lora hashes": lora_hashes, "TI hashes": ti_hashes,
                "Cache interval": req.cache_interval if req.cache_interval > 1 else None,
            }

        used = {e.name: e for t in (lora.strip_tags(req.prompt), req.negative_prompt or "")
                for e in self._chunks(t, req.emphasis).embeddings}  # A1111's "TI hashes"
        ti_hashes = _hashes((n, e.shorthash) for n, e in used.items())
        lora_hashes = _hashes((u.name, self.loras.file(u).shorthash) for u in plan.loras)
        # the request's own LoRAs (not named in the prompt) are written as A1111 tags: the PNG reproduces
        prompt = req.prompt + "".join(f" <lora:{u.name}:{_weights(u)}>" for u in plan.loras[:len(req.loras or ())])
        return [images.a1111_parameters(prompt, req.negative_prompt or "", settings(s)) for s in plan.seeds]


def _hashes(pairs) -> str | None:
    """A1111's `TI hashes` / `Lora hashes` value: "name: hash, ..." (names without its separators)."""
    return ", ".join(f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in pairs) or None


def _weights(use) -> str:
    return f"{use.te:g}" if use.te == use.unet else f"{use.te:g}:{use.unet:g}"


def _guidance(plan: Plan):
    """The guidance scale; CycleDiffusion's per row: the source prompt's rows, then the target's."""
    req = plan.req
    if req.source_prompt is None:
        return req.guidance_scale
    n = len(plan.seeds)
    return np.repeat([req.source_guidance_scale, req.guidance_scale], n)[:, None, None, None]


def _check_cycle(req: GenerateRequest, smp, kind: str) -> None:
    """What CycleDiffusion (a source prompt) needs: an init image, no mask, an ordinary model, DDIM."""
    if req.image is None:
        raise InputError("source_prompt (CycleDiffusion) needs an init image (--init-image) that it describes")
    if req.mask is not None or kind != "txt2img":
        raise InputError("source_prompt (CycleDiffusion) works on a whole image with an ordinary model: no mask, "
                         f"no inpainting or depth2img model (this is {kind})")
    if smp.name != "ddim":
        raise InputError(f"source_prompt (CycleDiffusion) runs DDIM, not {smp.name}: use --sampler ddim "
                         f"(--eta sets its noise, default {cycle.DEFAULT_ETA})")


def inpaint_blend(mask, x0, noise0, schedule, space):
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
