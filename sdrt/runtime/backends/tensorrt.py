"""TensorRT engines (`sdrt export --backend tensorrt`) through TensorRT's Python API and cuda-python."""

from __future__ import annotations

import logging

import numpy as np

from sdrt.errors import InputError, SdrtError
from sdrt.runtime.backends.base import Backend

log = logging.getLogger(__name__)


class TensorRtBackend(Backend):
    """A serialized TensorRT engine, run with TensorRT's Python API and cuda-python's runtime bindings
    (no torch). Device buffers are kept and grown per input shape; a call repeating the previous shapes
    replays a captured CUDA graph. Written against the TensorRT 10 and cuda-python 12 docs; what has run
    on which hardware is in docs/gpu.md."""

    def _load(self) -> None:
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise SdrtError("TensorRT engines need `pip install sdrt[tensorrt]` on a machine with CUDA") from None
        self.trt, self.cudart = trt, cudart
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise InputError(f"cannot load {self.path}: not an engine for this GPU / TensorRT version "
                             "(re-export with --backend tensorrt here)")
        self.context = self.engine.create_execution_context()
        self.stream = self._check(cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # tensor -> (device pointer, bytes)
        self.graph_exec, self.graph_shapes = None, None
        self.graphs = True  # False once a capture failed

    def _check(self, result):
        err, *value = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise SdrtError(f"CUDA error {err} in {self.path}")
        return value[0] if len(value) == 1 else value

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._check(self.cudart.cudaFree(ptr))
            ptr = self._check(self.cudart.cudaMalloc(nbytes))
            self.buffers[name] = (ptr, nbytes)
            self.context.set_tensor_address(name, ptr)
            self._drop_graph()  # addresses changed: the captured graph is stale
        return ptr

    def _run(self, feeds):
        trt, cudart = self.trt, self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        shapes = tuple(feeds[t.name].shape for t in self.spec.inputs)
        for t in self.spec.inputs:
            arr = np.ascontiguousarray(feeds[t.name], dtype=trt.nptype(self.engine.get_tensor_dtype(t.name)))
            if not self.context.set_input_shape(t.name, arr.shape):
                raise InputError(f"{self.spec.name}.{t.name}: shape {list(arr.shape)} is outside the TensorRT "
                                 f"engine's profile ({self.path}; re-export with wider --trt-batch / --trt-sizes)")
            ptr = self._buffer(t.name, arr.nbytes)
            self._check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
        outputs = []
        for t in self.spec.outputs:
            out = np.empty(tuple(self.context.get_tensor_shape(t.name)),
                           dtype=trt.nptype(self.engine.get_tensor_dtype(t.name)))
            outputs.append((self._buffer(t.name, out.nbytes), out))
        if self.graph_exec is not None and shapes == self.graph_shapes:
            self._check(cudart.cudaGraphLaunch(self.graph_exec, self.stream))
        elif shapes == self.graph_shapes and self.graphs:  # second call with these shapes: capture it
            self._capture()
        else:
            self._drop_graph()
            self.graph_shapes = shapes
            self._execute()
        for ptr, out in outputs:
            self._check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self.stream))
        self._check(cudart.cudaStreamSynchronize(self.stream))
        return [out.astype(np.float32, copy=False) for _, out in outputs]

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise SdrtError(f"TensorRT failed to run {self.path}")

    def _capture(self) -> None:
        """Record this call's execution as a CUDA graph and launch it; later calls with the same
        shapes replay it. An engine TensorRT can't capture (e.g. data-dependent shapes) runs without
        graphs from then on."""
        cudart = self.cudart
        self._check(cudart.cudaStreamBeginCapture(
            self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        ok = self.context.execute_async_v3(self.stream)
        err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not ok or err != cudart.cudaError_t.cudaSuccess:
            if err == cudart.cudaError_t.cudaSuccess:
                cudart.cudaGraphDestroy(graph)
            log.warning("%s: CUDA graph capture failed (%s); running without graphs", self.path, err)
            self.graphs = False
            self._execute()
            return
        try:
            self.graph_exec = self._check(cudart.cudaGraphInstantiate(graph, 0))
        finally:
            self._check(cudart.cudaGraphDestroy(graph))  # the instantiated graph doesn't need it
        self._check(cudart.cudaGraphLaunch(self.graph_exec, self.stream))

    def _drop_graph(self) -> None:
        if self.graph_exec is not None:
            self._check(self.cudart.cudaGraphExecDestroy(self.graph_exec))
            self.graph_exec = None

    def close(self) -> None:
        if self.context is None:
            return
        self._drop_graph()
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.cudart.cudaStreamDestroy(self.stream)
        self.buffers = {}
        self.context = self.engine = None
