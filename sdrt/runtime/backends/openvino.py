"""OpenVINO's CPU plugin compiling the engine dir's ONNX files (bf16 or fp32 inference precision)."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import numpy as np

from sdrt.errors import InputError, SdrtError
from sdrt.runtime.backends import amx_attention
from sdrt.runtime.backends.base import Backend

# "openvino" lets it compute in bf16 where the CPU has bf16 units (AVX512_BF16 / AMX: docs/benchmarks.md);
# "openvino-fp32" keeps fp32
OPENVINO_PRECISION = {"openvino": "bf16", "openvino-fp32": "f32"}
SHAPES_ENV, CACHE_ENV = "SDRT_OPENVINO_SHAPES", "SDRT_OPENVINO_CACHE"
log = logging.getLogger(__name__)
STATIC_SHAPES = 2  # compilations a component keeps (e.g. a UNet's batch with and without guidance)


def shapes_mode() -> str:
    mode = os.environ.get(SHAPES_ENV, "static")
    if mode not in ("static", "dynamic"):
        raise InputError(f"{SHAPES_ENV}={mode!r}: choose static or dynamic")
    return mode


def check_openvino(provider: str) -> None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise SdrtError(f"provider {provider}: OpenVINO is not installed (pip install sdrt[openvino])") from None


class OpenVinoBackend(Backend):
    """OpenVINO's CPU plugin compiling the same ONNX file (bf16 or fp32 inference precision).

    Static shapes (the default): the graph is compiled for each call's input shapes, a (batch, size),
    and the last STATIC_SHAPES compilations are kept; OpenVINO plans memory and picks kernels for the
    exact shapes, which measured faster than its dynamic-shape compilation (docs/benchmarks.md).
    SDRT_OPENVINO_SHAPES=dynamic compiles once with the graph's dynamic dimensions instead.
    SDRT_OPENVINO_CACHE=DIR keeps compiled blobs on disk (OpenVINO's CACHE_DIR): a later process
    compiling the same graph for the same shape loads it instead."""

    properties: dict = {}  # more compile properties (benchmarks/openvino_profile.py: PERF_COUNT)
    amx_attention = True  # sdrt's AMX attention kernel where it runs (amx_attention.available())
    replaced_attention = 0  # attention nodes the last compilation gave to it

    def _load(self) -> None:
        check_openvino(self.provider)
        import openvino as ov

        self.core = ov.Core()
        if os.environ.get(CACHE_ENV):
            self.core.set_property({"CACHE_DIR": os.environ[CACHE_ENV]})
        precision = OPENVINO_PRECISION[self.provider]
        if precision == "bf16" and "BF16" not in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            precision = "f32"  # no bf16 units: OpenVINO would emulate it slowly
        self.precision = precision
        self.static = shapes_mode() == "static"
        # input shapes (None: dynamic) -> (compiled model, infer request, its outputs in spec order)
        self.compiled: OrderedDict[tuple | None, tuple] = OrderedDict()
        self._lock = threading.Lock()  # an infer request serves one call at a time (threads of a server)
        if not self.static:
            self._compile(None)

    def _read(self, shapes: tuple | None):
        model = self.core.read_model(str(self.path))
        if shapes is not None:
            model.reshape({name: list(shape) for name, shape in shapes})
        return model

    def _compile(self, shapes: tuple | None):
        """The compiled model and infer request for SHAPES (None: the graph's dynamic dimensions)."""
        if shapes in self.compiled:
            self.compiled.move_to_end(shapes)
            return self.compiled[shapes]
        try:
            model = self._read(shapes)
            if shapes is not None and self.amx_attention:
                try:
                    self.replaced_attention = amx_attention.replace_attention(model)
                except Exception as e:  # sdrt's kernel failing to take a model must not keep OpenVINO from it
                    log.warning("%s: AMX attention kernel not used (%s: %s)", self.path.name, type(e).__name__, e)
                    model, self.replaced_attention = self._read(shapes), 0
            compiled = self.core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": self.precision,
                                                              "PERFORMANCE_HINT": "LATENCY", **self.properties})
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise InputError(f"cannot load {self.path} with OpenVINO: {e}") from None
        del model  # the compiled model holds what it needs
        while len(self.compiled) >= STATIC_SHAPES:
            self.compiled.popitem(last=False)
        self.compiled[shapes] = (compiled, compiled.create_infer_request(),
                                 [compiled.output(t.name) for t in self.spec.outputs])
        return self.compiled[shapes]

    def _run(self, feeds):
        key = tuple((k, tuple(v.shape)) for k, v in feeds.items()) if self.static else None
        with self._lock:
            _, request, outputs = self._compile(key)
            result = request.infer(feeds)
            return [np.array(result[o]) for o in outputs]  # copies: the request reuses its buffers

    def close(self) -> None:
        self.compiled.clear()
