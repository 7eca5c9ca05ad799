"""IO binding for ONNX Runtime's GPU providers, and CUDA graphs on top of it.

`session.run` copies every input to the GPU, allocates every output there and copies it back, each
call. `IoBinder` instead keeps one set of device buffers per input shape (the sampler loop calls the
UNet with the same shapes every step):
- an input is copied into its buffer (`OrtValue.update_inplace`); a read-only array that was the
  same input last call is not copied again (the Denoiser's text conditioning, read-only and the same
  array every step, stays on the device for the whole generation);
- outputs are written to their device buffers and copied back once.
The sampler itself is NumPy on the host, so the latents cross the bus each step: 64 KB each way at
512 px, microseconds against a UNet step of milliseconds.

With `graphs` (the session created with the CUDA provider's `enable_cuda_graph`), the buffers are
fixed per shape, so ONNX Runtime captures the UNet's kernel launches once per shape (`gpu_graph_id`
run option, one id per shape) and replays the graph on later calls: one launch per step instead of
hundreds. Capture fails when a node runs outside the CUDA provider (ONNX Runtime then raises); the
backend logs why and goes on without graphs (sdrt.runtime.backends.onnxruntime).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from sdrt.components import ComponentSpec

MAX_SHAPES = 8  # buffer sets (and captured graphs) kept per session, least recently used dropped first


@dataclass
class Buffers:
    """One input shape's device buffers, its binding, and the run options naming its graph."""

    inputs: dict
    outputs: list
    binding: object
    run_options: object
    held: dict = field(default_factory=dict)  # input name -> the read-only array now in its buffer


class IoBinder:
    def __init__(self, session, spec: ComponentSpec, device: str = "cuda", device_id: int = 0,
                 graphs: bool = False):
        self.session = session
        self.spec = spec
        self.device, self.device_id = device, device_id
        self.graphs = graphs
        self._buffers: OrderedDict[tuple, Buffers] = OrderedDict()
        self._next_graph = 0

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        key = tuple(feeds[t.name].shape for t in self.spec.inputs)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._allocate(feeds)
            self._buffers[key] = buf
            while len(self._buffers) > MAX_SHAPES:
                self._buffers.popitem(last=False)
        self._buffers.move_to_end(key)
        for t in self.spec.inputs:
            a = feeds[t.name]
            if buf.held.get(t.name) is a:
                continue  # read-only and already there
            buf.inputs[t.name].update_inplace(np.ascontiguousarray(a))
            buf.held[t.name] = None if a.flags.writeable else a
        self.session.run_with_iobinding(buf.binding, buf.run_options)
        return [o.numpy() for o in buf.outputs]

    def terminate(self) -> None:
        for buf in self._buffers.values():
            buf.run_options.terminate = True

    def resume(self) -> None:
        for buf in self._buffers.values():
            buf.run_options.terminate = False

    def _allocate(self, feeds: dict[str, np.ndarray]) -> Buffers:
        import onnxruntime as ort

        sizes = self.spec.check_feeds(feeds)
        new = ort.OrtValue.ortvalue_from_shape_and_type
        inputs = {t.name: new(list(feeds[t.name].shape), np.dtype(t.dtype).type, self.device, self.device_id)
                  for t in self.spec.inputs}
        outputs = [new(list(t.resolve(sizes)), np.dtype(t.dtype).type, self.device, self.device_id)
                   for t in self.spec.outputs]
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for t, value in zip(self.spec.outputs, outputs):
            binding.bind_ortvalue_output(t.name, value)
        run_options = ort.RunOptions()
        if self.graphs:
            run_options.add_run_config_entry("gpu_graph_id", str(self._next_graph))
            self._next_graph += 1
        return Buffers(inputs, outputs, binding, run_options)
