"""The backend interface: load one component, run it on NumPy feeds, close it (Polygraphy's runner).

The base class checks every call's inputs against the component's declared spec (from the manifest),
refuses NaN / inf outputs (a corrupt or overflowing engine must not give an image), keeps the time
spent, tells observers about each call (before it; `finished`, after it with its outputs), and turns
an interrupt into `Interrupted`. A backend implements `_load`, `_run`, `close`, and `_terminate` where
it can stop a call already running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdrt.components import ComponentSpec
from sdrt.errors import InputError, Interrupted, NonFiniteOutput


class Backend:
    def __init__(self, path: Path, spec: ComponentSpec, provider: str = "cpu", weights: dict | None = None):
        self.path = Path(path)
        self.spec = spec
        self.provider = provider  # an sdrt provider name (sdrt.runtime.backends.PROVIDERS)
        self.weights = weights or {}  # initializer name -> array replacing the graph's (LoRAs; ONNX Runtime only)
        self.seconds = 0.0  # time spent in run()
        self.calls = 0
        self.observers: list[Callable[[dict[str, np.ndarray]], None]] = []  # called with each call's feeds
        self.finished: list[Callable[[dict, list[np.ndarray]], None]] = []  # then with its feeds and outputs
        self._stop = threading.Event()
        self._load()

    def _load(self) -> None:
        raise NotImplementedError

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _terminate(self) -> None:
        """Stop a call now running in another thread, if the runtime can (ONNX Runtime can)."""

    def interrupt(self) -> None:
        """From any thread: the running call stops (where the runtime allows) and later calls raise
        Interrupted until `resume()`."""
        self._stop.set()
        self._terminate()

    def resume(self) -> None:
        self._stop.clear()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the order of spec.outputs."""
        try:
            self.spec.check_feeds(feeds)
        except ValueError as e:
            raise InputError(str(e)) from None
        for observe in self.observers:
            observe(feeds)
        if self._stop.is_set():
            raise Interrupted(f"{self.spec.name}: interrupted")
        t0 = time.perf_counter()
        try:
            out = self._run(feeds)
        except Exception:
            if self._stop.is_set():
                raise Interrupted(f"{self.spec.name}: interrupted") from None
            raise
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        for t, o in zip(self.spec.outputs, out):
            if not np.isfinite(o).all():
                raise NonFiniteOutput(f"{self.spec.name}: its output {t.name} has NaN or inf ({self.path}); the "
                                      f"engine's weights may be corrupt (sdrt verify {self.path.parent.parent})")
        for done in self.finished:
            done(feeds, out)
        return out

    def __call__(self, *args: np.ndarray) -> np.ndarray:
        """Positional inputs in spec order; the first output."""
        return self.run({t.name: a for t, a in zip(self.spec.inputs, args)})[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
