"""Seeded noise, from one of several sources (`noise=` / `--noise`). Image i of a call with seed s
uses seed s + i, so an image is the same whatever the batch size.

- `torch-cpu` (the default): torch's CPU generator per image (sdrt.runtime.rng), drawn in diffusers'
  order. Reproduces diffusers with `generator=[torch.Generator("cpu").manual_seed(s + i) ...]` (at
  batch 1, `manual_seed(s)`).
- `sdrt`: NumPy streams per image and use (initial noise, VAE posterior, sampler, masked image),
  independent of order: sdrt's own images from before sources existed.
- `a1111-gpu`: A1111's NV source (Philox) per image, in A1111's order. Reproduces A1111's default
  (torch.randn on an NVIDIA GPU) on any device.
- `a1111-cpu`: torch's CPU generator per image, in A1111's order: A1111 with "Random number
  generator source: CPU".

A generation's draws go through one `Noise`; the pipeline makes them in diffusers' order (img2img:
the init image's posterior, then the initial noise; inpainting: the noise, then the masked image's
posterior), which a stateful source needs and `sdrt` ignores. Where diffusers draws from a source
no generator here reproduces (DPM++ SDE's Brownian tree, from torchsde), the image differs; where
A1111 draws from torch's global generator (img2img's VAE posterior), `a1111-*` draw it from sdrt's
streams instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sdrt.runtime.rng import PhiloxGenerator, TorchCpuGenerator

INITIAL, POSTERIOR, SAMPLER, MASKED_POSTERIOR = 0, 1, 2, 3  # what a draw is for (sdrt's stream ids)
SOURCES = ("torch-cpu", "sdrt", "a1111-gpu", "a1111-cpu")
# torch-cpu: the same seed gives diffusers' image (the reference most users compare with), each image
# its own generator (the same image whatever the batch), and no GPU or CPU kind changes it
DEFAULT_SOURCE = "torch-cpu"
# the PNG `parameters` RNG field: A1111's names where A1111 has the source
RNG_FIELD = {"sdrt": "sdrt", "torch-cpu": "torch-cpu", "a1111-gpu": "NV", "a1111-cpu": "CPU"}
_GENERATORS = {"torch-cpu": TorchCpuGenerator, "a1111-cpu": TorchCpuGenerator, "a1111-gpu": PhiloxGenerator}


def new_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1)[0] & 0x7FFFFFFF)


def source_from_rng_field(value: str | None) -> str:
    """An A1111 `RNG` value (absent: A1111's default, the GPU) -> an sdrt source."""
    if not value or value == "GPU":
        return "a1111-gpu"
    for source, field in RNG_FIELD.items():
        if field == value:
            return source
    raise ValueError(f"unknown RNG {value!r}; sdrt reads {', '.join(['GPU', *RNG_FIELD.values()])}")


class Noise:
    """One generation's noise: draw(use, shape) -> (N, *shape[1:]) float64, row i for image i."""

    def __init__(self, source: str, seeds: list[int]):
        if source not in SOURCES:
            raise ValueError(f"unknown noise source {source!r}; choose one of: {', '.join(SOURCES)}")
        self.source = source
        self.seeds = list(seeds)
        make = _GENERATORS.get(source)
        self._generators = [make(s) for s in self.seeds] if make else None
        self._streams: dict[int, list[np.random.Generator]] = {}  # sdrt: one stream per use and image

    def _from_generator(self, use: int) -> bool:
        # A1111 draws a VAE posterior from torch's global generator, not the image's: those come
        # from sdrt's streams
        return self._generators is not None and (self.source == "torch-cpu" or use in (INITIAL, SAMPLER))

    def draw(self, use: int, shape: tuple, shared: bool = False) -> np.ndarray:
        """shared: one draw from the first image's generator for every image, as diffusers' inpainting
        encodes its one init image (and masked image) with generator[0] and repeats the latents."""
        if not self._from_generator(use):
            rngs = self._streams.setdefault(use, [np.random.default_rng([s, use]) for s in self.seeds])
            return np.stack([r.standard_normal(shape[1:]) for r in rngs])
        if shared:
            return np.repeat(self._generators[0].randn((1, *shape[1:])), len(self.seeds), axis=0).astype(np.float64)
        return np.stack([g.randn((1, *shape[1:]))[0] for g in self._generators]).astype(np.float64)

    def skip(self, use: int, shape: tuple, shared: bool = False) -> None:
        """A draw the reference makes and sdrt does not need (its generator state moves on)."""
        if self._from_generator(use):
            self.draw(use, shape, shared)

    def sampler(self) -> Callable[[tuple], np.ndarray]:
        """The samplers' noise(shape) (ancestral and SDE steps)."""
        return lambda shape: self.draw(SAMPLER, shape)


def randn(seeds: list[int], use: int, shape: tuple, source: str = "sdrt") -> np.ndarray:
    """One draw from a fresh Noise (shape[0] == len(seeds))."""
    return Noise(source, seeds).draw(use, shape)
