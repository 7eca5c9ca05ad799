"""Seeded noise. Image i of a call with seed s draws everything from seed s + i, so an image is the
same whatever the batch size; each use (initial noise, VAE posterior, sampler) has its own stream."""

from __future__ import annotations

import numpy as np

INITIAL, POSTERIOR, SAMPLER, MASKED_POSTERIOR = 0, 1, 2, 3  # stream ids (the last: inpainting's masked image)


def new_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1)[0] & 0x7FFFFFFF)


class ImageNoise:
    def __init__(self, seeds: list[int], stream: int):
        self._rngs = [np.random.default_rng([s, stream]) for s in seeds]

    def __call__(self, shape: tuple) -> np.ndarray:
        """(N, *shape[1:]) standard normal, row i from image i's stream (float64)."""
        return np.stack([r.standard_normal(shape[1:]) for r in self._rngs])


def randn(seeds: list[int], stream: int, shape: tuple) -> np.ndarray:
    """shape[0] == len(seeds)."""
    return ImageNoise(seeds, stream)(shape)
