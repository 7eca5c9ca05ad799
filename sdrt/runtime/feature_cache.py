"""Feature caching in the sampler loop (DeepCache): with cache_interval N, the steps whose index is a
multiple of N run the UNet's full graph and keep its deep feature; the steps between run the shallow
graph on the kept feature (sdrt.kernels.deepcache has the graphs). Every UNet call of a step runs
that step's graph, so samplers calling the UNet twice a step (Heun, DPM2, DPM++ SDE) and multistep
samplers (their history is the model outputs they saw) work unchanged."""

from __future__ import annotations

import numpy as np

from sdrt.components import cache_specs
from sdrt.errors import InputError
from sdrt.manifest import ComponentEntry, FeatureCache

FULL, SHALLOW = "unet:full", "unet:shallow"  # their engines' keys in Pipeline.engines


def pair_for(entry: ComponentEntry, graph: str, engine_dir) -> tuple[FeatureCache, tuple]:
    """The feature-caching pair made from GRAPH (the UNet file the pipeline runs) and the specs of its
    two graphs; InputError where the export made none."""
    pair = entry.feature_cache.get(graph)
    if pair is None:
        why = ("its UNet is a TensorRT engine" if entry.backend == "tensorrt"
               else f"it has none for {graph} (exported before sdrt made them, or with --no-optimize)")
        raise InputError(f"cache_interval needs the UNet's feature-caching graphs and {engine_dir} lacks them: "
                         f"{why}; re-export, or use cache_interval 1")
    return pair, cache_specs(entry.spec, pair.feature)


class CachedUNet:
    """The UNet callable (sample, timestep, context) -> output for one generation. `end_step(i)`:
    the sampler loop finished step i. Counts the calls of each graph."""

    def __init__(self, full, shallow, interval: int, feature: str):
        self.full, self.shallow, self.interval, self.name = full, shallow, interval, feature
        self.step = 0
        self.feature: np.ndarray | None = None
        self.calls = {"full": 0, "shallow": 0}

    def end_step(self, i: int) -> None:
        self.step = i + 1

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
        names = [t.name for t in self.full.spec.inputs]
        feeds = dict(zip(names, (sample, timestep, context)))
        stale = self.feature is None or len(self.feature) != len(sample) or self.feature.shape[2:] != sample.shape[2:]
        if self.step % self.interval == 0 or stale:
            out, self.feature = self.full.run(feeds)
            self.calls["full"] += 1
            return out
        self.calls["shallow"] += 1
        return self.shallow.run(feeds | {self.name: self.feature})[0]
