"""A UNet backend that runs a guided batch's shared part once (sdrt.kernels.guidance).

It holds two engines over the same weights: the plain graph and its guided variant. A call whose
batch is two equal halves in the shared inputs (latents and timesteps: every classifier-free guidance
step) runs the guided graph on one half; any other call (no guidance, a server's merged calls,
CycleDiffusion's source and target) runs the plain graph. The guided engine is loaded with the
backend (guidance is the default), the plain one on the first call that needs it: a pipeline that
always guides never loads it, one that mixes both holds two sessions of the UNet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdrt.components import GUIDED_SHARED as SHARED
from sdrt.components import ComponentSpec, guided_spec
from sdrt.runtime.backends.base import Backend


def guided_halves(sample: np.ndarray, timestep: np.ndarray) -> int:
    """N where SAMPLE and TIMESTEP are each two equal halves of N rows (a guided batch), else 0."""
    n = len(sample) // 2
    if not n or len(sample) != 2 * n or len(timestep) != 2 * n:
        return 0
    return n if np.array_equal(timestep[:n], timestep[n:]) and np.array_equal(sample[:n], sample[n:]) else 0


class GuidedBackend(Backend):
    """LOAD(path, spec) -> Backend makes each engine (the pipeline's provider and weights)."""

    def __init__(self, path: Path, guided: Path, spec: ComponentSpec, load: Callable[[Path, ComponentSpec], Backend],
                 provider: str = "cpu"):
        self.guided_path, self.load = Path(guided), load
        self.engines: dict[str, Backend] = {}
        self.guided_calls = 0
        super().__init__(path, spec, provider)

    def _load(self) -> None:
        self._engine("guided")

    def _engine(self, kind: str) -> Backend:
        if kind not in self.engines:
            if kind == "guided":
                self.engines[kind] = self.load(self.guided_path, guided_spec(self.spec))
            else:
                self.engines[kind] = self.load(self.path, self.spec)
            if self._stop.is_set():  # interrupted while it loaded
                self.engines[kind].interrupt()
        return self.engines[kind]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = guided_halves(*(feeds[k] for k in SHARED))
        if n:
            self.guided_calls += 1
            return self._engine("guided").run({k: v[:n] if k in SHARED else v for k, v in feeds.items()})
        return self._engine("plain").run(feeds)

    def _terminate(self) -> None:
        for engine in list(self.engines.values()):
            engine.interrupt()

    def resume(self) -> None:
        super().resume()
        for engine in list(self.engines.values()):
            engine.resume()

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()
