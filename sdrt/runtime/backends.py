"""Engine backends: load one component, describe its inputs, run it, close it.

The base class checks every call's inputs against the component's declared spec (from the
manifest) and keeps the time spent; a backend implements `_load`, `_run` and `close`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from sdrt.components import ComponentSpec
from sdrt.errors import InputError, SdrtError

log = logging.getLogger(__name__)

PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino", "openvino-fp32")
# OpenVINO on the CPU: "openvino" lets it compute in bf16 where the CPU has bf16 units (AVX512_BF16 /
# AMX; measured 3x faster than fp32 on the SD 1.5 UNet here), "openvino-fp32" keeps fp32
OPENVINO_PRECISION = {"openvino": "bf16", "openvino-fp32": "f32"}


class Backend:
    def __init__(self, path: Path, spec: ComponentSpec, provider: str = "cpu"):
        self.path = Path(path)
        self.spec = spec
        self.provider = provider  # an sdrt provider name (PROVIDERS)
        self.seconds = 0.0  # time spent in run()
        self.calls = 0
        self._load()

    def _load(self) -> None:
        raise NotImplementedError

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the order of spec.outputs."""
        try:
            self.spec.check_feeds(feeds)
        except ValueError as e:
            raise InputError(str(e)) from None
        t0 = time.perf_counter()
        out = self._run(feeds)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def __call__(self, *args: np.ndarray) -> np.ndarray:
        """Positional inputs in spec order; the first output."""
        return self.run({t.name: a for t, a in zip(self.spec.inputs, args)})[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ort_providers(provider: str, cache_dir: Path) -> list:
    """ONNX Runtime execution providers for an sdrt provider name, most preferred first."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
    if provider == "tensorrt":
        trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": True}
        return [("TensorrtExecutionProvider", trt), "CUDAExecutionProvider", "CPUExecutionProvider"]
    raise InputError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")


def check_provider(provider: str) -> None:
    """Fail early, with the fix, when this machine cannot serve `provider`."""
    if provider in OPENVINO_PRECISION:
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise SdrtError(f"provider {provider}: OpenVINO is not installed (pip install sdrt[openvino])") from None
        return
    import onnxruntime as ort

    first = ort_providers(provider, Path("."))[0]
    wanted = first if isinstance(first, str) else first[0]
    if wanted not in ort.get_available_providers():
        raise SdrtError(f"provider {provider}: this onnxruntime has no {wanted} "
                        f"(available: {', '.join(ort.get_available_providers())}); "
                        "install sdrt[gpu] on a machine with CUDA")


class OrtBackend(Backend):
    """ONNX Runtime InferenceSession on the CPU, CUDA or TensorRT execution provider."""

    def _load(self) -> None:
        import onnxruntime as ort

        check_provider(self.provider)
        providers = ort_providers(self.provider, self.path.parent / "trt_cache")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise InputError(f"cannot load {self.path} (corrupt or not an ONNX model?): {e}") from None
        self._outputs = [t.name for t in self.spec.outputs]

    def _run(self, feeds):
        return self.session.run(self._outputs, feeds)

    def close(self) -> None:
        self.session = None


class OpenVinoBackend(Backend):
    """OpenVINO's CPU plugin compiling the same ONNX file (bf16 or fp32 inference precision)."""

    def _load(self) -> None:
        check_provider(self.provider)
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


def load_backend(path: Path, spec: ComponentSpec, backend: str, provider: str) -> Backend:
    if backend == "onnx" and provider in OPENVINO_PRECISION:
        return OpenVinoBackend(path, spec, provider)
    if backend == "onnx":
        return OrtBackend(path, spec, provider)
    raise SdrtError(f"{path}: backend {backend!r} is not supported by this sdrt")
