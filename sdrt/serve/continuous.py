"""Continuous batching at step level: generations run in threads of their own, each with its own
sampler, step count, guidance and size, and their UNet calls meet here. Calls that arrive together
(every running generation has one waiting, or a short window has passed since the first) run as one
UNet call per latent shape, with a timestep per row; each caller gets its own rows back. A generation
joins at its first UNet call and leaves after its last, so the batch changes at every step. Where every
merged call is a guided batch ([x; x]), the merged batch is one too (all the calls' first halves, then
all their second halves), so the UNet computes the halves' shared part once (sdrt.kernels.guidance).

`StepBatcher.gate` is the Pipeline's `unet_gate`: entering it makes the thread a member (the batcher
waits for members' calls), leaving it (done, cancelled or failed) lets the others go on without it.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np

from sdrt.runtime.backends.guided import guided_halves


class _Call:
    __slots__ = ("inputs", "arrived", "result", "error")

    def __init__(self, inputs):
        self.inputs, self.arrived, self.result, self.error = inputs, time.monotonic(), None, None


class StepBatcher:
    """window: seconds the first waiting call waits for the other members' (their NumPy work between
    UNet calls is far shorter than a UNet call)."""

    def __init__(self, window: float = 0.01, on_call=None):
        self.window, self.on_call = window, on_call  # on_call(rows, members): a merged UNet call ran
        self._cond = threading.Condition()
        self._pending: list[_Call] = []
        self._members = 0
        self._busy = False
        self.calls = 0  # UNet calls run
        self.merged = 0  # calls that served more than one generation

    @contextlib.contextmanager
    def gate(self, unet):
        """The Pipeline's unet_gate: this thread's UNet calls go through the batcher while inside."""
        with self._cond:
            self._members += 1
        try:
            yield lambda *inputs: self._call(unet, inputs)
        finally:
            with self._cond:
                self._members -= 1
                self._cond.notify_all()  # the others may now all be waiting

    def _call(self, unet, inputs: tuple) -> np.ndarray:
        call = _Call(inputs)
        with self._cond:
            self._pending.append(call)
            self._cond.notify_all()
            while call.result is None and call.error is None:
                if not self._busy and self._pending and self._ready():
                    batch, self._pending, self._busy = self._pending, [], True
                    self._cond.release()
                    try:
                        self._run(unet, batch)  # this thread runs everyone's call
                    finally:
                        self._cond.acquire()
                        self._busy = False
                        self._cond.notify_all()
                else:
                    self._cond.wait(self.window / 4)
        if call.error is not None:
            raise call.error
        return call.result

    def _ready(self) -> bool:
        return len(self._pending) >= self._members or time.monotonic() - self._pending[0].arrived >= self.window

    def _run(self, unet, batch: list[_Call]) -> None:
        """One UNet call per latent shape (sizes can't share a batch); rows go back to their callers."""
        groups: dict[tuple, list[_Call]] = {}
        for call in batch:
            sample, _, context = call.inputs
            groups.setdefault((sample.shape[1:], context.shape[1:]), []).append(call)
        for calls in groups.values():
            # guided calls ([x; x] each) merge as [their first halves; their second halves]
            pieces = 2 if len(calls) > 1 and all(guided_halves(*c.inputs[:2]) for c in calls) else 1
            split = [[np.split(x, pieces) for x in c.inputs] for c in calls]  # call -> input -> pieces
            try:
                out = unet(*(np.concatenate([s[k][p] for p in range(pieces) for s in split]) for k in range(3)))
            except BaseException as e:  # noqa: BLE001 - every caller of this batch raises it
                for c in calls:
                    c.error = e
                continue
            size, at = len(out) // pieces, 0
            for c in calls:
                rows = len(c.inputs[0]) // pieces
                c.result = np.concatenate([out[p * size + at : p * size + at + rows] for p in range(pieces)])
                at += rows
            self.calls += 1
            self.merged += len(calls) > 1
            if self.on_call is not None:
                self.on_call(len(out), len(calls))
