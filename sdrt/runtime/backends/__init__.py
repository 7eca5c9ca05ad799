"""Engine backends (the interface in `base`), one module per runtime, and the memory policy.

    onnxruntime  ONNX Runtime sessions on the CPU, CUDA or TensorRT execution providers
    openvino     OpenVINO's CPU plugin on the same ONNX files (bf16 / fp32)
    tensorrt     serialized TensorRT engines through TensorRT's API and cuda-python
    memory       shared arenas and handing memory back between phases
"""

from __future__ import annotations

from pathlib import Path

from sdrt.components import ComponentSpec
from sdrt.errors import InputError, SdrtError
from sdrt.runtime.backends.base import Backend
from sdrt.runtime.backends.memory import MEMORY, release_free_memory

PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino", "openvino-fp32")
# the graphs each provider runs, first present first (sdrt.kernels.TARGETS; none present: the
# exported standard ONNX graph). The export writes a target's graph only where its passes changed
# something (the text encoder has no onnxruntime-cpu graph: no convolutions), and engines exported
# before a target existed lack it. ONNX Runtime's TensorRT provider gets the TensorRT graph: contrib
# ops would split its engine. The CUDA provider's own graph (sdrt.kernels.cuda) comes only with fp16
# exports.
PROVIDER_TARGETS = {"cpu": ("onnxruntime-cpu", "onnxruntime"), "cuda": ("onnxruntime-cuda", "onnxruntime"),
                    "tensorrt": ("tensorrt",), "openvino": (), "openvino-fp32": ()}

__all__ = ["MEMORY", "PROVIDERS", "PROVIDER_TARGETS", "Backend", "check_provider", "check_weights", "load_backend",
           "release_free_memory"]


def check_provider(provider: str) -> None:
    """Fail early, with the fix, when this machine cannot serve `provider`."""
    from sdrt.runtime.backends import onnxruntime, openvino

    if provider not in PROVIDERS:
        raise InputError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    if provider in openvino.OPENVINO_PRECISION:
        openvino.check_openvino(provider)
    else:
        onnxruntime.check_ort_provider(provider)


def check_weights(backend: str, provider: str) -> None:
    """Only ONNX Runtime's sessions take initializers replacing the graph's (LoRAs per request)."""
    from sdrt.runtime.backends import openvino

    if backend != "onnx" or provider in openvino.OPENVINO_PRECISION:
        raise InputError(f"LoRAs per request run on ONNX Runtime's providers (cpu, cuda), not on "
                         f"{'TensorRT engines' if backend == 'tensorrt' else provider}: fuse them at export instead "
                         "(sdrt export --lora FILE:WEIGHT)")


def load_backend(path: Path, spec: ComponentSpec, backend: str, provider: str, weights: dict | None = None) -> Backend:
    """WEIGHTS: initializers replacing the graph's (LoRAs per request; check_weights)."""
    from sdrt.runtime.backends import onnxruntime, openvino, tensorrt

    if weights:
        check_weights(backend, provider)
    if backend == "onnx" and provider in openvino.OPENVINO_PRECISION:
        return openvino.OpenVinoBackend(path, spec, provider)
    if backend == "onnx":
        return onnxruntime.OrtBackend(path, spec, provider, weights)
    if backend == "tensorrt":
        if provider != "tensorrt":
            raise InputError(f"{path} is a TensorRT engine: run it with --provider tensorrt")
        return tensorrt.TensorRtBackend(path, spec, provider)
    raise SdrtError(f"{path}: backend {backend!r} is not supported by this sdrt")
