"""The things `sdrt bench` measures ("paths"): sdrt's engines and the eager PyTorch modules they came from.

Every path runs the same workloads: a component on inputs built from the engine's declared specs
(`run`), and a whole generation (`generate`). The eager path runs the very modules export wrapped,
so both sides compute the same outputs from the same inputs.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import numpy as np

from sdrt.errors import InputError
from sdrt.manifest import Manifest

log = logging.getLogger(__name__)


class EnginePath:
    """sdrt engines through ONNX Runtime (the runtime's own Backend objects and Pipeline).
    cache_interval > 1: generations with feature caching (a variant of another path, `cached`)."""

    components = True  # measures the component workloads too

    def __init__(self, engine_dir: Path, provider: str = "cpu", optimized: bool = True, label: str = "sdrt"):
        from sdrt.runtime.pipeline import Pipeline

        self.engine_dir, self.provider, self.optimized = Path(engine_dir), provider, optimized
        self.pipe = Pipeline.load(engine_dir, provider=provider, optimized=optimized)
        resolved = self.pipe.provider  # "auto" named by what it chose
        self.name = label if resolved == "cpu" else f"{label}-{resolved}"
        self.cache_interval = 1
        self.base = self.name  # the path whose full-compute image this one's is compared with

    def cached(self, interval: int) -> EnginePath:
        """This path's generations with cache_interval INTERVAL, on the same pipeline (its engines are
        shared; the UNet's full and shallow graphs load beside them)."""
        other = copy.copy(self)
        other.name, other.cache_interval, other.components = f"{self.name}+cache{interval}", interval, False
        return other

    def cold_args(self) -> list[str]:
        """The arguments `python -m sdrt.bench.cold` rebuilds this path from."""
        return ["sdrt", str(self.engine_dir), self.provider, "1" if self.optimized else "0", str(self.cache_interval)]

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> None:
        self.pipe.engine(component).run(feeds)

    def generate(self, prompt: str, steps: int, size: int, batch: int, sampler: str, seed: int) -> np.ndarray:
        return self.pipe(prompt, steps=steps, width=size, height=size, num_images=batch, sampler=sampler,
                         seed=seed, cache_interval=self.cache_interval).pixels

    def unload(self, component: str) -> None:
        self.pipe.unload(component)

    def close(self) -> None:
        self.pipe.close()


def rebuild_source(manifest: Manifest, scratch: Path, who: str):
    """The diffusers pipeline the engines were exported from (what export did to it included: its
    LoRAs, its prediction type), its weights checked against the manifest's sha256."""
    from sdrt.export import lora, sources

    try:
        config = manifest.source.get("config")
        loaded = sources.load_source(str(manifest.source["name"]), scratch, Path(config) if config else None)
        lora.apply(loaded.pipe, [lora.Lora(Path(x["file"]), x["scale"]) for x in manifest.source.get("loras", [])])
    except InputError as e:
        raise InputError(f"{who}: cannot rebuild the engine's source: {e}") from None
    pipe = loaded.pipe
    pipe.scheduler.register_to_config(prediction_type=manifest.prediction_type)
    digest = sources.content_hash(pipe)
    if digest != manifest.source.get("sha256"):
        raise InputError(f"{who}: the source's weights no longer match the engines "
                         f"(sha256 {digest[:12]} != {str(manifest.source.get('sha256'))[:12]})")
    return pipe


class EagerPath:
    """diffusers' PyTorch modules and StableDiffusionPipeline, rebuilt from the engine's source: fp32
    on the CPU, fp16 on a CUDA GPU (device "cuda", what GPU users run). Needs the `export` extra. The
    weights must hash to the manifest's sha256."""

    name = "eager"
    components = True

    def cold_args(self) -> list[str]:
        return ["eager", str(self.engine_dir), self.device, "0", "1"]

    def __init__(self, manifest: Manifest, engine_dir: Path, device: str = "cpu"):
        self.engine_dir, self.device = Path(engine_dir), device
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise InputError(f"eager path on the GPU: torch {torch.__version__} has no CUDA device "
                             "(a CPU build?); install a CUDA build of torch for GPU ratios")

        self.torch = torch
        self._scratch = tempfile.TemporaryDirectory(prefix="sdrt-bench-")
        self.pipe = rebuild_source(manifest, Path(self._scratch.name), "eager path")
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.dtype = torch.float16 if device == "cuda" else torch.float32
        if device == "cuda":
            self.pipe.to("cuda", self.dtype)
        self._modules = {}
        self.flops: dict[str, int] = {}

    def _module(self, component: str):
        from sdrt.export.onnx_export import wrap

        if component not in self._modules:
            self._modules[component] = wrap(component, self.pipe)
        return self._modules[component]

    def _tensor(self, array: np.ndarray):
        t = self.torch.from_numpy(array).to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> None:
        module = self._module(component)
        with self.torch.inference_mode():
            module(*(self._tensor(v) for v in feeds.values()))
        if self.device == "cuda":
            self.torch.cuda.synchronize()  # the time of the work, not of queueing it

    def count_flops(self, component: str, feeds: dict[str, np.ndarray]) -> int:
        """FLOPs of one call, counted by torch's FlopCounterMode (matmuls and convolutions)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.run(component, feeds)
        return int(counter.get_total_flops())

    def generate(self, prompt: str, steps: int, size: int, batch: int, sampler: str, seed: int) -> np.ndarray:
        import diffusers

        from sdrt.runtime.samplers import get_sampler

        cls, overrides = get_sampler(sampler).diffusers_config()
        self.pipe.scheduler = getattr(diffusers, cls).from_config(self.scheduler_config, **overrides)
        # a generator per image, seeded seed + i: sdrt's default noise (torch-cpu), so images compare (PSNR)
        generator = [self.torch.Generator().manual_seed(seed + i) for i in range(batch)]
        with self.torch.inference_mode():
            return self.pipe(prompt, num_inference_steps=steps, width=size, height=size,
                             num_images_per_prompt=batch, generator=generator, output_type="np").images

    def unload(self, component: str) -> None:
        self._modules.pop(component, None)

    def close(self) -> None:
        self._modules.clear()
        self._scratch.cleanup()
