"""OpenVINO's CPU plugin compiling the engine dir's ONNX files (bf16 or fp32 inference precision)."""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError, SdrtError
from sdrt.runtime.backends.base import Backend

# "openvino" lets it compute in bf16 where the CPU has bf16 units (AVX512_BF16 / AMX: docs/benchmarks.md);
# "openvino-fp32" keeps fp32
OPENVINO_PRECISION = {"openvino": "bf16", "openvino-fp32": "f32"}


def check_openvino(provider: str) -> None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise SdrtError(f"provider {provider}: OpenVINO is not installed (pip install sdrt[openvino])") from None


class OpenVinoBackend(Backend):
    """OpenVINO's CPU plugin compiling the same ONNX file (bf16 or fp32 inference precision)."""

    def _load(self) -> None:
        check_openvino(self.provider)
        import openvino as ov

        core = ov.Core()
        precision = OPENVINO_PRECISION[self.provider]
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            precision = "f32"  # no bf16 units: OpenVINO would emulate it slowly
        self.precision = precision
        try:
            self.model = core.compile_model(str(self.path), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                                    "PERFORMANCE_HINT": "LATENCY"})
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise InputError(f"cannot load {self.path} with OpenVINO: {e}") from None
        self.request = self.model.create_infer_request()
        self._outputs = [self.model.output(t.name) for t in self.spec.outputs]

    def _run(self, feeds):
        result = self.request.infer(feeds)
        return [np.asarray(result[o]) for o in self._outputs]

    def close(self) -> None:
        self.request = self.model = None
